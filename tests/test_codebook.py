"""NF4/FP4 codebooks, double-quantized scales, float zero points, the nf4/fp4/int8-weight-only methods and
quantization at load time."""

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
from quantlm.core import QuantSpec, compute_qparams, dequantize, quantize
from quantlm.core.codebook import (
    SCALE_BLOCK,
    DoubleQuantScales,
    codebook_levels,
    nearest_level,
)
from quantlm.core.quantizer import FIT_ITERS
from quantlm.errors import InvalidSpecError, QuantlmError
from quantlm.methods import GPTQ, gptq_quantize, parse_recipe
from quantlm.methods.codebook import FP4, NF4
from quantlm.methods.qat import QATConfig
from quantlm.methods.rtn import RTN, Int8WeightOnly
from quantlm.nn import QuantLinear
from quantlm.nn.kernels import choose_kernel

# bitsandbytes' NF4 table (functional.py, get_4bit_type("nf4")), as published
BNB_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
NF4_G64 = QuantSpec(bits=4, group_size=64, codebook="nf4")


def test_nf4_levels_are_the_normal_quantiles_bitsandbytes_ships():
    assert torch.allclose(codebook_levels("nf4"), torch.tensor(BNB_NF4), atol=1e-7, rtol=0)


def test_fp4_levels_are_bitsandbytes_codes():
    levels = codebook_levels("fp4")
    magnitudes = sorted({abs(v) for v in levels.tolist()})
    assert magnitudes == pytest.approx([0, 0.0052083333, 1 / 6, 0.25, 1 / 3, 0.5, 2 / 3, 1.0])
    assert torch.equal(levels[8:], -levels[:8])  # the sign is the top bit of the code


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["nf4", "fp4"]), st.lists(st.floats(-1.5, 1.5, allow_nan=False), min_size=1, max_size=64))
def test_nearest_level_is_the_brute_force_nearest(name, values):
    x = torch.tensor(values, dtype=torch.float32)
    levels = codebook_levels(name)
    chosen = levels[nearest_level(x, name).long()]
    best = (x.unsqueeze(1) - levels).abs().min(dim=1).values
    assert torch.allclose((x - chosen).abs(), best, atol=1e-7, rtol=0)


