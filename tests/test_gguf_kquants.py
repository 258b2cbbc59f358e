"""llama.cpp's K-quants: the super-block grid (checked against a slow obvious version), the block layouts (the
``gguf`` package's dequantization is the oracle, both ways), GPTQ on the grid, and ``--target-format``'s choice of
types (llama-quantize's Q4_K_M rules and fallbacks). llama.cpp itself runs these files in test_export_clients.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import tiny_model
from quantlm.api import quantize, save
from quantlm.cli import app
from quantlm.core import QuantSpec, compute_qparams, dequantize
from quantlm.core import quantize as round_codes
from quantlm.core.superblock import factor, superblock_grid, top_code
from quantlm.errors import InvalidSpecError, QuantlmError
from quantlm.formats.exchange import export_checkpoint
from quantlm.formats.gguf import why_not
from quantlm.formats.gguf_blocks import GRIDS, SUPER_BLOCK_BYTES, block_bytes, layer_from_blocks
from quantlm.formats.gguf_targets import describe_types, layer_types, use_more_bits
from quantlm.formats.native import load_checkpoint, quantized_modules
from quantlm.methods.gptq import gptq_quantize
from quantlm.nn.qlinear import QuantLinear

K_TYPES = list(SUPER_BLOCK_BYTES)


def slow_superblock_grid(scale, zero, spec):
    """One super-block at a time, one group at a time, as the K-quant docs describe it (fp32 scalars)."""
    per = 256 // spec.group_size
    top = torch.tensor(float(top_code(spec)))
    s_out, z_out = scale.clone(), zero.clone()
    for r in range(scale.shape[0]):
        for b in range(0, scale.shape[1], per):
            s = scale[r, b : b + per]
            d = (s.max() / top).half().float()
            for j in range(per):
                s_out[r, b + j] = torch.round(s[j] / d).clamp(1, top) * d
            if not spec.symmetric:
                o = zero[r, b : b + per] * s
                dmin = (o.max() / top).half().float()
                for j in range(per):
                    z_out[r, b + j] = (torch.round(o[j] / dmin).clamp(0, top) * dmin) / s_out[r, b + j]
    return s_out, z_out


@pytest.mark.parametrize("kind", K_TYPES)
def test_superblock_grid_is_the_slow_obvious_one(kind):
    spec = GRIDS[kind]
    w = torch.randn(6, 512, generator=torch.Generator().manual_seed(1)) * 0.05
    raw = QuantSpec(bits=spec.bits, symmetric=spec.symmetric, group_size=spec.group_size)
    s0, z0 = compute_qparams(w, raw)
    s, z = superblock_grid(s0, z0, spec)
    want_s, want_z = slow_superblock_grid(s0, z0, spec)
    assert torch.equal(s, want_s)
    assert torch.equal(z, want_z)
    assert torch.equal(compute_qparams(w, spec)[0], s)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(K_TYPES),
    rows=st.integers(1, 4),
    blocks=st.integers(1, 2),
    log_scale=st.floats(-6, 2),
    seed=st.integers(0, 2**16),
)
def test_superblock_scales_are_codes_times_one_fp16_factor(kind, rows, blocks, log_scale, seed):
    """Every scale of a super-block is a code in [1, top] times one fp16 number, every offset a code in [0, top]
    times another; the zero point is offset / scale, the codes stay on the grid and round as the zero says."""
    spec = GRIDS[kind]
    w = torch.randn(rows, 256 * blocks, generator=torch.Generator().manual_seed(seed)) * 10**log_scale
    s, z = compute_qparams(w, spec)
    per = 256 // spec.group_size
    top = top_code(spec)
    scales = factor(s.view(rows, blocks, per), 1, top)
    assert scales is not None
    if not spec.symmetric:
        offsets = factor((z * s).view(rows, blocks, per), 0, top, lambda d, m: (m * d) / s.view_as(m) == z.view_as(m))
        assert offsets is not None
    codes = round_codes(w, s, z, spec)
    assert int(codes.max()) <= spec.maxq
    back = dequantize(codes, s, z, spec)
    # within half a step of the grid, or clipped at its ends
    step = s.repeat_interleave(spec.group_size, dim=1)
    low = (0 - z).repeat_interleave(spec.group_size, dim=1) * step
    high = (spec.maxq - z).repeat_interleave(spec.group_size, dim=1) * step
    inside = (w >= low) & (w <= high)
    assert bool(((w - back).abs()[inside] <= step[inside] * 0.5 * (1 + 1e-5)).all())


def test_scale_bits_needs_groups_of_16_or_32():
    with pytest.raises(InvalidSpecError, match="groups of 16 or 32"):
        QuantSpec(bits=4, group_size=64, scale_bits=6)
    with pytest.raises(InvalidSpecError, match="groups of 16 or 32"):
        QuantSpec(bits=4, group_size=-1, scale_bits=6)
    with pytest.raises(QuantlmError, match="whole 256-column super-blocks"):
        compute_qparams(torch.randn(4, 96), GRIDS["Q4_K"])
    assert QuantSpec.from_dict(GRIDS["Q4_K"].to_dict()) == GRIDS["Q4_K"]
    assert GRIDS["Q6_K"].describe() == "w6 g16 sym s8"


@pytest.mark.parametrize("kind", K_TYPES)
def test_k_blocks_are_the_layer(kind):
    """quantlm's K-quant layer written as blocks: the gguf package dequantizes them to quantlm's weight (exactly
    for the symmetric types, to fp32 rounding where an offset is subtracted), and they read back bit for bit."""
    import gguf

    w = torch.randn(8, 512, generator=torch.Generator().manual_seed(2)) * 0.05
    layer = QuantLinear.from_weight(w, GRIDS[kind])
    assert why_not(layer) is None
    data, written = block_bytes(layer)
    assert written == kind and data.shape == (8, 2 * SUPER_BLOCK_BYTES[kind])
    got = torch.from_numpy(gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, kind)))
    want = layer.dequantize_weight()
    tolerance = 0.0 if GRIDS[kind].symmetric else 2e-7 * want.abs().max().item()
    assert (got - want).abs().max().item() <= tolerance
    back = layer_from_blocks(data, kind, 8, 512)
    assert torch.equal(back.codes(), layer.codes())
    assert torch.equal(back.scales, layer.scales)
    assert torch.equal(back.zeros, layer.zeros)


@pytest.mark.parametrize("kind", K_TYPES)
def test_k_blocks_of_other_tools_read_and_write_back(kind):
    """Any bytes (signed scale codes, scales of 0) read as a layer whose weight is the gguf package's; written
    again, they dequantize to the same numbers, or the layer is refused in one line where a group is a constant
    offset (scale 0) that quantlm holds on a grid of its own."""
    import gguf

    rng = np.random.default_rng(3)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    blocks = rng.integers(0, 256, (4, 2, SUPER_BLOCK_BYTES[kind]), dtype=np.uint8)
    fp16 = np.frombuffer(rng.uniform(1e-4, 1e-2, (4, 2, 2)).astype(np.float16).tobytes(), np.uint8).reshape(4, 2, 4)
    d_at = {"Q2_K": 80, "Q3_K": 108, "Q6_K": 208}.get(kind, 0)  # where d (and dmin) sit in the block
    blocks[..., d_at : d_at + (2 if GRIDS[kind].symmetric else 4)] = fp16[..., : 2 if GRIDS[kind].symmetric else 4]
    data = blocks.reshape(4, -1)
    want = torch.from_numpy(gguf.quants.dequantize(data, qtype))
    layer = layer_from_blocks(data, kind, 4, 512)
    tolerance = 0.0 if GRIDS[kind].symmetric else 2e-7 * want.abs().max().item()
    assert (layer.dequantize_weight() - want).abs().max().item() <= tolerance
    problem = why_not(layer)
    if problem is None:
        again = torch.from_numpy(gguf.quants.dequantize(block_bytes(layer)[0], qtype))
        assert (again - want).abs().max().item() <= tolerance
    else:
        assert not GRIDS[kind].symmetric and "not Q" in problem and "\n" not in problem


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_gptq_on_the_k_grid_keeps_the_grid_and_beats_rounding(kind):
    """GPTQ's codes on a super-block grid: the layer is writable as the K type, and its output error on the
    calibration inputs is below round-to-nearest's on the same grid."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 512, generator=g) * 0.05
    x = torch.randn(1024, 64, generator=g) @ torch.randn(64, 512, generator=g) + 0.1 * torch.randn(
        1024, 512, generator=g
    )
    hessian = 2 * x.T @ x / x.shape[0]
    spec = GRIDS[kind]
    for static in (True, False):
        result = gptq_quantize(w, hessian, spec, static_groups=static, act_order=static)
        layer = QuantLinear.from_codes(result.codes, result.scale, result.zero, spec)
        assert why_not(layer) is None
        rtn = QuantLinear.from_weight(w, spec).dequantize_weight()
        gptq_error = ((layer.dequantize_weight() - w) @ x.T).norm()
        assert gptq_error < 0.9 * ((rtn - w) @ x.T).norm()


