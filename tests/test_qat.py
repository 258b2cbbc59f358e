"""LLM-QAT: fake quantization, the distillation trainer (resume, DDP), conversion, PTQ init, data, the CLI."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import byte_tokenizer, tiny_model
from quantlm import api
from quantlm.cli import app
from quantlm.core import QuantSpec
from quantlm.core.quantizer import compute_qparams, dequantize, expand_to_columns, quantize
from quantlm.errors import CheckpointError, DataSourceError, InvalidSpecError
from quantlm.formats.nested_state import load_nested
from quantlm.methods import GPTQ, RTN
from quantlm.methods.codebook import NF4
from quantlm.methods.qat import QATBits, QATConfig
from quantlm.nn.kv_cache import KVQuantConfig
from quantlm.nn.qlinear import QuantLinear
from quantlm.qat.convert import convert_qat_model
from quantlm.qat.data import (
    GenerationSettings,
    generate_training_data,
    pack_samples,
    parse_greedy_tokens,
    read_samples,
    start_vocabulary,
)
from quantlm.qat.fake_quant import FakeQuantLinear, calibrate_act_steps, fake_quant_linears, prepare_qat
from quantlm.qat.losses import distillation_loss
from quantlm.qat.run import init_from_quantized, run_qat, smooth_model, start_weight
from quantlm.qat.trainer import TrainSettings, cosine_lr, train, window_indices

runner = CliRunner()
W4A8KV4 = QATConfig.from_bits(QATBits(4, 8, 4))


def _windows(n=16, seqlen=32, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- settings
def test_bits_parse_and_validate():
    assert QATBits.parse("4-8-4") == QATBits(4, 8, 4) and str(QATBits(8, 8, 16)) == "8-8-16"
    for bad in ("4-8", "w4a8kv4", "4-9-4", "1-8-8"):
        with pytest.raises(InvalidSpecError):
            QATBits.parse(bad)


# ---------------------------------------------------------------------------------------------- fake quantization
def test_prepare_qat_wraps_every_block_linear_and_leaves_the_head():
    model = prepare_qat(tiny_model("llama"), W4A8KV4)
    names = set(fake_quant_linears(model))
    assert len(names) == 3 * 7 and not any("lm_head" in n for n in names)
    assert model.config._attn_implementation == "quantlm_fake_kv"


@pytest.mark.parametrize("kv,atol", [(16, 1e-5), (4, 5e-3)])
def test_step_zero_is_rtn_with_the_same_activation_and_kv_grids(kv, atol):
    """QAT starts from RTN: the fake-quantized model before training computes what PTQ RTN W4A8 (KV4) does (with
    a 4-bit KV cache, float summation order can flip the odd code: hence the looser bound there)."""
    model = tiny_model("llama")
    ids = _windows(2, 24)
    fake = prepare_qat(copy.deepcopy(model), QATConfig.from_bits(QATBits(4, 8, kv)))
    rtn = api.quantize(
        copy.deepcopy(model),
        [RTN(QuantSpec(bits=4, group_size=-1, symmetric=True), act_bits=8)],
        kv_cache=None if kv == 16 else KVQuantConfig(kv),
        progress=False,
    )
    with torch.no_grad():
        torch.testing.assert_close(fake(ids).logits, rtn(ids).logits, rtol=0, atol=atol)


def test_gradients_reach_weights_through_the_rounding_and_learnable_scales():
    model = prepare_qat(tiny_model("llama"), QATConfig.from_bits("4-8-4", learnable_clip=True))
    model(_windows(2, 16)).logits.pow(2).mean().backward()
    fq = next(iter(fake_quant_linears(model).values()))
    assert fq.weight.grad is not None and fq.weight.grad.abs().sum() > 0
    assert fq.clip_scale.grad is not None and fq.clip_scale.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "a,kv,extra",
    [
        (8, 16, {}),
        (8, 4, {}),
        (8, 16, {"act_clip": "lsq"}),
        (8, 16, {"clip": "stats"}),
        (4, 16, {}),
        (4, 16, {"smooth_alpha": "auto"}),
        (8, 4, {"smooth_alpha": 0.5}),
    ],
    ids=str,
)
def test_conversion_gives_packed_layers_that_compute_what_was_trained(a, kv, extra, tmp_path):
    model = tiny_model("llama")
    config = QATConfig.from_bits(QATBits(4, a, kv), **extra)
    student, _ = run_qat(
        model, None, _windows(), config, TrainSettings(steps=3, batch_size=2, lr=1e-3, dtype="float32"), progress=False
    )
    ids = _windows(2, 24, seed=1)
    prompt = ids[:1, :6]
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=258)
    with torch.no_grad():
        fake = student(ids).logits
        fake_text = student.generate(prompt, **kwargs)
        real = convert_qat_model(student)
        assert not fake_quant_linears(real)
        q = real.get_submodule("model.layers.0.mlp.down_proj")
        assert isinstance(q, QuantLinear) and q.spec.bits == 4 and q.act_bits == a
        assert q.act_granularity == ("tensor" if extra.get("act_clip") == "lsq" else "token")
        if kv == 16:  # with a 4-bit KV cache, summation order can flip the odd code
            torch.testing.assert_close(real(ids).logits, fake, rtol=0, atol=1e-5)
    api.save(real, tmp_path / "q")
    loaded = api.load(tmp_path / "q")
    assert loaded.quantlm_kv_config == (None if kv == 16 else KVQuantConfig(kv))
    assert torch.equal(loaded.generate(prompt, **kwargs), fake_text)


def test_lsq_activation_steps_start_at_lsq_init_and_learn():
    model = tiny_model("llama")
    config = QATConfig.from_bits("4-8-16", act_clip="lsq")
    student = prepare_qat(copy.deepcopy(model), config)
    fq = student.get_submodule("model.layers.0.self_attn.q_proj")
    inputs = []
    hook = fq.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    ids = _windows(2, 16)
    assert calibrate_act_steps(student, ids) == 21
    hook.remove()
    assert torch.allclose(fq.act_step, 2 * inputs[0].abs().mean() / 127**0.5)
    student(ids).logits.pow(2).mean().backward()
    assert fq.act_step.grad is not None and fq.act_step.grad.abs() > 0
    assert "a8 lsq" in repr(fq) and "lsq activations" in config.describe()
    # the steps are trained parameters, saved with the training state
    assert "model.layers.0.self_attn.q_proj.act_step" in dict(student.named_parameters())


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"act_clip": "lsq", "bits": "4-16-4"}, "activation bits"),
        ({"act_clip": "pact"}, "activation clip"),
        ({"clip": "mse"}, "every step"),
        ({"clip": "stats", "symmetric": False}, "symmetric"),
    ],
)
def test_clipping_settings_refused_in_one_line(settings, match):
    settings = dict(settings)
    with pytest.raises(InvalidSpecError, match=match):
        QATConfig.from_bits(settings.pop("bits", "4-8-4"), **settings)


@pytest.mark.parametrize("a,extra", [(6, {}), (4, {"a_symmetric": False}), (4, {"act_clip": "lsq"})], ids=str)
def test_settings_without_integer_kernels_train_but_do_not_convert(a, extra):
    model = prepare_qat(tiny_model("llama"), QATConfig.from_bits(QATBits(4, a, 16), **extra))
    with pytest.raises(InvalidSpecError, match="activation"):
        convert_qat_model(model)


def test_smoothing_keeps_the_float_function_and_searches_for_the_qat_bits():
    model = tiny_model("llama")
    ids = _windows(2, 24)
    config = QATConfig.from_bits("4-4-16", smooth_alpha="auto")
    assert config.smoothing().search_target == (config.weight, 4) and "smoothquant(alpha auto)" in config.describe()
    smoothed = copy.deepcopy(model)
    done = smooth_model(smoothed, config, _windows(), progress=False)
    assert done["windows"] == 16 and set(done["alpha"]) >= {"model.layers.0.input_layernorm"}
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(smoothed.state_dict()[norm], model.state_dict()[norm])
    with torch.no_grad():
        torch.testing.assert_close(smoothed(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert smooth_model(copy.deepcopy(model), W4A8KV4, _windows(), progress=False) is None


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"bits": "4-16-16", "smooth_alpha": 0.5}, "quantized activations"),
        ({"smooth_folds": ("norm",)}, "add --smooth-alpha"),
        ({"smooth_alpha": 1.5}, "alpha must be"),
        ({"smooth_alpha": 0.5, "smooth_folds": ("attn",)}, "fold"),
    ],
)
def test_smoothing_settings_refused_in_one_line(settings, match):
    settings = dict(settings)
    with pytest.raises(InvalidSpecError, match=match):
        QATConfig.from_bits(settings.pop("bits", "4-8-4"), **settings)


def test_a_ptq_start_and_smoothing_are_refused_together():
    model = tiny_model("llama")
    ptq = api.quantize(copy.deepcopy(model), [RTN(QuantSpec(bits=4, group_size=-1, symmetric=True))], progress=False)
    config = QATConfig.from_bits("4-8-16", smooth_alpha=0.5)
    with pytest.raises(InvalidSpecError, match="--init"):
        run_qat(model, None, _windows(), config, TrainSettings(steps=1, batch_size=2), init=ptq, progress=False)


def test_init_from_a_ptq_checkpoint_starts_exactly_there(tmp_path):
    model = tiny_model("llama")
    ids = _windows(2, 24)
    ptq = api.quantize(
        copy.deepcopy(model), [RTN(QuantSpec(bits=4, group_size=-1, symmetric=True, clip="mse"))], progress=False
    )
    student = prepare_qat(copy.deepcopy(model), QATConfig.from_bits(QATBits(4, 16, 16)))
    assert init_from_quantized(student, ptq) == 21
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, ptq(ids).logits, rtol=0, atol=1e-5)
    fq = student.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(fq, FakeQuantLinear) and fq.clip_scale is not None and not fq.learnable_clip
    other = prepare_qat(copy.deepcopy(model), QATConfig.from_bits("4-16-16", group_size=16))
    with pytest.raises(InvalidSpecError, match="same bits"):
        init_from_quantized(other, ptq)
    nf4 = api.quantize(copy.deepcopy(model), [NF4(QuantSpec(bits=4, group_size=16, codebook="nf4"))], progress=False)
    grouped = prepare_qat(copy.deepcopy(model), QATConfig.from_bits("4-16-16", group_size=16))
    with pytest.raises(InvalidSpecError, match="integer grids"):
        init_from_quantized(grouped, nf4)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    columns=st.sampled_from([24, 20]),
    group_size=st.sampled_from([-1, 8]),
    symmetric=st.booleans(),
    bits=st.sampled_from([2, 3, 4, 8]),
)
def test_start_weight_is_the_float_weight_moved_into_the_start_codes_bins(seed, columns, group_size, symmetric, bits):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, columns, generator=g) * torch.rand(6, 1, generator=g)
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    scale, zero = compute_qparams(w * 0.8, spec)  # a clipped grid, as MSE clipping gives: some weights lie outside
    scale = scale.half().float()  # as a checkpoint stores it
    rtn = quantize(w, scale, zero, spec)
    # a start that moves some codes one step away from RTN's, as GPTQ's error compensation does
    moved = torch.randint(-1, 2, w.shape, generator=g) * (torch.rand(w.shape, generator=g) < 0.3)
    codes = (rtn.long() + moved).clamp(0, spec.maxq).to(torch.uint8)
    centre = dequantize(codes, scale, zero, spec)
    assert torch.equal(start_weight(w, centre, scale, spec, "centre"), centre)
    start = start_weight(w, centre, scale, spec, "float")
    assert torch.equal(quantize(start, scale, zero, spec), codes)  # step 0 computes what the start computes
    step = expand_to_columns(scale, spec, columns)
    assert ((start - centre).abs() <= 0.49 * step + 1e-6).all()
    # the point of the bin nearest the float weight: the float weight itself where it lies in the bin's inner 98%
    inside = (w - centre).abs() < 0.49 * step
    assert inside.any() and torch.equal(start[inside], w[inside])
    assert ((start - w).abs() <= (centre - w).abs() + 1e-6).all()  # never farther from it than the centre
    with pytest.raises(InvalidSpecError, match="--init-offsets"):
        start_weight(w, centre, scale, spec, "middle")


@pytest.mark.parametrize("offsets", ["centre", "float"])
def test_init_from_a_gptq_start_keeps_its_codes(offsets):
    model = tiny_model("llama")
    ids = _windows(2, 24)
    spec = QuantSpec(bits=4, group_size=16, symmetric=True, clip="mse")
    ptq = api.quantize(copy.deepcopy(model), [GPTQ(spec)], calibration=_windows(4, 32, seed=1), progress=False)
    student = prepare_qat(copy.deepcopy(model), QATConfig.from_bits("4-16-16", group_size=16))
    assert init_from_quantized(student, ptq, offsets) == 21
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, ptq(ids).logits, rtol=0, atol=1e-5)
    name = "model.layers.0.mlp.down_proj"
    fq, q = student.get_submodule(name), ptq.get_submodule(name)
    scale, zero = (t.detach() for t in fq.grid())
    assert torch.equal(quantize(fq.weight.detach(), scale, zero, fq.spec), q.codes())
    w, centre = model.get_submodule(name).weight, q.dequantize_weight()
    kept = (w - centre).abs() < 0.49 * expand_to_columns(q.scales.float(), spec, w.shape[1])
    assert 0.5 < kept.float().mean() < 1  # GPTQ moved some codes away from the float weights' own roundings
    if offsets == "centre":
        assert torch.equal(fq.weight.detach(), centre)
    else:
        assert torch.equal(fq.weight.detach()[kept], w[kept]) and not torch.equal(fq.weight.detach(), centre)


def test_init_offsets_float_from_an_rtn_start_is_the_float_model():
    """RTN's codes are the float weights' own roundings, so a MinMax RTN start placed at the float offsets is the
    float model, but for the weights within 1% of a step of a bin's edge (or past the grid's end), moved inside."""
    model = tiny_model("llama")
    ptq = api.quantize(copy.deepcopy(model), [RTN(QuantSpec(bits=4, group_size=-1, symmetric=True))], progress=False)
    student = prepare_qat(copy.deepcopy(model), QATConfig.from_bits(QATBits(4, 16, 16)))
    assert init_from_quantized(student, ptq, "float") == 21
    name = "model.layers.0.mlp.up_proj"
    w_float, w_start = model.get_submodule(name).weight.detach(), student.get_submodule(name).weight.detach()
    q = ptq.get_submodule(name)
    beyond = ((w_float - q.dequantize_weight()).abs() - 0.49 * q.scales.float().reshape(-1, 1)).clamp(min=0)
    torch.testing.assert_close((w_start - w_float).abs(), beyond, rtol=0, atol=1e-7)
    assert (w_start == w_float).float().mean() > 0.95


# ---------------------------------------------------------------------------------------------- trainer
def test_distillation_loss_is_smallest_at_the_teacher():
    t = torch.randn(2, 5, 11)
    assert distillation_loss(t, t) < distillation_loss(t + torch.randn_like(t), t)


def test_cosine_schedule_and_data_order():
    s = TrainSettings(steps=10, warmup_steps=2, batch_size=3)
    assert cosine_lr(0, s) < cosine_lr(1, s) < cosine_lr(2, s) == 1.0 and cosine_lr(10, s) == pytest.approx(0.0)
    one = torch.cat([window_indices(20, 0, 0, 0, 1, TrainSettings(steps=2, batch_size=4))])
    two = torch.cat([window_indices(20, 0, 0, r, 2, TrainSettings(steps=2, batch_size=2)) for r in range(2)])
    assert torch.equal(one, two)  # 2 processes x 2 windows = the single process's batch of 4
    assert sorted(
        torch.cat([window_indices(8, st, 0, 0, 1, TrainSettings(steps=4, batch_size=2)) for st in range(4)]).tolist()
    ) == list(range(8))


def test_training_brings_the_student_closer_to_the_teacher():
    model = tiny_model("llama")
    ids = _windows(4, 32, seed=3)

    def kl_to_teacher(student):
        with torch.no_grad():
            t = model(ids).logits
            return float(distillation_loss(student(ids).logits, t) - distillation_loss(t, t))

    config = QATConfig.from_bits(QATBits(2, 8, 4))  # a random tiny model is near uniform: 2 bits make the gap visible
    start = prepare_qat(copy.deepcopy(model), config)
    trained, result = run_qat(
        model, None, _windows(), config, TrainSettings(steps=15, batch_size=4, lr=1e-3, dtype="float32"), progress=False
    )
    assert len(result.losses) == 15 and result.tokens == 15 * 4 * 32
    assert kl_to_teacher(trained) < 0.9 * kl_to_teacher(start)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    model = tiny_model("llama")
    windows = _windows()
    settings = TrainSettings(steps=6, batch_size=2, lr=1e-3, dtype="float32", save_every=3)
    whole, _ = run_qat(model, None, windows, W4A8KV4, settings, progress=False)

    class Stop(Exception):
        pass

    student = prepare_qat(copy.deepcopy(model), W4A8KV4)

    def stop_after_four(step, loss):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        train(student, model, windows, settings, state_dir=tmp_path, on_step=stop_after_four, progress=False)
    resumed = prepare_qat(copy.deepcopy(model), W4A8KV4)
    result = train(resumed, model, windows, settings, state_dir=tmp_path, progress=False)
    assert result.resumed_from == 3 and len(result.losses) == 3
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert (a - b).abs().max() <= 1e-6, (name, float((a - b).abs().max()))
    with pytest.raises(Exception, match="other settings"):
        train(
            prepare_qat(copy.deepcopy(model), W4A8KV4),
            model,
            windows,
            TrainSettings(steps=6, batch_size=2, lr=2e-3, dtype="float32", save_every=3),
            state_dir=tmp_path,
            progress=False,
        )


LSQ_W4A8KV4 = QATConfig.from_bits(QATBits(4, 8, 4), act_clip="lsq")


def _ddp_worker(rank, world, init_file, out_file, fsdp=False, config=W4A8KV4):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = tiny_model("llama")
    student, result = run_qat(
        model,
        model,
        _windows(),
        config,
        TrainSettings(steps=3, batch_size=2, lr=1e-3, dtype="float32", fsdp=fsdp),
        progress=False,
        state_dir=os.path.dirname(out_file),
    )
    if rank == 0:
        torch.save({"weights": student.state_dict(), "tokens": result.tokens}, out_file)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    "fsdp,config", [(False, W4A8KV4), (True, W4A8KV4), (True, LSQ_W4A8KV4)], ids=["ddp", "fsdp", "fsdp-lsq"]
)
def test_two_processes_train_like_one_with_the_same_global_batch(fsdp, config, tmp_path):
    out = tmp_path / "ddp.pt"
    args = (2, str(tmp_path / "init"), str(out), fsdp, config)
    torch.multiprocessing.spawn(_ddp_worker, args=args, nprocs=2, join=True)
    model = tiny_model("llama")
    single, _ = run_qat(
        model,
        model,
        _windows(),
        config,
        TrainSettings(steps=3, batch_size=4, lr=1e-3, dtype="float32"),
        progress=False,
    )
    ddp = torch.load(out)
    assert ddp["tokens"] == 3 * 4 * 32
    saved = load_nested(tmp_path, "train_state")  # gathered whole, also when sharded
    assert saved["step"] == 3 and torch.equal(saved["model"]["lm_head.weight"], ddp["weights"]["lm_head.weight"])
    # Adam's normalized steps turn summation-order noise in near-zero gradients into full-size steps of either
    # sign, so a few entries differ by up to ~lr; all but a sliver must agree to 1e-5.
    diff = torch.cat([(ddp["weights"][n] - t).abs().flatten() for n, t in single.state_dict().items()])
    assert float((diff > 1e-5).float().mean()) < 0.01, float((diff > 1e-5).float().mean())


class _Payload:
    """What a planted pickle would run on load: it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_a_planted_pickle_in_the_work_directory_is_never_loaded(tmp_path):
    import pickle

    marker = tmp_path / "payload-ran"
    (tmp_path / "train_state.pt").write_bytes(pickle.dumps({"step": 2, "x": _Payload(marker)}))
    model = tiny_model("llama")
    settings = TrainSettings(steps=2, batch_size=2, lr=1e-3, dtype="float32", save_every=1)
    student = prepare_qat(copy.deepcopy(model), W4A8KV4)
    result = train(student, model, _windows(), settings, state_dir=tmp_path, progress=False)
    assert not marker.exists() and result.resumed_from == 0  # the pickle was ignored, not run
    assert sorted(p.suffix for p in tmp_path.glob("train_state.*")) == [".json", ".pt", ".safetensors"]


