"""The trainer's losses over the output layer in chunks (quantlm.qat.losses) against the whole-logits references."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from quantlm.qat.losses import (
    ChunkedHeadLoss,
    TrainingLoss,
    distillation_loss,
    head_computes_logits,
    hidden_states_from,
    label_loss,
    output_layer,
)
from quantlm.qat.trainer import teacher_in_dtype


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _reference_and_chunked(n, hid, vocab, chunk, bias, kind, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hid, generator=g)
    weight = torch.randn(vocab, hid, generator=g) / hid**0.5
    b = torch.randn(vocab, generator=g) if bias else None
    teacher_logits = 3 * torch.randn(n, vocab, generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)

    ref_in = [_leaf(hidden), _leaf(weight), None if b is None else _leaf(b)]
    logits = F.linear(ref_in[0], ref_in[1], ref_in[2])
    if kind == "kd":
        ref = distillation_loss(logits, teacher_logits)

        def target(rows):
            return torch.softmax(teacher_logits[rows], dim=-1)
    else:
        ref = F.cross_entropy(logits, labels)

        def target(rows):
            return F.one_hot(labels[rows], vocab).float()

    ref.backward()
    chk_in = [_leaf(hidden), _leaf(weight), None if b is None else _leaf(b)]
    chk = ChunkedHeadLoss.apply(*chk_in, target, chunk, torch.float32)
    (2 * chk).backward()  # the incoming gradient scales every gradient
    return ref, ref_in, chk, chk_in


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 40),
    vocab=st.integers(2, 70),
    chunk=st.integers(1, 50),
    bias=st.booleans(),
    kind=st.sampled_from(["kd", "ce"]),
    seed=st.integers(0, 2**16),
)
def test_chunked_loss_and_gradients_equal_the_whole_logits_loss(n, vocab, chunk, bias, kind, seed):
    ref, ref_in, chk, chk_in = _reference_and_chunked(n, 8, vocab, chunk, bias, kind, seed)
    torch.testing.assert_close(chk, ref, rtol=1e-5, atol=1e-6)
    for r, c in zip(ref_in, chk_in, strict=True):
        if r is not None:
            torch.testing.assert_close(c.grad, 2 * r.grad, rtol=1e-4, atol=1e-6)


def test_the_chunked_loss_in_bf16_is_close_to_the_autocast_loss():
    torch.manual_seed(0)
    hidden, weight = torch.randn(64, 32), torch.randn(300, 32) / 6
    teacher = 2 * torch.randn(64, 300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = distillation_loss(F.linear(hidden, weight), teacher)
    chk = ChunkedHeadLoss.apply(
        hidden, weight, None, lambda rows: torch.softmax(teacher[rows], dim=-1), 7, torch.bfloat16
    )
    assert abs(float(chk) - float(ref)) < 1e-3 * abs(float(ref))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["kd", "ce"])
def test_training_loss_on_a_model_equals_the_whole_logits_loss_with_the_same_gradients(kind):
    student, teacher = tiny_model("llama", seed=0).train(), tiny_model("llama", seed=1)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    loss_of = TrainingLoss(kind, student, teacher, torch.float32, ids[:1, :8])
    assert loss_of.chunked and "chunked" in loss_of.describe()
    chunked = loss_of(student, teacher, ids)
    chunked.backward()
    got = _grads(student)
    student.zero_grad()
    logits = student(input_ids=ids).logits
    ref = label_loss(logits, ids) if kind == "ce" else distillation_loss(logits, teacher(input_ids=ids).logits)
    ref.backward()
    torch.testing.assert_close(chunked, ref, rtol=1e-5, atol=1e-6)
    want = _grads(student)
    assert set(got) == set(want) and ("lm_head.weight" in got or "model.embed_tokens.weight" in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_that_scales_its_logits_trains_on_whole_logits():
    model = tiny_model("gemma3_text", final_logit_softcapping=3.0)
    probe = torch.randint(0, 256, (1, 8))
    assert not head_computes_logits(model, output_layer(model), probe)
    loss_of = TrainingLoss("ce", model, None, torch.float32, probe)
    assert not loss_of.chunked and "whole logits" in loss_of.describe()
    ids = torch.randint(0, 256, (2, 12))
    assert torch.equal(loss_of(model, None, ids), label_loss(model(input_ids=ids).logits, ids))
    plain = tiny_model("gemma3_text")
    assert head_computes_logits(plain, output_layer(plain), probe)


def test_the_head_passes_hidden_states_only_inside_and_keeps_its_parameters():
    model = tiny_model("llama")
    head = output_layer(model)
    names = [n for n, _ in model.named_parameters()]
    ids = torch.randint(0, 256, (1, 6))
    with hidden_states_from(head):
        hidden = model(input_ids=ids).logits
        assert [n for n, _ in model.named_parameters()] == names
    assert hidden.shape[-1] == head.in_features
    assert torch.allclose(model(input_ids=ids).logits, head(hidden), atol=1e-5)


def test_a_teacher_with_linear_weights_in_bf16_computes_the_same_under_autocast():
    teacher = tiny_model("llama", tie_word_embeddings=True)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = teacher(input_ids=ids).logits
    cast = copy.deepcopy(teacher)
    teacher_in_dtype(cast, torch.bfloat16)
    linears = [m for m in cast.modules() if isinstance(m, torch.nn.Linear) and m is not cast.lm_head]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert cast.lm_head.weight.dtype == torch.float32 and cast.model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = cast(input_ids=ids).logits
    assert torch.equal(before, after)
    teacher_in_dtype(cast, torch.float32)  # fp32 compute: nothing to change
    assert all(m.weight.dtype == torch.bfloat16 for m in linears)


# ---------------------------------------------------------------------------------------------- LSQ activations
def test_lsq_rounds_onto_the_static_int8_grid_with_lsq_gradients():
    from quantlm.core.activation import lsq_fake_quantize, quantize_per_tensor_int8

    torch.manual_seed(0)
    x = (torch.randn(5, 12) * 4).requires_grad_(True)
    step = torch.tensor(0.05, requires_grad=True)
    y = lsq_fake_quantize(x, step, 8)
    codes, scale = quantize_per_tensor_int8(x.detach(), step.detach().reshape(1))
    assert torch.equal(y.detach(), codes.float() * scale)
    y.sum().backward()
    t = x.detach() / 0.05
    inside = t.abs() <= 127
    assert torch.equal(x.grad, inside.float())
    lsq = torch.where(inside, torch.round(t) - t, 127 * torch.sign(t)).sum()
    torch.testing.assert_close(step.grad, lsq / (x.shape[-1] * 127) ** 0.5)


@pytest.mark.parametrize("disposable", [False, True])
def test_qat_leaves_the_callers_teacher_untouched_unless_it_is_disposable(disposable):
    from quantlm.methods.qat import QATConfig
    from quantlm.qat.run import run_qat
    from quantlm.qat.trainer import TrainSettings

    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    settings = TrainSettings(steps=1, batch_size=2, lr=1e-3, dtype="bfloat16")
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    run_qat(model, None, windows, QATConfig.from_bits("4-8-4"), settings, progress=False, teacher_disposable=disposable)
    proj = model.model.layers[0].mlp.down_proj.weight
    if disposable:
        assert proj.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.float32
    else:
        assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
