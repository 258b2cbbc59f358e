"""Two ways the pipeline saves work or memory without changing results: replaying settled sub-modules, and
keeping the calibration activations on disk."""

from __future__ import annotations

import pytest
import torch

import quantlm
from conftest import VOCAB, byte_tokenizer, tiny_model
from quantlm.core import QuantSpec
from quantlm.methods import GPTQ, RTN
from quantlm.models.blocks import find_decoder_blocks
from quantlm.pipeline import BlockContext, run_pipeline
from quantlm.pipeline.activations import Batches, OffloadDirectory


def _ids(n=8, seqlen=32, seed=1):
    return torch.randint(0, VOCAB - 4, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_batches_in_memory_and_on_disk_hold_the_same_tensors(tmp_path):
    tensors = [torch.randn(2, 3, 4), torch.randn(1, 3, 4).to(torch.bfloat16)]
    in_memory, on_disk = Batches(), Batches(tmp_path)
    for t in tensors:
        in_memory.append(t)
        on_disk.append(t)
    assert on_disk.offloaded and not in_memory.offloaded
    assert len(list(tmp_path.iterdir())) == 2
    for batches in (in_memory, on_disk):
        assert len(batches) == 2 and batches.shapes == [t.shape for t in tensors]
        for got, want in zip(batches, tensors):
            assert got.dtype == want.dtype and torch.equal(got, want)
    sibling = on_disk.empty_like()
    sibling.append(tensors[0])
    on_disk.clear()
    assert len(on_disk) == 0 and len(list(tmp_path.iterdir())) == 1


def test_consume_drops_each_batch_as_it_goes(tmp_path):
    for directory in (None, tmp_path):
        batches = Batches(directory)
        for i in range(3):
            batches.append(torch.full((2,), float(i)))
        seen = []
        for i, t in enumerate(batches.consume()):
            seen.append(float(t[0]))
            if directory is not None:
                assert len(list(tmp_path.iterdir())) == 3 - i - 1  # this batch's file is gone already
        assert seen == [0.0, 1.0, 2.0] and len(batches) == 0 and batches.shapes == []
    assert not list(tmp_path.iterdir())


def test_offload_directory_is_removed_even_on_errors(tmp_path):
    with pytest.raises(RuntimeError):
        with OffloadDirectory(tmp_path) as path:
            Batches(path).append(torch.ones(3))
            raise RuntimeError("boom")
    assert not path.exists() and tmp_path.exists()


@pytest.mark.parametrize("true_sequential", [True, False])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox", "phi3", "gemma3_text"])
def test_replaying_settled_children_changes_nothing(family, true_sequential, monkeypatch):
    from quantlm.pipeline import capture_block_inputs

    calib = _ids(n=10)  # mini-batches of 4, 4 and 2
    model = tiny_model(family)
    blocks = find_decoder_blocks(model)
    ctx = BlockContext(model, blocks, 0, capture_block_inputs(model, blocks, calib, batch_size=4))
    assert ctx.replay.find_tails(), f"{family}: no tail found, so tail replay would not be tested"
    step = GPTQ(QuantSpec(bits=3, group_size=16), true_sequential=true_sequential)
    replayed = quantlm.quantize(model, step, calibration=calib, batch_size=4, progress=False)
    monkeypatch.setattr(BlockContext, "mark_final", lambda self, names: None)
    plain = quantlm.quantize(tiny_model(family), step, calibration=calib, batch_size=4, progress=False)
    _same_state(replayed, plain)


def test_a_child_that_changes_its_tail_output_in_place_is_not_tail_replayed(monkeypatch):
    from transformers.models.llama import modeling_llama

    from quantlm.pipeline import capture_block_inputs

    original = modeling_llama.LlamaMLP.forward

    def scaled(self, x):
        out = original(self, x)
        return out.mul_(0.5)  # the very tensor down_proj made, changed after it

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", scaled)
    model = tiny_model("llama", rms_norm_eps=1.5e-6)  # a config of its own: not in the tail cache yet
    blocks = find_decoder_blocks(model)
    ctx = BlockContext(model, blocks, 0, capture_block_inputs(model, blocks, _ids(), batch_size=4))
    assert set(ctx.replay.find_tails()) == {"self_attn"}


def _count_calls(monkeypatch, cls, run) -> int:
    calls = []
    original = cls.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counting)
    run()
    monkeypatch.setattr(cls, "forward", original)
    return len(calls)


