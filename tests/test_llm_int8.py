"""LLM.int8() and the W8A8 activation schemes: numerics, the int8 GEMM kernel against the reference, the step."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import quantlm
from conftest import byte_tokenizer, tiny_model
from quantlm.cli import app
from quantlm.core import QuantSpec
from quantlm.core.activation import (
    quantize_per_tensor_int8,
    split_outlier_columns,
    static_int8_scale,
)
from quantlm.errors import QuantlmError
from quantlm.methods import RTN, LLMInt8
from quantlm.nn import QuantLinear
from quantlm.nn.kernels import SHARED_INPUT
from quantlm.pipeline.dequantized import run_dequantized

W8 = QuantSpec(bits=8, symmetric=True)


def _layer(out_f=24, in_f=40, seed=0, **act):
    g = torch.Generator().manual_seed(seed)
    return QuantLinear.from_weight(
        torch.randn(out_f, in_f, generator=g), W8, torch.randn(out_f, generator=g), act_bits=8, **act
    )


def _input(tokens=6, features=40, outliers=(3, 17), seed=1):
    x = torch.randn(2, tokens, features, generator=torch.Generator().manual_seed(seed))
    for c in outliers:
        x[0, 1, c] = 25.0
    return x


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 16), st.integers(1, 48), st.floats(0.01, 100.0), st.integers(0, 2**16))
def test_static_per_tensor_grid(rows, cols, absmax, seed):
    x = (torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * absmax
    scale = static_int8_scale(absmax)
    codes, s = quantize_per_tensor_int8(x, scale)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
    # half a step, plus the fp32 rounding of x / s and q * s (a few ulps of |x|, which reaches 100 here)
    slack = 4 * torch.finfo(torch.float32).eps * absmax
    assert float((codes.float() * s - x).abs().max()) <= float(scale) / 2 * (1 + 1e-5) + slack
    clipped, _ = quantize_per_tensor_int8(x * 10, scale)  # beyond the calibrated range: clipped, never wrapped
    assert int(clipped.abs().max()) <= 127
    assert float(static_int8_scale(0.0)) == 1.0


def test_outlier_split_separates_the_columns_exactly():
    x = _input()[0]
    inliers, outliers, cols = split_outlier_columns(x, 6.0)
    assert cols.tolist() == [3, 17]
    assert torch.equal(outliers, x[:, [3, 17]])
    assert bool((inliers[:, [3, 17]] == 0).all())
    rest = [c for c in range(x.shape[1]) if c not in (3, 17)]
    assert torch.equal(inliers[:, rest], x[:, rest])


def test_llm_int8_layer_beats_plain_per_token_int8_on_outliers():
    x = _input()
    dense = _layer()
    plain, mixed = _layer(), _layer(outlier_threshold=6.0)
    exact = torch.nn.functional.linear(x, dense.dequantize_weight()) + dense.bias
    err = lambda y: float((y - exact)[0, 1].norm() / exact[0, 1].norm())  # noqa: E731  the token with outliers
    assert err(mixed(x)) < 0.3 * err(plain(x))


def test_threshold_that_makes_every_column_an_outlier_is_the_float_product():
    layer = _layer(outlier_threshold=1e-6)
    x = _input()
    expected = torch.nn.functional.linear(x, layer.dequantize_weight()) + layer.bias
    y = layer(x)
    assert bool(torch.isfinite(y).all())
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", [{}, {"act_scale": static_int8_scale(3.0)}, {"outlier_threshold": 6.0}])
def test_int8_gemm_kernel_matches_the_reference(act, dtype):
    layer = _layer(**act)
    x = _input().to(dtype)
    reference = layer(x)
    assert layer.use_kernel("int8", dtype) == "int8"
    y = layer(x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert float((y.float() - reference.float()).norm() / reference.float().norm()) < tol
    if dtype == torch.float32 and "outlier_threshold" not in act:
        assert torch.equal(y, reference)  # int32 accumulation and the same scaling order: the same numbers


def test_shared_input_is_quantized_once_and_never_reused_stale():
    a, b = _layer(seed=0), _layer(seed=1)
    for m in (a, b):
        m.use_kernel("int8")
    x = _input()
    calls = []
    original = QuantLinear.quantize_input

    def counting(self, inp):
        calls.append(1)
        return original(self, inp)

    QuantLinear.quantize_input = counting
    try:
        SHARED_INPUT.clear()
        with torch.no_grad():
            _, yb = a(x), b(x)
            assert len(calls) == 1  # b reused a's int8 input
            x.mul_(2)  # changed in place: must be quantized again
            yb2 = b(x)
            assert len(calls) == 2
        torch.testing.assert_close(yb2, (yb - b.bias) * 2 + b.bias, rtol=1e-2, atol=1e-2)
        with torch.inference_mode():  # an inference tensor keeps no version counter: nothing is shared
            xi = x.clone()
            a(xi), b(xi)
            assert len(calls) == 4
    finally:
        QuantLinear.quantize_input = original
        SHARED_INPUT.clear()
    c = _layer(act_scale=static_int8_scale(1.0))  # another grid on the same tensor is not a hit
    c.use_kernel("int8")
    expected = c.reference_forward(x) + c.bias
    torch.testing.assert_close(c(x), expected)


def test_activation_settings_are_validated():
    with pytest.raises(QuantlmError, match="positive number"):
        _layer(outlier_threshold=-1)
    with pytest.raises(QuantlmError, match="per token"):
        QuantLinear(8, 8, W8, act_bits=8, act_granularity="tensor", outlier_threshold=6.0)
    with pytest.raises(QuantlmError, match="8-bit activations"):
        RTN(W8, act_granularity="tensor")
    with pytest.raises(QuantlmError, match="activation granularity"):
        RTN(W8, act_bits=8, act_granularity="row")
    with pytest.raises(QuantlmError, match="threshold"):
        LLMInt8(threshold=0)


def test_llm_int8_step_reports_outliers_and_round_trips(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 60.0
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    quantlm.quantize(model, [LLMInt8(6.0)], ids, batch_size=2, progress=False)
    q_proj = next(r for r in model.quantlm_record.log if r["module"] == "model.layers.0.self_attn.q_proj")
    assert q_proj["details"]["outlier_columns_any"] >= 1
    assert 0 < q_proj["details"]["outlier_fraction_mean"] <= q_proj["details"]["outlier_fraction_any"] <= 1
    assert q_proj["details"]["spec"] == "w8 per-channel sym a8 outliers>=6"
    out = quantlm.save(model, tmp_path / "int8", tokenizer=byte_tokenizer())
    layout = json.loads((out / "config.json").read_text())["quantization_config"]["modules"][
        "model.layers.0.mlp.up_proj"
    ]
    assert layout["outlier_threshold"] == 6.0 and layout["act_bits"] == 8
    loaded = quantlm.load(out)
    with torch.no_grad():
        logits = loaded(ids).logits
    assert float((logits - reference).norm() / reference.norm()) < 0.1


def test_cli_llm_int8(tiny_model_dir, text_file, tmp_path):
    runner = CliRunner()
    args = [
        "quantize",
        str(tiny_model_dir),
        "--method",
        "llm-int8",
        "--threshold",
        "2.5",
        "--calib",
        str(text_file),
        "--calib-samples",
        "2",
        "--calib-seqlen",
        "32",
        "--out",
        str(tmp_path / "q"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "outlier input columns" in result.stdout
    bad = runner.invoke(app, args[:-2] + ["--bits", "4", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--bits does not apply to --method llm-int8" in bad.stderr


def test_pipeline_copy_of_a_w8a8_layer_keeps_one_weight():
    layer = _layer()
    run_dequantized(layer, torch.float32)
    x = _input()
    torch.testing.assert_close(layer(x), layer.reference_forward(x) + layer.bias, rtol=0, atol=0)
    assert layer.kernel.weight is None and layer.kernel.int_weight is not None  # after a forward: still none
    mixed = _layer(outlier_threshold=6.0)
    run_dequantized(mixed, torch.float32)
    assert mixed.kernel.weight is None  # made on the first forward
    torch.testing.assert_close(mixed(x), mixed.reference_forward(x) + mixed.bias, rtol=0, atol=0)
    assert mixed.kernel.weight is not None  # LLM.int8() needs the dense columns of its outliers
