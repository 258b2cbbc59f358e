"""The layer-wise pipeline: block inputs are captured exactly, steps see them, transformed blocks feed the next."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, VOCAB, tiny_model
from quantlm.core import QuantSpec, compute_qparams, dequantize, quantize
from quantlm.errors import InvalidSpecError
from quantlm.methods import RTN
from quantlm.models.blocks import find_decoder_blocks, linear_weight, quantizable_linears
from quantlm.nn import QuantLinear
from quantlm.pipeline import BlockContext, LayerRecord, capture_block_inputs, run_pipeline


def _ids(n=5, seqlen=24, seed=1):
    return torch.randint(0, VOCAB - 4, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_running_blocks_on_captured_inputs_reproduces_the_models_hidden_states(family):
    """Capture, then run block after block on the captured inputs: every block's output must equal the full
    model's hidden states (this covers per-block masks and rotary tables, e.g. Gemma's sliding layers)."""
    model = tiny_model(family)
    blocks = find_decoder_blocks(model)
    ids = _ids()
    inputs = capture_block_inputs(model, blocks, ids, batch_size=2)  # 3 mini-batches: 2, 2, 1
    assert inputs.n_samples == ids.shape[0]
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    # the model's own blocks are back in place after capture
    assert all(type(b).__name__ != "_Recorder" for b in blocks.blocks)
    for i in range(len(blocks)):
        ctx = BlockContext(model, blocks, i, inputs)
        hidden = torch.cat(list(inputs.hidden))
        if i == 0:
            torch.testing.assert_close(hidden, reference[0])
        outputs = ctx.forward(keep_outputs=True)
        if i + 1 < len(blocks):  # the last hidden state reported by HF is after the final norm
            torch.testing.assert_close(torch.cat(list(outputs)), reference[i + 1], rtol=1e-4, atol=1e-5)
        inputs.hidden = outputs


class _Probe:
    """A calibration step that records the inputs its block sees and optionally zeroes the block's MLP output."""

    name = "probe"
    needs_calibration = True

    def __init__(self, kill_block: int | None = None):
        self.seen: dict[int, torch.Tensor] = {}
        self.kill_block = kill_block

    def process_block(self, ctx):
        self.seen[ctx.index] = torch.cat(list(ctx.inputs.hidden))
        if ctx.index == self.kill_block:
            for name, m in ctx.linears().items():
                if name.endswith("down_proj"):
                    m.weight.data.zero_()
        return [LayerRecord(module=ctx.name, method=self.name, seconds=0.0)]

    def finalize(self, model):
        return []

    def to_config(self):
        return {"method": self.name}


def test_steps_see_the_outputs_of_transformed_blocks():
    model = tiny_model("llama")
    ids = _ids()
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    probe = _Probe(kill_block=0)
    records = run_pipeline(model, [probe], ids, batch_size=4, progress=False)
    assert [r.module for r in records] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    torch.testing.assert_close(probe.seen[0], hs[0])
    # block 0 lost its MLP: block 1 must see the attention-only residual, not the original hidden state
    assert not torch.allclose(probe.seen[1], hs[1], atol=1e-3)
    block0 = find_decoder_blocks(model).blocks[0]
    with torch.no_grad():
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        emb = model.model.rotary_emb(hs[0], pos)
        expected = block0(hs[0], attention_mask=None, position_embeddings=emb, position_ids=pos)
    torch.testing.assert_close(probe.seen[1], expected, rtol=1e-4, atol=1e-5)


def test_calibration_steps_without_data_fail_clearly():
    with pytest.raises(ValueError, match="needs calibration data"):
        run_pipeline(tiny_model("llama"), [_Probe()], None, progress=False)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
@pytest.mark.parametrize(
    "spec", [QuantSpec(bits=4, group_size=16), QuantSpec(bits=3, symmetric=True), QuantSpec(bits=8)]
)
def test_rtn_equals_a_model_with_fake_quantized_weights(family, spec):
    model = tiny_model(family)
    reference = tiny_model(family)
    for block in find_decoder_blocks(reference).blocks:
        for m in quantizable_linears(block).values():
            w = linear_weight(m).detach()
            scale, zero = compute_qparams(w, spec)
            scale = scale.half().float()  # QuantLinear stores fp16 scales; codes are computed on them
            deq = dequantize(quantize(w, scale, zero, spec), scale, zero, spec)
            with torch.no_grad():
                linear_weight(m).copy_(deq)
    records = run_pipeline(model, [RTN(spec)], progress=False)
    n_linears = sum(len(quantizable_linears(b)) for b in find_decoder_blocks(reference).blocks)
    assert len(records) == n_linears
    assert all(0 < r.error < 0.5 for r in records)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == n_linears
    ids = _ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(model(ids).logits, tiny_model(family)(ids).logits, atol=1e-3)


def test_rtn_lm_head_flag_unties_and_quantizes_the_output_projection():
    model = tiny_model("llama")
    emb = model.model.embed_tokens.weight.detach().clone()
    run_pipeline(model, [RTN(QuantSpec(bits=4, group_size=16), lm_head=True)], progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(model.model.embed_tokens.weight, emb)  # input embeddings stay in full precision


def test_head_step_quantizes_only_the_output_projection_after_another_step():
    from quantlm.methods import parse_recipe
    from quantlm.methods.head import head_spec, head_step

    model = tiny_model("llama")
    reference = tiny_model("llama")
    run_pipeline(model, [RTN(QuantSpec(bits=4, group_size=16)), head_step(8)], progress=False)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.spec == head_spec(8)
    assert not model.config.tie_word_embeddings
    blocks = find_decoder_blocks(model).blocks
    assert blocks[0].mlp.down_proj.spec == QuantSpec(bits=4, group_size=16)  # the first step's grid, not rounded again
    w = reference.lm_head.weight.detach()
    err = float((model.lm_head.dequantize_weight() - w).norm() / w.norm())
    assert 0 < err < 0.01  # int8 per channel
    step = head_step(4)
    assert parse_recipe(step.to_config()).steps == [step] and step.to_config()["method"] == "rtn-head"
    with pytest.raises(InvalidSpecError, match="head bits must be 8, 4, 3 or 2"):
        head_spec(6)
    with pytest.raises(InvalidSpecError, match="quantized already"):
        run_pipeline(model, [head_step(8)], progress=False)
    headless = tiny_model("llama")
    headless.get_output_embeddings = lambda: None
    with pytest.raises(InvalidSpecError, match="has no output projection"):
        run_pipeline(headless, [head_step(8)], progress=False)


def test_rtn_exclude_patterns():
    model = tiny_model("llama")
    run_pipeline(model, [RTN(QuantSpec(bits=4, group_size=16), exclude=("down_proj", "*.layers.0.*"))], progress=False)
    blocks = find_decoder_blocks(model).blocks
    assert not isinstance(blocks[1].mlp.down_proj, QuantLinear)
    assert isinstance(blocks[1].mlp.up_proj, QuantLinear)
    assert not any(isinstance(m, QuantLinear) for m in blocks[0].modules())


def test_blocks_of_an_already_quantized_model_are_found():
    model = tiny_model("llama")
    run_pipeline(model, [RTN(QuantSpec(bits=4, group_size=16))], progress=False)
    blocks = find_decoder_blocks(model)
    assert blocks.path == "model.layers" and len(blocks) == 3
    assert quantizable_linears(blocks.blocks[0]) == {}  # nothing left to quantize