def test_a_damaged_training_state_is_a_one_line_error(tmp_path):
    model = tiny_model("llama")
    settings = TrainSettings(steps=2, batch_size=2, lr=1e-3, dtype="float32", save_every=1)
    train(prepare_qat(copy.deepcopy(model), W4A8KV4), model, _windows(), settings, state_dir=tmp_path, progress=False)
    (tmp_path / "train_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read the state in .*train_state.json.*delete it to start over"):
        train(
            prepare_qat(copy.deepcopy(model), W4A8KV4), model, _windows(), settings, state_dir=tmp_path, progress=False
        )


def test_nested_state_round_trips_without_pickle(tmp_path):
    from quantlm.formats.nested_state import save_nested

    shared = torch.arange(6.0)
    state = {
        "step": 3,
        "model": {"a": shared, "tied": shared, "half": torch.ones(2, dtype=torch.bfloat16)},
        "optimizer": {
            "state": {0: {"exp_avg": torch.zeros(3)}},
            "param_groups": [{"betas": (0.9, 0.999), "params": [0], "lr": 1e-3}],
        },
        "scheduler": {"last_epoch": 3, "lr_lambdas": [None], "max": float("inf")},
        "view": shared[2:4],
    }
    save_nested(tmp_path, "s", state)
    save_nested(tmp_path, "s", state)  # a second save replaces the first and removes its tensor file
    back = load_nested(tmp_path, "s")
    assert len(list(tmp_path.glob("s.*.safetensors"))) == 1
    assert back["optimizer"]["state"][0]["exp_avg"].shape == (3,) and back["optimizer"]["param_groups"][0]["betas"] == (
        0.9,
        0.999,
    )
    assert torch.equal(back["model"]["tied"], shared) and back["model"]["half"].dtype == torch.bfloat16
    assert torch.equal(back["view"], shared[2:4]) and back["scheduler"]["max"] == float("inf")
    with pytest.raises(CheckpointError, match="cannot store a object"):
        save_nested(tmp_path, "bad", {"x": object()})


