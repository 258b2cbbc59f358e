"""GPTQ through the layer-wise pipeline: true-sequential groups, shared Hessians, checkpoints with g_idx."""

from __future__ import annotations

import pytest
import torch

import quantlm
from conftest import VOCAB, tiny_model
from quantlm.core import QuantSpec
from quantlm.methods import GPTQ, RTN
from quantlm.models.blocks import find_decoder_blocks
from quantlm.nn import QuantLinear
from quantlm.pipeline import BlockContext, capture_block_inputs


def _ids(n=8, seqlen=32, seed=1):
    return torch.randint(0, VOCAB - 4, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "family,expected",
    [
        ("llama", [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
        ("gpt2", [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]),
        ("phi3", [["qkv_proj"], ["o_proj"], ["gate_up_proj"], ["down_proj"]]),
        ("opt", [["q_proj", "k_proj", "v_proj"], ["out_proj"], ["fc1"], ["fc2"]]),
    ],
)
def test_linears_are_grouped_by_shared_input_in_execution_order(family, expected):
    model = tiny_model(family)
    blocks = find_decoder_blocks(model)
    ctx = BlockContext(model, blocks, 1, capture_block_inputs(model, blocks, _ids(), batch_size=4))
    groups = ctx.input_groups(ctx.linears())
    relative = [
        [n.removeprefix(ctx.name + ".").removeprefix("self_attn.").removeprefix("mlp.") for n in g] for g in groups
    ]
    if family == "gpt2":
        relative = [[n.removeprefix(ctx.name + ".") for n in g] for g in groups]
    assert relative == expected


def test_observe_stops_the_block_early():
    model = tiny_model("llama")
    blocks = find_decoder_blocks(model)
    ctx = BlockContext(model, blocks, 0, capture_block_inputs(model, blocks, _ids(), batch_size=4))
    calls = []
    handle = ctx.block.mlp.down_proj.register_forward_hook(lambda *a: calls.append(1))
    seen = []
    ctx.observe({"q": ctx.block.self_attn.q_proj}, lambda n, x: seen.append(x.shape))
    assert seen == [(4, 32, 64), (4, 32, 64)] and calls == []
    ctx.observe({"down": ctx.block.mlp.down_proj}, lambda n, x: seen.append(x.shape))
    assert seen[-1] == (4, 32, 160) and len(calls) == 0  # stopped before down_proj itself ran
    ctx.observe({"q": ctx.block.self_attn.q_proj}, lambda n, x: None, stop_early=False)
    assert len(calls) == 2
    handle.remove()


def _logit_error(model, reference, ids):
    with torch.no_grad():
        a, b = model(ids).logits, reference(ids).logits
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gptq_beats_rtn_on_the_model_output(family):
    calib = _ids(16, 64)
    spec = QuantSpec(bits=3, group_size=16)
    reference = tiny_model(family)
    rtn = quantlm.quantize(tiny_model(family), RTN(spec), progress=False)
    gptq = quantlm.quantize(tiny_model(family), GPTQ(spec), calibration=calib, progress=False)
    assert _logit_error(gptq, reference, calib) < 0.85 * _logit_error(rtn, reference, calib)
    held_out = _ids(4, 64, seed=7)
    assert _logit_error(gptq, reference, held_out) < _logit_error(rtn, reference, held_out)
    records = gptq.quantlm_record.log
    n_linears = sum(isinstance(m, QuantLinear) for m in gptq.modules())
    assert len(records) == n_linears
    assert all(r["details"]["hessian_tokens"] == 16 * 64 and r["details"]["damp"] == 0.01 for r in records)


def test_true_sequential_changes_what_later_groups_see():
    calib = _ids(8, 32)
    spec = QuantSpec(bits=3, group_size=16)
    seq = quantlm.quantize(tiny_model("llama"), GPTQ(spec), calibration=calib, progress=False)
    par = quantlm.quantize(tiny_model("llama"), GPTQ(spec, true_sequential=False), calibration=calib, progress=False)
    q_seq = seq.model.layers[0].self_attn.q_proj.qweight
    assert torch.equal(q_seq, par.model.layers[0].self_attn.q_proj.qweight)  # first group: same inputs
    assert not torch.equal(seq.model.layers[0].mlp.down_proj.qweight, par.model.layers[0].mlp.down_proj.qweight)


def test_act_order_checkpoint_round_trip(tmp_path):
    calib = _ids(8, 32)
    step = GPTQ(QuantSpec(bits=4, group_size=16), act_order=True, static_groups=False)
    model = quantlm.quantize(tiny_model("llama"), step, calibration=calib, progress=False)
    assert model.model.layers[0].self_attn.q_proj.g_idx is not None
    quantlm.save(model, tmp_path / "ckpt")
    loaded = quantlm.load(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(model(calib).logits, loaded(calib).logits)
    recipe = quantlm.parse_recipe(
        __import__("json").loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]["recipe"]
    )
    assert recipe.steps[0].act_order and recipe.steps[0].spec.group_size == 16


@pytest.mark.parametrize("device_path", ["syrk", "matmul"])
def test_sink_weight_scales_the_first_token_of_each_sequence(device_path, monkeypatch):
    from quantlm.methods import gptq as gptq_module

    if device_path == "matmul":
        monkeypatch.setattr(gptq_module, "_cpu_syrk", lambda: None)
    x = torch.randn(3, 5, 8)
    weighted = gptq_module.HessianAccumulator(8, "cpu", first_token_weight=50.0)
    weighted.add(x)
    rows = x.reshape(-1, 8).double()
    first = x[:, 0].double()
    want = 2.0 / 15 * (rows.T @ rows + 49.0 * first.T @ first)
    assert torch.allclose(weighted.hessian().double(), want, rtol=1e-5, atol=1e-5)
    assert weighted.tokens == 15
    plain = gptq_module.HessianAccumulator(8, "cpu")
    plain.add(x)
    plain.add(x.reshape(-1, 8))  # 2-D inputs have no sequence axis: never weighted
    assert torch.allclose(plain.hessian().double(), 2.0 / 30 * 2 * rows.T @ rows, rtol=1e-5, atol=1e-5)


def test_sink_weight_is_validated_and_kept_in_the_recipe():
    with pytest.raises(quantlm.errors.InvalidSpecError, match="sink_weight"):
        GPTQ(QuantSpec(bits=4, group_size=16), sink_weight=0.5)
    step = GPTQ(QuantSpec(bits=4, group_size=16), sink_weight=30.0)
    again = quantlm.parse_recipe(step.to_config()).steps[0]
    assert again.sink_weight == 30.0 and again.to_config() == step.to_config()


def test_sink_weight_changes_the_attention_solution():
    calib = _ids(8, 32)
    spec = QuantSpec(bits=3, group_size=16)
    plain = quantlm.quantize(tiny_model("llama"), GPTQ(spec, sink_weight=1.0), calibration=calib, progress=False)
    sink = quantlm.quantize(tiny_model("llama"), GPTQ(spec, sink_weight=100.0), calibration=calib, progress=False)
    a, b = plain.model.layers[0].self_attn.q_proj.qweight, sink.model.layers[0].self_attn.q_proj.qweight
    assert not torch.equal(a, b)


def test_default_act_order_with_static_groups_keeps_the_plain_group_layout():
    step = GPTQ(QuantSpec(bits=4, group_size=16))
    assert step.act_order and step.static_groups
    model = quantlm.quantize(tiny_model("llama"), step, calibration=_ids(8, 32), progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.g_idx is None for m in layers)  # column // group size: no runtime reordering
    in_order = quantlm.quantize(
        tiny_model("llama"),
        GPTQ(QuantSpec(bits=4, group_size=16), act_order=False, static_groups=True),
        calibration=_ids(8, 32),
        progress=False,
    )
    q = model.model.layers[0].self_attn.q_proj.qweight
    assert not torch.equal(q, in_order.model.layers[0].self_attn.q_proj.qweight)  # the order did change the solve


def test_hessian_clip_needs_mse_and_is_kept_in_the_recipe():
    with pytest.raises(quantlm.errors.InvalidSpecError, match="clip='mse'"):
        GPTQ(QuantSpec(bits=4, group_size=16), hessian_clip=True)
    step = GPTQ(QuantSpec(bits=4, group_size=16, clip="mse"), hessian_clip=True)
    again = GPTQ.from_config(step.to_config())
    assert again.hessian_clip and again.to_config() == step.to_config()
    older = {k: v for k, v in GPTQ(QuantSpec(bits=4, group_size=16)).to_config().items() if k != "hessian_clip"}
    assert not GPTQ.from_config(older).hessian_clip  # recipes written before the option read the same