def test_q4_k_m_types_follow_llama_quantize():
    """Q4_K_M: attn_v and ffn_down in Q6_K on use_more_bits layers, Q4_K elsewhere; rows that are not whole
    super-blocks fall back as llama.cpp does (Q4_K -> Q5_0, Q6_K -> Q8_0)."""
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    layer = {"self_attn.q_proj": 576, "self_attn.v_proj": 576, "mlp.down_proj": 1536}
    types = layer_types([layer] * 30, "gguf-q4_k_m")
    assert types[(0, "self_attn.q_proj")] == "Q5_0"
    assert types[(0, "self_attn.v_proj")] == "Q8_0" and types[(3, "self_attn.v_proj")] == "Q5_0"
    assert types[(0, "mlp.down_proj")] == "Q6_K" and types[(3, "mlp.down_proj")] == "Q4_K"
    assert layer_types([{"mlp.up_proj": 512}], "gguf-q3_k") == {(0, "mlp.up_proj"): "Q3_K"}
    assert layer_types([{"mlp.up_proj": 520}], "gguf-q3_k") == {(0, "mlp.up_proj"): None}  # not even Q4_0 fits
    assert describe_types(types, [layer] * 30, "gguf-q4_k_m") == (
        "gguf-q4_k_m: 46 x Q5_0 (for Q4_K: 576 input columns), 14 x Q8_0 (for Q6_K: 576 input columns), "
        "14 x Q6_K, 16 x Q4_K"
    )
    with pytest.raises(QuantlmError, match="unknown --target-format"):
        layer_types([layer], "gguf-q9_k")
    with pytest.raises(QuantlmError, match="llama decoder blocks"):
        layer_types([{"attn.c_attn": 512}], "gguf-q4_0")