# ---------------------------------------------------------------------------------------------- data
def _generate(tmp_path, name="gen.jsonl", **kw):
    settings = GenerationSettings(**{"n_samples": 6, "max_length": 12, "batch_size": 2, **kw})
    model, tok = tiny_model("llama"), byte_tokenizer()
    return generate_training_data(model, tok, tmp_path / name, settings, progress=False), model, tok


def test_generated_samples_start_randomly_then_follow_the_model(tmp_path):
    path, model, tok = _generate(tmp_path, greedy_tokens=(3, 3))
    samples = read_samples(path)
    assert len(samples) == 6 and all(2 <= len(s) <= 12 for s in samples)
    special = set(tok.all_special_ids)
    assert not any(s[0] in special for s in samples)
    with torch.no_grad():
        for s in samples:
            logits = model(torch.tensor([s[:4]])).logits[0]
            assert logits[:3].argmax(-1).tolist() == s[1:4]  # tokens 1-3 are top-1


def test_generation_is_deterministic_and_resumes_without_duplicates(tmp_path):
    path, _, _ = _generate(tmp_path, "a.jsonl")
    whole = path.read_text()
    lines = whole.splitlines(keepends=True)
    broken = tmp_path / "b.jsonl"
    broken.write_text("".join(lines[:3]) + lines[3][:7])  # killed in the middle of the second batch
    (tmp_path / "b.jsonl.meta.json").write_text((tmp_path / "a.jsonl.meta.json").read_text())
    _generate(tmp_path, "b.jsonl")
    assert broken.read_text() == whole
    with pytest.raises(DataSourceError, match="other settings"):
        _generate(tmp_path, "a.jsonl", mode="sample")


