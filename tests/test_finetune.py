"""QAF: LoRA adapters (through peft) on a frozen quantized model, training, resume, save/load, merges, errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import SAMPLE_TEXT, save_tiny_model, tiny_model
from quantlm import api
from quantlm.cli import app
from quantlm.core import QuantSpec
from quantlm.errors import InvalidSpecError, QuantlmError
from quantlm.finetune import LoraSettings, adapter_targets, attach_adapters, finetune, load_adapters, merge_adapters
from quantlm.finetune.adapters import quant_lora_layer
from quantlm.finetune.lora_init import DAMP, initialize_adapters, low_rank_correction, pooling_matrix
from quantlm.finetune.merge import fold_into_zeros
from quantlm.formats.nested_state import load_nested
from quantlm.nn.qlinear import QuantLinear
from quantlm.qat.trainer import TrainSettings, train

runner = CliRunner()
RTN_W4 = {"method": "rtn", "bits": 4, "group_size": 16, "symmetric": False}
FAST = TrainSettings(steps=6, batch_size=2, lr=1e-2, loss="ce", dtype="float32", save_every=3)


def _quantized(recipe=RTN_W4):
    return api.quantize(tiny_model("llama"), recipe, progress=False)


def _windows(n=8, seqlen=32, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _randomize(peft_model, seed=1):
    """Adapters that do something (peft starts B at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture
def quantized_checkpoint(tmp_path):
    src = save_tiny_model(tmp_path / "tiny")
    return api.quantize_to_checkpoint(src, RTN_W4, tmp_path / "q", progress=False)


@pytest.fixture
def domain_file(tmp_path):
    path = tmp_path / "domain.txt"
    path.write_text(SAMPLE_TEXT * 3)
    return path


# ---------------------------------------------------------------------------------------------- the layer
def test_input_gradient_of_a_quantlinear_matches_the_dense_weight_and_saves_no_weight():
    weight = torch.randn(48, 64)
    layer = QuantLinear.from_weight(weight, QuantSpec(bits=4, symmetric=False, group_size=16), bias=torch.randn(48))
    x = torch.randn(5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    y.square().sum().backward()
    dense = layer.dequantize_weight()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, dense, layer.bias).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert all(n < dense.numel() for n in saved), saved  # no dense weight kept from forward to backward
    with torch.no_grad():
        assert torch.equal(layer(x), y)


def test_targets_select_layers_and_unknown_names_are_refused():
    model = tiny_model("llama")
    everything = adapter_targets(model, "all")
    assert len(everything) == 3 * 7
    attn, mlp = adapter_targets(model, "attn"), adapter_targets(model, "mlp")
    assert sorted(attn + mlp) == sorted(everything) and all("self_attn" in n for n in attn)
    assert adapter_targets(model, "q_proj,v_proj") == [n for n in everything if n.endswith(("q_proj", "v_proj"))]
    with pytest.raises(Exception, match="no layer named qkv.*q_proj"):
        adapter_targets(model, "qkv")


@settings(max_examples=12, deadline=None)
@given(
    group=st.sampled_from([8, 16, 24]),
    act_order=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_pooled_adapter_is_its_delta_weight_and_folds_exactly_into_the_zeros(group, act_order, seed):
    g = torch.Generator().manual_seed(seed)
    in_f, out_f = 40, 12  # 40 = 5 x 8, and partial last groups for 16 and 24
    spec = QuantSpec(bits=4, symmetric=True, group_size=group)
    base = QuantLinear.from_weight(torch.randn(out_f, in_f, generator=g), spec)
    if act_order:  # a permuted group assignment, as act-order checkpoints have
        perm = torch.randperm(in_f, generator=g)
        base.g_idx = (perm // group).to(torch.int32)
    from peft import LoraConfig

    layer = quant_lora_layer(True)(base, "default", LoraConfig(r=3, lora_alpha=6, lora_dropout=0.0), r=3, lora_alpha=6)
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_(generator=g)
        layer.lora_B["default"].weight.normal_(generator=g)
    x = torch.randn(7, in_f, generator=g)
    with torch.no_grad():
        expected = x @ (base.dequantize_weight() + layer.get_delta_weight("default")).t()
        assert torch.allclose(layer(x), expected, atol=1e-4)
        merged = fold_into_zeros(layer)
        assert merged.zeros.dtype == torch.float32 and torch.equal(merged.qweight, base.qweight)
        assert torch.allclose(
            merged.dequantize_weight(), base.dequantize_weight() + layer.get_delta_weight("default"), atol=1e-5
        )
        assert torch.allclose(merged(x), expected, atol=1e-4)


def test_pooled_adapters_are_refused_where_nothing_can_hold_them():
    model = api.quantize(tiny_model("llama"), {"method": "nf4", "group_size": 16}, progress=False)
    with pytest.raises(Exception, match="pooled adapters fold into zero points; a nf4 g16 .*has none"):
        attach_adapters(model, LoraSettings(r=2, pooled=True))
    channel = api.quantize(tiny_model("llama"), {"method": "rtn", "bits": 4, "group_size": -1}, progress=False)
    with pytest.raises(Exception, match="one group per row"):
        attach_adapters(channel, LoraSettings(r=2, pooled=True))
    w8a8 = api.quantize(
        tiny_model("llama"), {"method": "rtn", "bits": 8, "group_size": 16, "act_bits": 8}, progress=False
    )
    with pytest.raises(Exception, match="int8-rounded input"):
        attach_adapters(w8a8, LoraSettings(r=2, pooled=True))
    with pytest.raises(Exception, match="float layer"):
        attach_adapters(tiny_model("llama"), LoraSettings(r=2, pooled=True))


# ---------------------------------------------------------------------------------------------- training
def test_adapters_train_the_loss_down_and_leave_the_base_untouched():
    model = _quantized()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    peft_model = attach_adapters(model, LoraSettings(r=4))
    windows = _windows()
    result = train(
        peft_model,
        None,
        windows,
        TrainSettings(steps=12, batch_size=4, lr=1e-2, loss="ce", dtype="float32"),
        progress=False,
        frozen_base=True,
    )
    assert result.losses[-1] < result.losses[0] - 0.2, result.losses
    base = peft_model.get_base_model()
    for name, t in before.items():
        key = (
            name
            if name in base.state_dict()
            else name.replace(name.rsplit(".", 1)[0], name.rsplit(".", 1)[0] + ".base_layer")
        )
        assert torch.equal(base.state_dict()[key], t), name


def test_an_interrupted_run_resumes_to_the_same_adapter_bytes(tmp_path):
    windows = _windows()
    settings_ = TrainSettings(steps=6, batch_size=2, lr=1e-2, loss="ce", dtype="float32", save_every=3)
    lora = LoraSettings(r=4, dropout=0.1)  # dropout draws too must repeat after the resume

    def adapters(peft_model):
        return {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    torch.manual_seed(5)
    whole = attach_adapters(_quantized(), lora)
    train(whole, None, windows, settings_, progress=False, frozen_base=True)

    class Stop(Exception):
        pass

    def stop(step, loss):
        if step == 3:
            raise Stop

    torch.manual_seed(5)
    first = attach_adapters(_quantized(), lora)
    with pytest.raises(Stop):
        train(first, None, windows, settings_, state_dir=tmp_path, on_step=stop, progress=False, frozen_base=True)
    saved = load_nested(tmp_path, "train_state")
    assert saved["model"] and all("lora_" in k for k in saved["model"])  # the frozen base is not in the training state
    torch.manual_seed(6)  # fresh, different adapters: the saved state must replace them
    resumed = attach_adapters(_quantized(), lora)
    result = train(resumed, None, windows, settings_, state_dir=tmp_path, progress=False, frozen_base=True)
    assert result.resumed_from == 3
    a, b = adapters(whole), adapters(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- end to end
def test_finetune_writes_peft_adapters_that_peft_reads_back(quantized_checkpoint, domain_file, tmp_path):
    result = finetune(
        quantized_checkpoint, str(domain_file), tmp_path / "ad", LoraSettings(r=4), FAST, seqlen=32, progress=False
    )
    assert result.training.losses[-1] < result.training.losses[0]
    files = set(os.listdir(result.out))
    assert {"adapter_config.json", "adapter_model.safetensors", "quantlm_adapter.json"} <= files
    assert not (tmp_path / ".ad.work").exists()
    info = json.loads((result.out / "quantlm_adapter.json").read_text())
    assert info["held_out_perplexity"]["adapter"] == result.held_out["adapter"]
    ids = _windows(2, 24)
    # quantlm's loader, and peft's own with the registered config
    from peft import PeftModel

    from quantlm.finetune import adapter_config

    a = load_adapters(api.load(quantized_checkpoint), result.out)
    b = PeftModel.from_pretrained(api.load(quantized_checkpoint), str(result.out), config=adapter_config(result.out))
    plain = api.load(quantized_checkpoint)
    with torch.no_grad():
        la, lb, lp = (m(input_ids=ids).logits for m in (a, b, plain))
    assert torch.equal(la, lb) and not torch.allclose(la, lp, atol=1e-4)


@pytest.mark.parametrize("mode", ["float", "exact", "requant"])
def test_each_merge_against_the_unmerged_model(mode, tmp_path):
    model = _quantized()
    peft_model = attach_adapters(model, LoraSettings(r=4, pooled=mode == "exact"))
    _randomize(peft_model)
    peft_model.eval()  # no adapter dropout
    ids = _windows(2, 24)
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
    record = model.quantlm_record
    merged = merge_adapters(peft_model, mode, record=record, progress=False)
    with torch.no_grad():
        logits = merged(input_ids=ids).logits
    n_quant = len(api.quantized_modules(merged))
    scale = unmerged.abs().max()
    if mode == "float":
        assert n_quant == 0 and (logits - unmerged).abs().max() <= 1e-4 * scale
    elif mode == "exact":
        assert n_quant == 21 and all(m.spec.bits == 4 for m in api.quantized_modules(merged).values())
        assert (logits - unmerged).abs().max() <= 1e-4 * scale
        api.save(merged, tmp_path / "m")
        again = api.load(tmp_path / "m")
        with torch.no_grad():
            assert torch.allclose(again(input_ids=ids).logits, logits, atol=1e-4 * scale)
    else:  # the float merge, quantized again by the base's own recipe (RTN here): codes of RTN on merged weights
        assert n_quant == 21
        twin = attach_adapters(_quantized(), LoraSettings(r=4))
        _randomize(twin)
        floats = merge_adapters(twin, "float")
        for name, q in api.quantized_modules(merged).items():
            expected = QuantLinear.from_weight(floats.get_submodule(name).weight, q.spec)
            assert torch.equal(q.qweight, expected.qweight) and torch.equal(q.scales, expected.scales), name
        assert merged.quantlm_record.recipe == record.recipe


def test_the_command_line_finetunes_merges_and_refuses_bad_input(quantized_checkpoint, domain_file, tmp_path):
    out = tmp_path / "ad"
    args = ["--data", str(domain_file), "--steps", "2", "--batch-size", "2", "--seqlen", "32", "--dtype", "float32"]
    r = runner.invoke(
        app, ["finetune", str(quantized_checkpoint), *args, "--pooled", "--merge", "exact", "--out", str(out), "--json"]
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["steps"] == 2 and set(summary["held_out_perplexity"]) == {"adapter", "merged"}
    assert abs(summary["held_out_perplexity"]["merged"] / summary["held_out_perplexity"]["adapter"] - 1) < 1e-3
    merged = api.load(out / "merged")
    assert {m.zeros.dtype for m in api.quantized_modules(merged).values()} == {torch.float32}
    record = api.read_record(out / "merged")
    assert record.recipe[0]["method"] == "rtn" and record.training["finetune"]["merge"] == "exact"

    def error(*extra):
        r = runner.invoke(app, ["finetune", *extra])
        assert r.exit_code == 2, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
        return r.output

    src = tmp_path / "tiny"
    assert "not a quantized quantlm checkpoint" in error(str(src), *args, "--out", str(tmp_path / "x1"))
    assert "no layer named" in error(
        str(quantized_checkpoint), *args, "--targets", "qkv", "--out", str(tmp_path / "x2")
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "contains no text" in error(str(quantized_checkpoint), "--data", str(empty), "--out", str(tmp_path / "x3"))
    assert "train with --pooled" in error(
        str(quantized_checkpoint), *args, "--merge", "exact", "--out", str(tmp_path / "x4")
    )
    assert "already exists" in error(str(quantized_checkpoint), *args, "--out", str(out))
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert "not a quantlm adapter directory" in error(
        str(quantized_checkpoint), *args, "--out", str(foreign), "--overwrite"
    )
    assert (foreign / "notes.txt").read_text() == "keep me"
    r = runner.invoke(app, ["finetune", str(quantized_checkpoint), *args, "--out", str(out), "--overwrite", "--json"])
    assert r.exit_code == 0, r.output  # an earlier adapter directory is replaced
    assert json.loads(r.stdout)["merged"] is None and not (out / "merged").exists()
    assert not any((tmp_path / n).exists() for n in ("x1", "x2", "x3", "x4"))


def test_a_float_base_trains_plain_lora_with_float_base(domain_file, tmp_path):
    src = save_tiny_model(tmp_path / "tiny")
    result = finetune(
        src,
        str(domain_file),
        tmp_path / "ad",
        LoraSettings(r=4),
        FAST,
        seqlen=32,
        float_base=True,
        merge="float",
        progress=False,
    )
    assert result.held_out["merged"] == pytest.approx(result.held_out["adapter"], rel=1e-4)


def test_under_autocast_a_quantlinear_returns_the_autocast_dtype_as_nn_linear_does():
    layer = QuantLinear.from_weight(torch.randn(32, 64), QuantSpec(bits=4, symmetric=False, group_size=16))
    dense = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(40, 64, requires_grad=True)  # prefill-sized: the dense path of the kernels
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = layer(x), dense(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def _ddp_finetune_worker(rank, world, init_file, out_file):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(3 + rank)  # rank 1 starts elsewhere: DDP must give every process rank 0's adapters
    peft_model = attach_adapters(_quantized(), LoraSettings(r=4, dropout=0.0))
    settings_ = TrainSettings(steps=3, batch_size=2, lr=1e-2, loss="ce", dtype="float32")
    result = train(peft_model, None, _windows(), settings_, progress=False, frozen_base=True)
    if rank == 0:
        adapters = {n: p.detach() for n, p in peft_model.named_parameters() if p.requires_grad}
        torch.save({"adapters": adapters, "tokens": result.tokens}, out_file)
    torch.distributed.destroy_process_group()


def test_two_processes_train_adapters_like_one_with_the_same_global_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    torch.multiprocessing.spawn(_ddp_finetune_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    torch.manual_seed(3)
    single = attach_adapters(_quantized(), LoraSettings(r=4, dropout=0.0))
    settings_ = TrainSettings(steps=3, batch_size=4, lr=1e-2, loss="ce", dtype="float32")
    train(single, None, _windows(), settings_, progress=False, frozen_base=True)
    ddp = torch.load(out)
    assert ddp["tokens"] == 3 * 4 * 32
    diff = torch.cat(
        [(ddp["adapters"][n] - p.detach()).abs().flatten() for n, p in single.named_parameters() if p.requires_grad]
    )
    assert float((diff > 1e-5).float().mean()) < 0.01, float((diff > 1e-5).float().mean())


# ---------------------------------------------------------------------------------------------- starting adapters
def _short_finetune(base, data, out, **kw):
    """FAST's six steps of r-4 adapters on ``base``; ``kw``: LoraSettings fields, or finetune's own arguments."""
    lora = {k: kw.pop(k) for k in ("init", "pooled") if k in kw}
    return finetune(base, str(data), out, LoraSettings(r=4, **lora), FAST, seqlen=32, progress=False, **kw)


def _objective(residual, b, a, gram, pooling):
    """‖(R − B A P) L‖_F², computed as tr((R − D) H (R − D)ᵀ) with the same damping as the closed form."""
    h = gram.double().clone()
    h.diagonal().add_(DAMP * h.diagonal().mean())
    d = residual.double() - (b.double() @ a.double()) @ (
        pooling.double() if pooling is not None else torch.eye(h.shape[0], dtype=torch.float64)
    )
    return float(torch.trace(d @ h @ d.T))


def _alternating_least_squares(residual, rank, gram, pooling, iterations=300):
    """The slow obvious minimiser: alternate the exact least-squares B for fixed A and A for fixed B."""
    r = residual.double()
    h = gram.double().clone()
    h.diagonal().add_(DAMP * h.diagonal().mean())
    p = pooling.double() if pooling is not None else torch.eye(r.shape[1], dtype=torch.float64)
    g = p @ h @ p.T
    a = torch.randn(rank, p.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(iterations):
        ap = a @ p
        b = torch.linalg.solve(ap @ h @ ap.T, ap @ h @ r.T).T
        a = torch.linalg.solve(b.T @ b, b.T @ r @ h @ p.T) @ torch.linalg.inv(g)
    return b, a


@settings(max_examples=12, deadline=None)
@given(
    out=st.integers(3, 12),
    groups=st.integers(2, 4),
    group=st.sampled_from([2, 3, 4]),
    rank=st.integers(1, 3),
    pooled=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_the_closed_form_correction_is_as_good_as_alternating_least_squares(out, groups, group, rank, pooled, seed):
    torch.manual_seed(seed)
    n_in = groups * group
    residual = torch.randn(out, n_in)
    x = torch.randn(40, n_in) * torch.linspace(0.2, 3.0, n_in)  # uneven input channels
    gram = x.T @ x
    pooling = pooling_matrix(torch.arange(n_in) // group, groups) if pooled else None
    b, a = low_rank_correction(residual, rank, gram, pooling)
    assert b.shape[1] == a.shape[0] == min(rank, out, groups if pooled else n_in)
    slow_b, slow_a = _alternating_least_squares(residual, a.shape[0], gram, pooling)
    best = _objective(residual, b, a, gram, pooling)
    assert best <= _objective(residual, slow_b, slow_a, gram, pooling) * (1 + 1e-4) + 1e-8
    assert best < _objective(residual, torch.zeros_like(b), a, gram, pooling)  # it corrects something
    # B and A share the singular values: Bᵀ B is diagonal, the same as (A L_G)(A L_G)ᵀ
    bb = b.double().T @ b.double()
    assert torch.allclose(bb, torch.diag(bb.diagonal()), atol=1e-6 * float(bb.abs().max()))


def test_loftq_without_a_gram_is_the_truncated_svd():
    residual = torch.randn(9, 7)
    b, a = low_rank_correction(residual, 3)
    u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
    assert torch.allclose((b @ a).double(), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5)


def _full_rank_adapters(init, pooled=False):
    float_model = tiny_model("llama")
    quantized = api.quantize(tiny_model("llama"), RTN_W4, progress=False)
    peft_model = attach_adapters(quantized, LoraSettings(r=160, pooled=pooled, init=init))
    return float_model, peft_model


def test_full_rank_adapters_started_from_the_residual_give_back_the_float_model(tmp_path):
    float_model, peft_model = _full_rank_adapters("loftq")
    source = tmp_path / "float"
    float_model.save_pretrained(source)
    assert initialize_adapters(peft_model, "loftq", source, _windows(2), progress=False)["layers"] == 21
    ids = _windows(2, 24, seed=3)
    peft_model.eval()  # no adapter dropout
    with torch.no_grad():
        expected = float_model(ids).logits
        before = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base_logits = before(ids).logits
        got = peft_model(ids).logits
    assert (got - expected).abs().max() < 1e-3 < (base_logits - expected).abs().max()


@pytest.mark.parametrize("pooled", [False, True])
def test_cloq_corrects_the_output_error_on_its_calibration_inputs_better_than_loftq(tmp_path, pooled):
    source = tmp_path / "float"
    tiny_model("llama").save_pretrained(source)
    windows = _windows(8, 32)
    errors = {}
    for init in ("default", "loftq", "cloq"):
        torch.manual_seed(0)
        peft_model = attach_adapters(
            api.quantize(tiny_model("llama"), RTN_W4, progress=False), LoraSettings(r=2, pooled=pooled, init=init)
        )
        initialize_adapters(peft_model, init, source, windows, progress=False)
        with torch.no_grad():
            errors[init] = torch.nn.functional.mse_loss(
                peft_model(windows).logits, tiny_model("llama")(windows).logits
            ).item()
    assert errors["cloq"] < errors["loftq"] < errors["default"]


def test_finetune_records_how_the_adapters_started_and_a_missing_float_model(
    quantized_checkpoint, domain_file, tmp_path
):
    result = _short_finetune(quantized_checkpoint, domain_file, tmp_path / "a")
    info = json.loads((result.out / "quantlm_adapter.json").read_text())
    assert info["lora_init"]["init"] == "cloq" and info["lora_init"]["layers"] == 21
    assert info["lora_init"]["float_model"] == str(tmp_path / "tiny")
    # the float model moved away: auto starts at zero and says why; cloq is refused, saying what to pass
    (tmp_path / "tiny").rename(tmp_path / "elsewhere")
    fallback = _short_finetune(quantized_checkpoint, domain_file, tmp_path / "b")
    assert fallback.lora_init["init"] == "default" and "--float-model PATH" in fallback.lora_init["why"]
    with pytest.raises(InvalidSpecError, match="--float-model PATH.*--lora-init default"):
        _short_finetune(quantized_checkpoint, domain_file, tmp_path / "b2", init="cloq")

    def cli(out, float_model):
        args = ["finetune", str(quantized_checkpoint), "--data", str(domain_file), "--out", str(tmp_path / out)]
        args += ["--steps", "2", "--seqlen", "32", "--lora-r", "4", "--dtype", "float32", "--json"]
        return runner.invoke(app, [*args, "--float-model", str(float_model)])

    moved = cli("c", tmp_path / "elsewhere")
    assert moved.exit_code == 0, moved.output
    assert json.loads(moved.stdout)["lora_init"]["float_model"] == str(tmp_path / "elsewhere")
    wrong = tmp_path / "wrong"
    tiny_model("llama", hidden_size=32).save_pretrained(wrong)
    bad = cli("d", wrong)
    assert bad.exit_code != 0 and "pass --float-model PATH, the model it was made from" in bad.output
    assert not (tmp_path / "d").exists()


def test_a_resumed_run_keeps_its_start_without_the_float_model(quantized_checkpoint, domain_file, tmp_path):
    out = tmp_path / "a"
    first = _short_finetune(quantized_checkpoint, domain_file, out, init="cloq", keep_work_dir=True)
    (tmp_path / "tiny").rename(tmp_path / "elsewhere")  # a fresh cloq start would now be refused
    again = _short_finetune(quantized_checkpoint, domain_file, out, init="cloq", overwrite=True)
    assert again.training.resumed_from == FAST.steps
    assert again.lora_init == first.lora_init and first.lora_init["init"] == "cloq"


def test_a_base_with_folded_scales_starts_at_zero_and_an_explicit_cloq_is_refused(tmp_path, domain_file):
    src = save_tiny_model(tmp_path / "tiny")
    recipe = [{"method": "smoothquant", "alpha": 0.5}, {"method": "rtn", "bits": 8, "act_bits": 8}]
    smoothed = api.quantize_to_checkpoint(src, recipe, tmp_path / "sq", calibration=_windows(4), progress=False)
    result = _short_finetune(smoothed, domain_file, tmp_path / "a")
    assert result.lora_init["init"] == "default" and "smoothquant" in result.lora_init["why"]
    with pytest.raises(InvalidSpecError, match="folded scales into its weights.*--lora-init default"):
        _short_finetune(smoothed, domain_file, tmp_path / "b", init="cloq")
    with pytest.raises(InvalidSpecError, match="drop it with --float-base"):
        finetune(src, str(domain_file), tmp_path / "c", float_base=True, float_model=src, progress=False)


def test_resolve_init_says_why_each_base_cannot_start_from_its_residual():
    from quantlm.finetune.lora_init import resolve_init
    from quantlm.formats.record import QuantizationRecord

    rtn = QuantizationRecord(recipe=[{"method": "rtn", "bits": 4}])
    assert resolve_init("auto", rtn, "/float") == ("cloq", None)
    assert resolve_init("loftq", rtn, "/float") == ("loftq", None)
    assert resolve_init("auto", None, None) == ("default", "a float base has no rounding error")
    mode, why = resolve_init("auto", rtn, None)
    assert mode == "default" and "--float-model PATH" in why
    trained = QuantizationRecord(recipe=[{"method": "rtn", "bits": 4}], training={"steps": 3})
    assert "trained" in resolve_init("auto", trained, "/float")[1]
    awq = QuantizationRecord(recipe=[{"method": "awq"}, {"method": "rtn", "bits": 4}])
    with pytest.raises(InvalidSpecError, match="awq step folded scales"):
        resolve_init("cloq", awq, "/float")


def test_a_non_finite_input_covariance_is_one_line_that_says_what_to_do():
    gram = torch.full((6, 6), float("inf"))
    with pytest.raises(QuantlmError, match="pass --lora-init default"):
        low_rank_correction(torch.randn(4, 6), 2, gram, pooling_matrix(torch.arange(6) // 3, 2))


def test_layers_reading_one_tensor_share_one_input_sum_and_each_sum_is_its_inputs_gram():
    from quantlm.finetune.adapters import adapter_layers
    from quantlm.finetune.lora_init import input_grams

    peft_model = attach_adapters(api.quantize(tiny_model("llama"), RTN_W4, progress=False), LoraSettings(r=2))
    layers = adapter_layers(peft_model)
    windows = _windows(3, 16)
    grams = input_grams(peft_model, layers, windows, progress=False)
    attn, mlp = "model.layers.1.self_attn.", "model.layers.1.mlp."
    assert grams[attn + "q_proj"] is grams[attn + "k_proj"] is grams[attn + "v_proj"]
    assert grams[mlp + "gate_proj"] is grams[mlp + "up_proj"]
    assert (
        grams[attn + "o_proj"] is not grams[attn + "q_proj"] and grams[mlp + "down_proj"] is not grams[mlp + "up_proj"]
    )
    inputs: dict[str, list] = {n: [] for n in layers}
    hooks = [
        m.get_base_layer().register_forward_pre_hook(
            lambda _m, a, n=n: inputs[n].append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for n, m in layers.items()
    ]
    with peft_model.disable_adapter(), torch.no_grad():
        for i in range(windows.shape[0]):
            peft_model(windows[i : i + 1])
    for hook in hooks:
        hook.remove()
    for name, rows in inputs.items():
        x = torch.cat(rows)
        assert torch.allclose(grams[name], 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5), name
