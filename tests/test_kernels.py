"""Every kernel path against the dequantize-then-matmul reference, including shapes where the fast op cannot run.

Tolerances (relative Frobenius error of the output against the reference in the same activation dtype):
- 1e-5 where both sides compute in fp32: the dense path for many rows, int8 (int32 accumulation is exact);
- 2e-2 where the weight-only ops round the activations (and the int4 op its per-group scale and offset) to bf16,
  which keeps 8 significant bits: few rows, or bf16 activations.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlm.core import QuantSpec, dequantize
from quantlm.core.activation import fake_quantize_per_token, fake_quantize_per_token_int8, quantize_per_token_int8
from quantlm.errors import InvalidSpecError, QuantlmError
from quantlm.nn.kernels import DEQUANT_MIN_ROWS, KERNEL_CHOICES, KERNELS, choose_kernel, cpu_has_fast_int8
from quantlm.nn.qlinear import QuantLinear
from quantlm.pipeline.dequantized import run_dequantized

EXACT, BF16 = 1e-5, 2e-2


def make_layer(out_f, in_f, bits, group, sym=False, act_bits=None, bias=True, seed=0, act_order=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    b = torch.randn(out_f, generator=g) if bias else None
    layer = QuantLinear.from_weight(w, QuantSpec(bits=bits, group_size=group, symmetric=sym), b, act_bits=act_bits)
    if act_order:  # a GPTQ act-order layout: groups formed over a permuted column order
        perm = torch.randperm(in_f, generator=g)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_f) // group).to(torch.int32)
        layer = QuantLinear.from_codes(layer.codes(), layer.scales, layer.zeros, layer.spec, b, g_idx=g_idx)
    return layer


def relative_error(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def check_kernel(layer, expected_kernel, dtype=torch.float32, tokens=5, name="auto"):
    x = torch.randn(2, tokens, layer.in_features).to(dtype)
    ref = layer(x)  # no kernel chosen yet: the reference path
    chosen = layer.use_kernel(name, dtype)
    assert chosen == expected_kernel
    y = layer(x)
    assert y.shape == ref.shape and y.dtype == dtype
    op_rounds_to_bf16 = chosen in ("int4pack", "int4x2", "int8pack") and x.shape[0] * x.shape[1] < DEQUANT_MIN_ROWS
    tol = BF16 if dtype == torch.bfloat16 or op_rounds_to_bf16 else EXACT
    assert relative_error(y, ref) < tol, (chosen, relative_error(y, ref))
    return layer


@pytest.mark.parametrize("tokens", [3, 40])  # 6 rows: the weight-only op; 80 rows: dequantize once, dense GEMM
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "out_f, in_f, bits, group, sym, expected",
    [
        (64, 256, 4, 64, False, "int4pack"),
        (64, 256, 4, 32, True, "int4pack"),
        (48, 512, 4, 128, False, "int4pack"),
        (32, 512, 4, 256, False, "int4pack"),
        (32, 1024, 4, 512, False, "int4pack"),  # groups of 512 run as 256 with repeated scales
        (40, 192, 4, -1, False, "int4pack"),  # per channel, N not a multiple of 16: padded
        (36, 128, 3, 64, False, "int4pack"),  # 3-bit codes are 4-bit codes
        (32, 128, 2, 32, True, "int4pack"),
        (32, 100, 4, 64, False, "torch"),  # K not a multiple of the group: fallback
        (32, 256, 4, 16, False, "unpacked"),  # group too small for the op: codes unpacked once
        (32, 128, 5, 64, False, "int4x2"),  # 5-8 bits: two int4 ops on the nibbles of the centered codes
        (40, 256, 6, 32, True, "int4x2"),
        (32, 192, 7, -1, False, "int4x2"),
        (48, 256, 8, -1, True, "int8pack"),
        (50, 96, 8, -1, False, "int8pack"),  # asymmetric: rank-one zero-point correction
        (16, 30, 8, -1, True, "unpacked"),  # K not a multiple of 4 (int8pack) nor of 32 (int4x2)
        (32, 256, 8, 64, True, "int4x2"),  # grouped int8
        (32, 256, 6, 16, True, "unpacked"),  # Q6_K-like groups of 16
    ],
)
def test_weight_only_kernels_match_reference(out_f, in_f, bits, group, sym, expected, dtype, tokens):
    check_kernel(make_layer(out_f, in_f, bits, group, sym), expected, dtype, tokens)


@pytest.mark.parametrize("tokens", [3, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_order_layer_runs_int4pack_in_group_order(dtype, tokens):
    layer = make_layer(32, 256, 4, 64, act_order=True)
    assert layer.g_idx is not None
    check_kernel(layer, "int4pack", dtype, tokens)


@settings(max_examples=30, deadline=None)
@given(
    out_f=st.integers(1, 20),
    in_f=st.integers(1, 200),
    bits=st.integers(2, 8),
    group=st.sampled_from([-1, 8, 16, 32, 64]),
    sym=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dequantize_weight_fast_path_equals_core_dequantize(out_f, in_f, bits, group, sym, seed):
    layer = make_layer(out_f, in_f, bits, group, sym, bias=False, seed=seed)
    expected = dequantize(layer.codes(), layer.scales.float(), layer.zeros.float(), layer.spec)
    assert torch.equal(layer.dequantize_weight(), expected)


@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("wbits,abits", [(8, 8), (4, 8), (4, 4)])
def test_w8a8_int_mm_matches_fake_quant_reference(tokens, wbits, abits):
    check_kernel(make_layer(48, 96, wbits, -1, sym=True, act_bits=abits), "int8", torch.float32, tokens, "int8")


def test_w4a4_layers_multiply_4bit_activation_codes():
    """A W4A4 layer's input is on the per-token 4-bit grid (codes in [-7, 7]) of QAT's fake quantization: its
    reference output is the product of that grid with the dequantized weight."""
    layer = make_layer(24, 64, 4, -1, sym=True, act_bits=4, bias=False)
    x = torch.randn(5, 64) * torch.linspace(0.1, 30, 64)  # a few wide channels
    codes, _ = layer.quantize_input(x)
    assert int(codes.abs().max()) == 7
    expected = fake_quantize_per_token(x, 4) @ layer.dequantize_weight().t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)
    assert "a4" in layer.describe()
    with pytest.raises(InvalidSpecError, match="8 .W8A8., 4"):
        make_layer(24, 64, 4, -1, sym=True, act_bits=6)


def test_auto_takes_int_mm_only_where_the_cpu_has_int8_dot_products():
    layer = make_layer(48, 96, 8, -1, sym=True, act_bits=8)
    assert choose_kernel(layer).name == ("int8" if cpu_has_fast_int8() else "torch")


def test_pipeline_dequantized_copy_gives_the_reference_numbers():
    for layer in (make_layer(40, 100, 3, 32, act_bits=None), make_layer(48, 96, 8, -1, sym=True, act_bits=8)):
        x = torch.randn(2, 3, layer.in_features)
        ref = layer(x)  # no kernel chosen yet: the reference path
        run_dequantized(layer, torch.float32)
        assert layer.kernel.name == "dequantized"
        torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)


def test_w8a8_with_asymmetric_weights_falls_back():
    layer = make_layer(48, 96, 8, -1, sym=False, act_bits=8)
    assert choose_kernel(layer).name == "torch"


def test_named_kernel_that_cannot_run_says_why():
    layer = make_layer(32, 100, 4, 64)
    with pytest.raises(QuantlmError, match="int4pack.*in_features 100.*--kernel auto"):
        layer.use_kernel("int4pack")
    with pytest.raises(QuantlmError, match="unknown kernel"):
        layer.use_kernel("marlin")
    assert layer.use_kernel("torch") == "torch"


def test_every_kernel_is_reachable_by_name():
    assert set(KERNELS) == {"int4pack", "int4x2", "int8pack", "int8", "codebook", "unpacked", "torch"}
    assert "dequantized" not in KERNEL_CHOICES  # the pipeline's copies (quantlm.pipeline.dequantized), not a kernel
    with pytest.raises(QuantlmError, match="unknown kernel"):
        make_layer(32, 100, 4, 64).use_kernel("dequantized")


@pytest.mark.parametrize(("bits", "kernel"), [(4, "int4pack"), (6, "int4x2"), (4, "unpacked")])
def test_kernel_tensors_are_not_saved(bits, kernel):
    layer = make_layer(32, 256, bits, 64)
    before = set(layer.state_dict())
    layer.use_kernel(kernel)
    assert set(layer.state_dict()) == before


@settings(max_examples=25, deadline=None)
@given(
    out_f=st.integers(1, 40),
    groups=st.integers(1, 4),
    group=st.sampled_from([32, 64, 128]),
    bits=st.sampled_from([2, 3, 4]),
    sym=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int4pack_property(out_f, groups, group, bits, sym, seed):
    layer = make_layer(out_f, groups * group, bits, group, sym, seed=seed)
    check_kernel(layer, "int4pack")


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 50), scale=st.floats(1e-3, 1e4), seed=st.integers(0, 2**16))
def test_per_token_int8_quantization_property(rows, cols, scale, seed):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    x[0] = 0.0  # an all-zero token must not divide by zero
    codes, s = quantize_per_token_int8(x)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
    assert torch.isfinite(s).all()
    err = (fake_quantize_per_token_int8(x) - x).abs()
    assert bool((err <= s / 2 * (1 + 1e-5) + 1e-7).all())  # within half a step of each token's grid
    assert torch.equal(fake_quantize_per_token_int8(x)[0], torch.zeros(cols))
    codes4, s4 = quantize_per_token_int8(x, 4)  # W4A4's codes: QAT's symmetric 4-bit per-token grid, in int8
    assert int(codes4.abs().max()) <= 7
    assert torch.equal(codes4.float() * s4, fake_quantize_per_token(x, 4))


def test_int4x2_takes_fractional_zero_points_and_refuses_wide_asymmetric_codes():
    """A K-quant grid's fractional zeros go into the low layer's zero point; an 8-bit asymmetric layer whose codes
    lie more than 128 from the zero point cannot be split into 4-bit halves and falls to the next kernel."""
    from quantlm.formats.gguf_blocks import GRIDS

    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    check_kernel(QuantLinear.from_weight(w, GRIDS["Q5_K"]), "int4x2", tokens=2)
    codes = torch.full((16, 64), 255, dtype=torch.uint8)
    layer = QuantLinear.from_codes(codes, torch.ones(16, 2), torch.zeros(16, 2), QuantSpec(bits=8, group_size=32))
    assert "within 128" in KERNELS["int4x2"].why_not(layer, torch.device("cpu"))
    assert choose_kernel(layer).name == "unpacked"


@pytest.mark.parametrize(("bits", "group"), [(5, 32), (6, 64), (8, 32), (8, -1)])
def test_int4x2_halves_stay_accurate_on_inputs_of_nonzero_mean(bits, group):
    """Each half is rounded to bf16 by the op before the two are added: centred halves keep that rounding to the
    size of the result, also where hidden states have a mean far from 0 (uncentred halves lost 4-8e-2 here)."""
    layer = make_layer(256, 1024, bits, group, sym=True, bias=False)
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(2)) + 1.0
    exact = x @ layer.dequantize_weight().T
    layer.use_kernel("int4x2")
    assert relative_error(layer(x), exact) < 1e-2


def test_off_the_cpu_auto_keeps_the_plain_kernel():
    """The CPU kernels say why they cannot run on a GPU, and unpacked codes would cost GPU memory: torch it is."""
    for bits, group in [(4, 64), (6, 16), (8, 32)]:
        assert choose_kernel(make_layer(32, 256, bits, group), "auto", torch.device("cuda")).name == "torch"