def test_more_samples_extend_the_file_to_what_a_fresh_run_writes(tmp_path, monkeypatch):
    fresh = _generate(tmp_path, "fresh.jsonl", n_samples=9)[0].read_text()
    grown = _generate(tmp_path, "grown.jsonl", n_samples=5)[0]  # batches of 2: the last one holds 1 sample
    five = grown.read_text()
    assert len(five.splitlines()) == 5 and fresh.startswith("".join(five.splitlines(keepends=True)[:4]))

    def no_generation(*args, **kwargs):
        raise AssertionError("a finished file was generated again")

    with monkeypatch.context() as m:
        m.setattr("quantlm.qat.data.generate_batch", no_generation)
        _generate(tmp_path, "grown.jsonl", n_samples=5)  # finished, even with a partial last batch
    assert grown.read_text() == five
    _generate(tmp_path, "grown.jsonl", n_samples=9)
    assert grown.read_text() == fresh
    assert json.loads((tmp_path / "grown.jsonl.meta.json").read_text())["settings"]["n_samples"] == 9
    with pytest.raises(DataSourceError, match="already holds 9 samples, more than --samples 4"):
        _generate(tmp_path, "grown.jsonl", n_samples=4)
    assert grown.read_text() == fresh


def test_generation_modes_and_helpers(tmp_path):
    greedy, model, _ = _generate(tmp_path, "g.jsonl", mode="greedy")
    with torch.no_grad():
        for s in read_samples(greedy):
            assert model(torch.tensor([s])).logits[0, :-1].argmax(-1).tolist() == s[1:]
    assert parse_greedy_tokens("3-5") == (3, 5) and parse_greedy_tokens("4") == (4, 4)
    with pytest.raises(InvalidSpecError):
        GenerationSettings(greedy_tokens=(5, 3))
    assert pack_samples([[1, 2, 3], [4, 5, 6, 7]], 3).tolist() == [[1, 2, 3], [4, 5, 6]]
    assert 256 not in start_vocabulary(byte_tokenizer(), 260).tolist()