@pytest.mark.parametrize("offload", [False, True])
def test_replay_computes_each_submodule_of_a_block_once(monkeypatch, tmp_path, offload):
    from transformers.models.llama import modeling_llama

    step = GPTQ(QuantSpec(bits=4, group_size=16))
    n_blocks = len(find_decoder_blocks(tiny_model("llama")).blocks)

    def run():
        model = tiny_model("llama")
        if offload:
            with OffloadDirectory(tmp_path) as scratch:
                run_pipeline(model, [step], _ids(), batch_size=4, progress=False, offload_dir=scratch)
        else:
            run_pipeline(model, [step], _ids(), batch_size=4, progress=False)

    # Each run finds its blocks' layout once, on the first block's first mini-batch: the tails (a full run of the
    # block) and the input groups (a run stopped at down_proj, inside the MLP).
    layout = 2
    attention = _count_calls(monkeypatch, modeling_llama.LlamaAttention, run)
    mlp = _count_calls(monkeypatch, modeling_llama.LlamaMLP, run)
    # 2 mini-batches. The attention runs in the q/k/v pass (stopped at q_proj) and the o_proj pass; after that it
    # replays as o_proj on o_proj's recorded input. The MLP runs in the gate/up and down_proj passes; the output
    # pass replays it as down_proj on its recorded input only when activations are offloaded (its input is wider
    # than the hidden states, so it is not kept in memory).
    assert attention == 2 * 2 * n_blocks + layout
    assert mlp == 2 * 2 * n_blocks + (0 if offload else 2 * (n_blocks - 1)) + layout
    monkeypatch.setattr(BlockContext, "mark_final", lambda self, names: None)
    assert _count_calls(monkeypatch, modeling_llama.LlamaAttention, run) == 2 * 5 * (n_blocks - 1) + 2 * 4 + layout
    assert _count_calls(monkeypatch, modeling_llama.LlamaMLP, run) == 2 * 3 * (n_blocks - 1) + 2 * 2 + layout


def test_tails_are_the_last_linear_of_attention_and_mlp():
    from quantlm.pipeline import capture_block_inputs

    model = tiny_model("llama")
    blocks = find_decoder_blocks(model)
    ctx = BlockContext(model, blocks, 0, capture_block_inputs(model, blocks, _ids(), batch_size=4))
    p = "model.layers.0."
    qkvo = tuple(p + f"self_attn.{n}_proj" for n in "qkvo")
    assert ctx.replay.find_tails() == {
        "self_attn": (p + "self_attn.o_proj", 2, qkvo[:3]),
        "mlp": (p + "mlp.down_proj", 0, qkvo + (p + "mlp.gate_proj", p + "mlp.up_proj")),
    }


@pytest.mark.parametrize("step", [RTN(QuantSpec(bits=4, group_size=16)), GPTQ(QuantSpec(bits=3, group_size=16))])
def test_offloaded_activations_give_the_same_model(tmp_path, step):
    calib = _ids()
    in_memory = tiny_model("qwen3")
    run_pipeline(in_memory, [step], calib, batch_size=4, progress=False)
    offloaded = tiny_model("qwen3")
    with OffloadDirectory(tmp_path) as scratch:
        run_pipeline(offloaded, [step], calib, batch_size=4, progress=False, offload_dir=scratch)
    _same_state(in_memory, offloaded)


def test_checkpoint_with_offloaded_activations_is_byte_identical(tmp_path):
    src = tmp_path / "fp"
    tiny_model("llama").save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    step = GPTQ(QuantSpec(bits=4, group_size=16))
    plain = quantlm.api.quantize_to_checkpoint(src, step, tmp_path / "plain", calibration=_ids(), progress=False)
    offload = quantlm.api.quantize_to_checkpoint(
        src, step, tmp_path / "offload", calibration=_ids(), offload_activations=True, progress=False
    )
    assert (plain / "model.safetensors").read_bytes() == (offload / "model.safetensors").read_bytes()
    assert not (tmp_path / ".offload.work").exists()


def test_observing_a_module_inside_a_replayed_child_still_sees_its_inputs():
    model = tiny_model("llama")
    blocks = find_decoder_blocks(model)
    from quantlm.pipeline import capture_block_inputs

    ctx = BlockContext(model, blocks, 0, capture_block_inputs(model, blocks, _ids(), batch_size=4))
    ctx.mark_final(n for n in ctx.linears() if ".self_attn." in n)
    ctx.forward()  # records the attention module
    assert "self_attn" in ctx.replay.recorded
    seen = []
    ctx.observe({"o": ctx.block.self_attn.o_proj}, lambda n, x: seen.append(x.shape))
    assert len(seen) == 2