def _slow_fit(x: torch.Tensor, name: str, refits: int) -> float:
    """The least-squares refit of one block's scale, written out: absmax, then levels and scale in turn."""
    levels = codebook_levels(name).tolist()
    s = max(abs(v) for v in x.tolist()) or 1.0

    def nearest(v):
        return min(levels, key=lambda lv: (abs(v / s - lv), lv))

    def error(scale, chosen):
        return sum((v - c * scale) ** 2 for v, c in zip(x.tolist(), chosen))

    chosen = [nearest(v) for v in x.tolist()]
    for _ in range(refits):
        den = sum(c * c for c in chosen)
        fitted = sum(v * c for v, c in zip(x.tolist(), chosen)) / den if den else s
        if not fitted > 0:
            break
        old, s_old = chosen, s
        s = fitted
        chosen = [nearest(v) for v in x.tolist()]
        if not error(s, chosen) < error(s_old, old):
            s, chosen = s_old, old
            break
    return s


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["nf4", "fp4"]),
    st.integers(1, 6),
    st.sampled_from([(64, 64), (100, 32), (40, -1)]),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_codebook_scale_fit_is_the_slow_refit_and_never_raises_the_error(name, rows, shape, outlier, seed):
    n, group = shape
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g) * 0.05
    if outlier:
        w[0, 3] = 1.0
    if rows > 1:
        w[-1] = 0.0  # an all-zero row keeps the scale 1
    absmax_spec = QuantSpec(bits=4, group_size=group, codebook=name)
    fit_spec = QuantSpec(bits=4, group_size=group, codebook=name, clip="fit")
    scale, _ = compute_qparams(w, fit_spec)
    size = group if group > 0 else n
    for r in range(rows):
        for k in range(scale.shape[1]):
            block = w[r, k * size : (k + 1) * size]
            # a refit that keeps every level lowers the error by ~1e-9: float32 may not see it and stop one early
            assert float(scale[r, k]) == pytest.approx(_slow_fit(block, name, FIT_ITERS), rel=1e-4)

    def sse(spec):
        s, z = compute_qparams(w, spec)
        return float((dequantize(quantize(w, s, z, spec), s, z, spec) - w).square().sum())

    assert sse(fit_spec) <= sse(absmax_spec) * (1 + 1e-6)
    with pytest.raises(InvalidSpecError, match="nf4/fp4"):
        QuantSpec(bits=4, group_size=64, clip="fit")


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 30),
    st.floats(0.05, 3.0),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_double_quantized_scales_stay_within_half_a_log_step(rows, groups, spread, outlier, zero_group, seed):
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(rows, groups, generator=g) * spread) * 0.02  # lognormal, as layer scales are
    if outlier:
        scales[0, 0] = 40.0
    if zero_group:
        scales[-1, -1] = 1.0  # what compute_qparams gives an all-zero group
    dq = DoubleQuantScales.of(scales)
    n_blocks = -(-rows * groups // SCALE_BLOCK)
    assert dq.codes.dtype == torch.uint8 and dq.codes.shape == scales.shape and dq.log_range.shape == (n_blocks, 2)
    decoded = dq.decode().float()
    low, high = dq.log_range.unbind(1)
    half_step = ((high - low) / 510).repeat_interleave(SCALE_BLOCK)[: rows * groups].view(rows, groups)
    error = (decoded.log2() - scales.log2()).abs()
    assert bool((error <= half_step + 2**-10).all())  # + fp16's rounding of the decoded value
    assert bool((decoded > 0).all()) and decoded.dtype in (torch.float16, torch.float32)


@pytest.mark.parametrize("name", ["nf4", "fp4"])
@pytest.mark.parametrize("in_features,group", [(128, 64), (100, 64), (200, -1), (72, 32), (98, 32), (99, 32)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_codebook_layer_round_trips_and_its_kernel_matches_the_reference(name, in_features, group, double_quant):
    spec = QuantSpec(bits=4, group_size=group, codebook=name)
    w = torch.randn(40, in_features, generator=torch.Generator().manual_seed(in_features))
    layer = QuantLinear.from_weight(w, spec, torch.randn(40), double_quant=double_quant)
    assert layer.zeros is None and layer.double_quant == double_quant
    scale = layer.scales.float()
    codes = layer.codes()
    assert torch.equal(layer.dequantize_weight(), dequantize(codes, scale, scale, spec))
    assert torch.equal(codes, quantize(w, scale, scale, spec))  # codes are nearest for the stored scales
    layout = json.loads(json.dumps(layout_of := layer.layout()))
    assert layout == layout_of and layout.get("double_quant", False) == double_quant
    rebuilt = QuantLinear.from_layout(layout, layer.scales.dtype)
    rebuilt.load_state_dict(layer.state_dict(), assign=True)
    assert torch.equal(rebuilt.dequantize_weight(), layer.dequantize_weight())
    x = torch.randn(3, 5, in_features)
    reference = layer(x)
    assert choose_kernel(layer).name == ("codebook" if -(-in_features // 2) % 2 == 0 else "torch")  # whole int16 words
    layer.use_kernel("auto")
    assert torch.allclose(layer(x), reference, atol=1e-5, rtol=1e-5)
    assert "integer grid" in (choose_kernel.__globals__["KERNELS"]["int4pack"].why_not(layer, torch.device("cpu")))


def test_double_quant_makes_the_stored_layer_smaller():
    w = torch.randn(256, 512)
    plain = QuantLinear.from_weight(w, NF4_G64)
    dq = QuantLinear.from_weight(w, NF4_G64, double_quant=True)
    weights = 256 * 512
    assert plain.weight_bytes * 8 / weights == pytest.approx(4.25)
    assert dq.weight_bytes * 8 / weights == pytest.approx(4 + (8 + 64 / SCALE_BLOCK) / 64, abs=1e-3)
    error = [float((q.dequantize_weight() - w).norm() / w.norm()) for q in (plain, dq)]
    assert error[1] < error[0] * 1.01


@pytest.mark.parametrize("bits", [3, 4])
def test_float_zero_points_are_kept_and_run_on_the_int4_kernel(bits):
    spec = QuantSpec(bits=bits, group_size=64)
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    scale, zero = compute_qparams(w, spec)
    zero = zero + 0.37
    scale = scale.half()
    codes = quantize(w, scale.float(), zero, spec)
    layer = QuantLinear.from_codes(codes, scale, zero, spec, zero_dtype=torch.float16)
    assert layer.zeros.dtype == torch.float16 and layer.layout()["zero_dtype"] == "float16"
    assert "fp16-zeros" in layer.describe()
    expected = (codes.float() - zero.half().float().repeat_interleave(64, 1)) * scale.float().repeat_interleave(64, 1)
    assert torch.equal(layer.dequantize_weight(), expected)
    rebuilt = QuantLinear.from_layout(layer.layout(), torch.float16)
    rebuilt.load_state_dict(layer.state_dict(), assign=True)
    assert rebuilt.zeros.dtype == torch.float16 and torch.equal(rebuilt.dequantize_weight(), expected)
    x = torch.randn(2, 128)
    reference = layer(x)
    layer.use_kernel("int4pack")
    assert torch.allclose(layer(x), reference, atol=0.05 * float(reference.abs().max()), rtol=0)
    with pytest.raises(InvalidSpecError, match="zero-point dtype"):
        QuantLinear.from_layout({**layer.layout(), "zero_dtype": "int4"}, torch.float16)


def test_codebook_specs_are_validated():
    assert QuantSpec(bits=4, symmetric=False, group_size=64, codebook="nf4").symmetric is True
    assert NF4_G64.describe() == "nf4 g64" and NF4_G64.to_dict()["codebook"] == "nf4"
    assert "codebook" not in QuantSpec(bits=4, group_size=64).to_dict()  # integer grids read as before
    for bad, match in (
        (dict(bits=3, codebook="nf4"), "4-bit"),
        (dict(bits=4, codebook="nf4", clip="mse"), "absmax"),
        (dict(bits=4, codebook="af4"), "codebook must be"),
        (dict(bits=4, codebook="fp4", granularity="tensor"), "per-group"),
    ):
        with pytest.raises(InvalidSpecError, match=match):
            QuantSpec(**bad)
    with pytest.raises(InvalidSpecError, match="weight-only"):
        QuantLinear(64, 8, NF4_G64, act_bits=8)
    for method in ("rtn", "gptq"):  # refused with the settings, before any calibration work
        with pytest.raises(InvalidSpecError, match="drop --a-bits"):
            parse_recipe([{"method": method, "codebook": "nf4", "act_bits": 8}])
    with pytest.raises(InvalidSpecError, match="QAT trains integer grids"):
        QATConfig(weight=NF4_G64)


def test_checkpoints_with_the_new_layouts_say_format_3_and_plain_ones_stay_2(tmp_path):
    plain = quantlm.save(quantlm.quantize(tiny_model("llama"), [RTN()], progress=False), tmp_path / "rtn")
    nf4 = quantlm.save(quantlm.quantize(tiny_model("llama"), [NF4()], progress=False), tmp_path / "nf4")
    versions = [
        json.loads((p / "config.json").read_text())["quantization_config"]["format_version"] for p in (plain, nf4)
    ]
    assert versions == [2, 3]


def test_gptq_on_the_nf4_grid_beats_rounding_on_its_objective():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=g)
    x = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g) * 0.3
    hessian = 2 * x.T @ x / x.shape[0]
    result = gptq_quantize(w, hessian, NF4_G64, act_order=True, static_groups=True)
    rounded = QuantLinear.from_weight(w, NF4_G64).dequantize_weight()

    def output_error(q):
        d = q - w
        return float(torch.einsum("oi,ij,oj->", d, hessian, d))

    assert output_error(result.dequantized) < 0.8 * output_error(rounded)
    levels = codebook_levels("nf4")
    on_grid = levels[result.codes.long()] * result.scale.repeat_interleave(64, 1)
    assert torch.allclose(on_grid, result.dequantized, atol=1e-6)


def _ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "step,spec_text,tolerance",
    [
        (NF4(double_quant=True), "nf4 g64 fit dq", 0.6),  # tiny random models amplify 4-bit errors
        (FP4(QuantSpec(bits=4, group_size=32, codebook="fp4")), "fp4 g32", 0.6),
        (Int8WeightOnly(), "w8 per-channel sym", 0.05),
    ],
)
def test_calibration_free_methods_quantize_save_and_load(tmp_path, step, spec_text, tolerance):
    model = tiny_model("llama")
    ids = _ids()
    with torch.no_grad():
        reference = model(ids).logits
    quantlm.quantize(model, [step], progress=False)
    record = model.quantlm_record.log[0]
    assert record["details"]["spec"] == spec_text and record["method"] == step.name
    with torch.no_grad():
        quantized = model(ids).logits
    out = quantlm.save(model, tmp_path / step.name, tokenizer=byte_tokenizer())
    loaded = quantlm.load(out)
    with torch.no_grad():
        logits = loaded(ids).logits
    assert torch.allclose(logits, quantized, atol=1e-4, rtol=1e-4)
    assert float((logits - reference).norm() / reference.norm()) < tolerance
    kernels = set(loaded.quantlm_kernels.values())
    assert kernels == ({"int8pack"} if step.name == "int8-weight-only" else {"codebook"})
    assert parse_recipe(json.loads((out / "config.json").read_text())["quantization_config"]["recipe"]).steps == [step]


def test_gptq_with_a_codebook_flag_runs_end_to_end(tmp_path):
    model = tiny_model("llama")
    quantlm.quantize(model, [GPTQ(QuantSpec(bits=4, group_size=32, codebook="nf4"))], _ids(), progress=False)
    assert model.quantlm_record.log[0]["details"]["spec"] == "nf4 g32"


def test_load_time_quantization_equals_the_saved_checkpoint(tmp_path):
    source = tmp_path / "float"
    tiny_model("llama").save_pretrained(source)
    byte_tokenizer().save_pretrained(source)
    at_load = quantlm.load(source, quantize="nf4", progress=False)
    saved = quantlm.save(quantlm.quantize(tiny_model("llama"), [NF4()], progress=False), tmp_path / "nf4")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(at_load(ids).logits, quantlm.load(saved)(ids).logits)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps([{"method": "nf4", "double_quant": True}]))
    assert parse_recipe(quantlm.load(source, quantize=str(recipe), progress=False).quantlm_record.recipe).steps == [
        NF4(double_quant=True)
    ]
    for bad, match in (("gptq", "needs calibration"), ("bogus", "unknown method")):
        with pytest.raises(QuantlmError, match=match):
            quantlm.load(source, quantize=bad)
    with pytest.raises(QuantlmError, match="quantized checkpoint already"):
        quantlm.load(saved, quantize="nf4")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "nf4", "--bits", "3"], "4-bit codes"),
        (["--method", "nf4", "--codebook", "fp4"], "use --method fp4"),
        (["--method", "int8-weight-only", "--bits", "4"], "use --method rtn"),
    ],
)
def test_cli_refuses_bad_codebook_settings_in_one_line(tiny_model_dir, tmp_path, args, message):
    result = CliRunner().invoke(app, ["quantize", str(tiny_model_dir), *args, "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cli_quantizes_nf4_with_double_quant_and_evaluates_at_load(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "nf4"
    result = CliRunner().invoke(
        app, ["quantize", str(tiny_model_dir), "--method", "nf4", "--double-quant", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert all(m["double_quant"] and m["codebook"] == "nf4" for m in modules.values())
    common = ["--data", str(text_file), "--max-windows", "1", "--seqlen", "32", "--dtype", "float32", "--json"]
    saved = CliRunner().invoke(app, ["eval", str(out), *common])
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"method": "nf4", "double_quant": True}))
    at_load = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "--quantize", str(recipe), *common])
    assert saved.exit_code == 0 and at_load.exit_code == 0, saved.output + at_load.output
    ppl = [json.loads(r.stdout)["ppl"] for r in (saved, at_load)]
    assert ppl[0] == ppl[1]
    # quantlm report keeps a load-time quantization apart from the float model's own measurements
    assert json.loads(at_load.stdout)["model"] == f"{tiny_model_dir} --quantize {recipe}"