# ---------------------------------------------------------------------------------------------- CLI
def test_generate_data_then_qat_from_the_cli(tiny_model_dir, tmp_path):
    data = tmp_path / "gen.jsonl"
    r = runner.invoke(
        app,
        [
            "generate-data",
            str(tiny_model_dir),
            "--samples",
            "8",
            "--max-length",
            "40",
            "--batch-size",
            "4",
            "--dtype",
            "float32",
            "--out",
            str(data),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["samples"] == 8
    out = tmp_path / "q"
    r = runner.invoke(
        app,
        [
            "qat",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seqlen",
            "16",
            "--dtype",
            "float32",
            "--out",
            str(out),
            "--eval",
            "--max-windows",
            "1",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["bits"] == "4-8-4" and summary["training"]["steps"] == 2 and summary["ppl"] > 1
    assert not (tmp_path / ".q.work").exists()
    r = runner.invoke(app, ["qat", str(tiny_model_dir), "--data", str(data), "--out", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output
    r = runner.invoke(app, ["qat", str(tiny_model_dir), "--a-bits", "6", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--a-bits 8, 4 or 16" in r.output
    smoothed = tmp_path / "w4a4"
    args = ["qat", str(tiny_model_dir), "--data", str(data), "--steps", "1", "--batch-size", "2", "--seqlen", "16"]
    args += ["--a-bits", "4", "--kv-bits", "16", "--smooth-alpha", "auto", "--out", str(smoothed), "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["bits"] == "4-4-16" and summary["recipe"][0]["smooth_alpha"] == "auto"
    smoothing = summary["training"]["smoothing"]
    assert smoothing["step"] == "smoothquant(alpha auto)" and len(smoothing["alpha"]) == 3 * 4  # 3 blocks, 4 folds
    layers = api.quantized_modules(api.load(smoothed))
    assert len(layers) == 21 and all(q.act_bits == 4 for q in layers.values())
    r = runner.invoke(
        app, ["qat", str(tiny_model_dir), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "y")]
    )
    assert r.exit_code == 2 and "generate-data" in r.output