def test_target_format_quantizes_each_layer_on_its_types_grid(tmp_path):
    """--target-format gguf-q4_k_m splits the weight step per grid; the export holds each Linear in the type
    llama-quantize gives it."""
    import gguf

    from quantlm.formats.gguf_targets import target_recipe
    from quantlm.methods.recipe import parse_recipe
    from test_export import bpe_tokenizer

    model = tiny_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=8)
    recipe = target_recipe(parse_recipe([{"method": "rtn", "exclude": ["k_proj"]}]), model, "gguf-q4_k_m")
    path = save(quantize(model, recipe, None, progress=False), tmp_path / "q4km", tokenizer=bpe_tokenizer())
    layers = quantized_modules(load_checkpoint(path))
    assert not any(name.endswith("k_proj") for name in layers)  # the user's exclusion holds in every step
    out = export_checkpoint(path, tmp_path / "q4km.gguf", format="gguf")
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    for i in range(8):
        more = "Q6_K" if use_more_bits(i, 8) else "Q4_K"
        assert written[f"blk.{i}.attn_v.weight"] == more and written[f"blk.{i}.ffn_down.weight"] == more
        assert written[f"blk.{i}.attn_q.weight"] == "Q4_K" and written[f"blk.{i}.attn_k.weight"] == "F32"


def test_target_format_cli_refuses_grid_flags_and_other_methods(tmp_path, tiny_model_dir):
    runner = CliRunner()
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "-o", str(out), "--target-format", "gguf-q4_0"])
    assert result.exit_code == 0, result.output
    assert {m.spec.describe() for m in quantized_modules(load_checkpoint(out)).values()} == {"w4 g32 sym"}
    for extra, message in [
        (["--bits", "4"], "drop --bits"),
        (["--codebook", "nf4"], "drop --codebook"),
        (["--method", "hqq"], "rtn or gptq alone"),
        (["--method", "smoothquant"], "rtn or gptq alone"),
        (["--a-bits", "8"], "drop --a-bits"),
        (["--lm-head"], "drop --lm-head"),
        (["--method", "gptq", "--no-static-groups"], "drop --no-static-groups"),
        (["--target-format", "gguf-q7"], "unknown --target-format"),
    ]:
        args = ["quantize", str(tiny_model_dir), "-o", str(tmp_path / "x"), "--target-format", "gguf-q4_0", *extra]
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, result.output


