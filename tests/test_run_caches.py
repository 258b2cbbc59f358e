"""What the pipeline learns about a block's layout (which Linears share an input, which Linear ends a child) belongs
to one run: nothing of it is kept in a module, and a model never sees what another model's run found."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import VOCAB, tiny_model
from quantlm.core import QuantSpec
from quantlm.methods import GPTQ
from quantlm.models.blocks import find_decoder_blocks
from quantlm.pipeline import BlockContext, capture_block_inputs, run_pipeline
from quantlm.pipeline.replay import LayoutCache

# Shapes of this file's own, so that no other test's run can have met a model of the same config before.
SHAPES = {
    "wide": dict(hidden_size=48, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2),
    "narrow": dict(hidden_size=32, intermediate_size=80, num_attention_heads=4, num_key_value_heads=4),
    "other": dict(hidden_size=48, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1),
}


def _ids(n=8, seqlen=16, seed=3):
    return torch.randint(0, VOCAB - 4, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _pipeline_globals() -> dict[str, int]:
    """The size of every mutable container held by a module of the pipeline package."""
    sizes = {}
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("quantlm.pipeline"):
            continue
        for attr, value in vars(module).items():
            if not attr.startswith("__") and isinstance(value, (dict, list, set)):
                sizes[f"{module_name}.{attr}"] = len(value)
    return sizes


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of the Llama attention and MLP modules (how much work a run did, layout discovery included)."""
    from transformers.models.llama import modeling_llama

    counts = {"attention": 0, "mlp": 0}
    for key, cls in (("attention", modeling_llama.LlamaAttention), ("mlp", modeling_llama.LlamaMLP)):
        original = cls.forward

        def counting(self, *args, _key=key, _original=original, **kwargs):
            counts[_key] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counting)
    return counts


def _quantize(shape: str, calls: dict[str, int]):
    model = tiny_model("llama", **SHAPES[shape])
    before = dict(calls)
    run_pipeline(model, [GPTQ(QuantSpec(bits=3, group_size=16))], _ids(), batch_size=4, progress=False)
    return model.state_dict(), {k: calls[k] - before[k] for k in calls}


def test_models_of_one_family_with_different_shapes_quantize_as_if_each_ran_alone(calls):
    """Two Llamas of different shapes, one after the other and then again: every run of a model does the same
    work (it finds its blocks' layout itself) and gives the same bytes, whatever ran before it."""
    runs = {"wide": [], "narrow": []}
    for shape in ("wide", "narrow", "wide", "narrow"):
        runs[shape].append(_quantize(shape, calls))
    for shape, ((first, first_calls), (again, again_calls)) in runs.items():
        assert first_calls == again_calls, f"{shape}: a later run reused what an earlier run found"
        assert first.keys() == again.keys()
        for k in first:
            assert torch.equal(first[k], again[k]), f"{shape}: {k}"


def test_no_cache_outlives_a_run(calls):
    before = _pipeline_globals()
    _quantize("other", calls)
    after = _pipeline_globals()
    grown = {name: (before.get(name, 0), size) for name, size in after.items() if size > before.get(name, 0)}
    assert not grown, f"module-level containers kept entries after the run: {grown}"
    caches = {name: size for name, size in after.items() if "cache" in name.lower() and size}
    assert not caches, f"module-level caches hold entries: {caches}"


def test_a_layout_cache_is_shared_by_the_blocks_of_a_model_but_keyed_by_its_config():
    """Blocks of one model find their layout once; a model of another shape, even with the same module names,
    gets entries of its own (the key holds the model's config)."""
    cache = LayoutCache()
    for shape in ("wide", "narrow"):
        model = tiny_model("llama", **SHAPES[shape])
        blocks = find_decoder_blocks(model)
        inputs = capture_block_inputs(model, blocks, _ids(), batch_size=4)
        for index in range(len(blocks)):
            ctx = BlockContext(model, blocks, index, inputs, layout_cache=cache)
            p = f"{ctx.name}."
            assert ctx.input_groups(ctx.linears()) == [
                [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
                [p + "self_attn.o_proj"],
                [p + "mlp.gate_proj", p + "mlp.up_proj"],
                [p + "mlp.down_proj"],
            ]
            assert set(ctx.replay.find_tails()) == {"self_attn", "mlp"}
    assert len(cache.groups) == 2 and len(cache.tails) == 2
    alone, another = (BlockContext(model, blocks, 0, inputs) for _ in range(2))
    assert alone.layout_cache is not another.layout_cache  # a context built by itself has a cache of its own