def test_an_all_zero_group_does_not_size_its_super_block():
    """A group of zeros (pruned, padded, a dead input GPTQ zeroed) is held exactly and leaves the factor of its
    super-block to the other groups."""
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(5)) * 0.02
    for kind in ("Q4_K", "Q2_K", "Q6_K"):
        spec = GRIDS[kind]
        x = w.clone()
        x[:, : spec.group_size] = 0
        error = (QuantLinear.from_weight(x, spec).dequantize_weight() - x).norm() / x.norm()
        first_nonzero = x.clone()
        first_nonzero[:, : spec.group_size] = w[:, : spec.group_size] * 1e-3  # nearly zero: no made-up range
        reference = (QuantLinear.from_weight(first_nonzero, spec).dequantize_weight() - first_nonzero).norm()
        assert error <= 1.05 * reference / first_nonzero.norm()
        assert not QuantLinear.from_weight(x, spec).dequantize_weight()[:, : spec.group_size].any()


@pytest.mark.parametrize("offset", [0.0, 0.25])
def test_constant_groups_of_other_tools_read_and_write_back(offset):
    """llama.cpp stores a group of one value as scale code 0 (and min code m): read as codes 0 on (0 - 1) * offset
    (zero point 0 where the offset is 0 too), written back as scale code 0."""
    import gguf

    w = torch.randn(2, 256, generator=torch.Generator().manual_seed(6)) * 0.05
    layer = QuantLinear.from_weight(w, GRIDS["Q4_K"])
    data, _ = block_bytes(layer)
    blocks = data.copy()
    blocks[:, 4] &= 0b11000000  # scale code of group 0: 0
    if offset == 0.0:
        blocks[:, 8] &= 0b11000000  # min code of group 0: 0
    want = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K))
    back = layer_from_blocks(blocks, "Q4_K", 2, 256)
    assert (back.dequantize_weight() - want).abs().max() <= 2e-7 * want.abs().max()
    assert why_not(back) is None
    again = torch.from_numpy(gguf.quants.dequantize(block_bytes(back)[0], gguf.GGMLQuantizationType.Q4_K))
    assert torch.equal(again, want)


def test_k_quant_checkpoints_are_format_4_and_load_back(tmp_path):
    import json

    from quantlm.formats.gguf_targets import target_recipe
    from quantlm.methods.recipe import parse_recipe

    model = tiny_model("llama", hidden_size=256, intermediate_size=512)
    recipe = target_recipe(parse_recipe([{"method": "rtn"}]), model, "gguf-q6_k")
    quantized = quantize(model, recipe, None, progress=False)
    path = save(quantized, tmp_path / "q6k")
    assert json.loads((path / "config.json").read_text())["quantization_config"]["format_version"] == 4
    loaded = quantized_modules(load_checkpoint(path))
    for name, layer in quantized_modules(quantized).items():
        assert torch.equal(loaded[name].dequantize_weight(), layer.dequantize_weight())
        assert loaded[name].spec == GRIDS["Q6_K"]


def test_k_layers_are_refused_by_the_integer_grid_formats_with_the_reason(tmp_path):
    from quantlm.formats.gguf_targets import target_recipe
    from quantlm.methods.recipe import parse_recipe

    model = tiny_model("llama", hidden_size=256, intermediate_size=512)
    path = save(
        quantize(model, target_recipe(parse_recipe([{"method": "rtn"}]), model, "gguf-q4_k"), None, progress=False),
        tmp_path / "q4k",
    )
    for fmt in ("gptq", "compressed-tensors"):
        with pytest.raises(QuantlmError, match="K-quant grid .* export it as GGUF"):
            export_checkpoint(path, tmp_path / fmt, format=fmt)


def test_target_format_leaves_rows_no_block_type_fits_in_float():
    """A Linear whose input width is not a multiple of 32 fits no block type: llama.cpp writes it F16, quantlm
    leaves it float (and the GGUF export writes it as a float tensor)."""
    from quantlm.formats.gguf_targets import target_recipe
    from quantlm.methods.recipe import parse_recipe

    model = tiny_model("llama", intermediate_size=168)  # down_proj: 168 input columns
    recipe = target_recipe(parse_recipe([{"method": "rtn"}]), model, "gguf-q4_0")
    layers = quantized_modules(quantize(model, recipe, None, progress=False))
    assert layers and not any(name.endswith("down_proj") for name in layers)
