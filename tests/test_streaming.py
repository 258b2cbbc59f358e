"""Quantizing from disk: one block in memory at a time, resume after an interruption, byte-identical results."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import quantlm
from conftest import VOCAB, byte_tokenizer, tiny_model
from quantlm.core import QuantSpec
from quantlm.errors import CheckpointError
from quantlm.methods import GPTQ, RTN
from quantlm.models.blocks import find_decoder_blocks
from quantlm.pipeline import run_pipeline
from quantlm.pipeline.streaming import streamed_model


def _ids(n=8, seqlen=32, seed=1):
    return torch.randint(0, VOCAB - 4, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _save_dir(tmp_path, family="llama", name="fp"):
    model = tiny_model(family)
    path = tmp_path / name
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
@pytest.mark.parametrize(
    "step", [RTN(QuantSpec(bits=4, group_size=16)), GPTQ(QuantSpec(bits=3, group_size=16), act_order=True)]
)
def test_streamed_quantization_equals_the_in_memory_one(tmp_path, family, step):
    src = _save_dir(tmp_path, family)
    calib = _ids()
    out = quantlm.api.quantize_to_checkpoint(src, step, tmp_path / "streamed", calibration=calib, progress=False)
    assert not (tmp_path / ".streamed.work").exists()
    in_memory = quantlm.quantize(quantlm.load(src), step, calibration=calib, progress=False)
    ids = _ids(2, 16, seed=5)
    assert torch.equal(_logits(quantlm.load(out), ids), _logits(in_memory, ids))
    log = json.loads((out / "quant_log.json").read_text())
    assert len(log) == len(in_memory.quantlm_record.log) and log[0]["method"] == step.name


class _OneBlockInMemory:
    name = "check"
    needs_calibration = False

    def __init__(self):
        self.seen = []

    def process_block(self, ctx):
        for i, block in enumerate(find_decoder_blocks(ctx.model).blocks):
            materialized = not any(p.is_meta for p in block.parameters())
            assert materialized == (i == ctx.index), (i, ctx.index)
        self.seen.append(ctx.index)
        return []

    def finalize(self, model):
        return []

    def to_config(self):
        return {"method": self.name}


def test_only_the_current_block_is_in_memory(tmp_path):
    src = _save_dir(tmp_path)
    model, weights = streamed_model(src)
    assert all(p.is_meta for p in find_decoder_blocks(model).blocks.parameters())
    assert not model.model.embed_tokens.weight.is_meta and model.lm_head.weight is model.model.embed_tokens.weight
    check = _OneBlockInMemory()
    run_pipeline(model, [check], progress=False, weights=weights)
    assert check.seen == [0, 1, 2]


def test_an_interrupted_run_resumes_and_writes_the_same_bytes(tmp_path, monkeypatch):
    src = _save_dir(tmp_path)
    calib = _ids()
    step = GPTQ(QuantSpec(bits=4, group_size=16))
    reference = quantlm.api.quantize_to_checkpoint(src, step, tmp_path / "reference", calibration=calib, progress=False)

    original = GPTQ.process_block
    processed = []

    def crash_at_block_2(self, ctx):
        if ctx.index == 2:
            raise KeyboardInterrupt
        processed.append(ctx.index)
        return original(self, ctx)

    monkeypatch.setattr(GPTQ, "process_block", crash_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        quantlm.api.quantize_to_checkpoint(src, step, tmp_path / "resumed", calibration=calib, progress=False)
    work = tmp_path / ".resumed.work"
    assert sorted(p.name for p in work.glob("block-*.safetensors")) == [
        "block-0000.safetensors",
        "block-0001.safetensors",
    ]
    assert not (tmp_path / "resumed").exists()

    monkeypatch.setattr(GPTQ, "process_block", lambda self, ctx: (processed.append(ctx.index), original(self, ctx))[1])
    processed.clear()
    resumed = quantlm.api.quantize_to_checkpoint(src, step, tmp_path / "resumed", calibration=calib, progress=False)
    assert processed == [2]  # blocks 0 and 1 came from the work directory
    for name in ("model.safetensors", "config.json"):
        assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name

    def without_timing(path):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(path.read_text())]

    assert without_timing(resumed / "quant_log.json") == without_timing(reference / "quant_log.json")


def test_a_work_directory_of_another_run_is_refused(tmp_path):
    src = _save_dir(tmp_path)
    work = tmp_path / "work"
    quantlm.api.quantize_to_checkpoint(
        src, RTN(QuantSpec(bits=4, group_size=16)), tmp_path / "a", work_dir=work, keep_work_dir=True, progress=False
    )
    with pytest.raises(CheckpointError, match="belongs to a different run"):
        quantlm.api.quantize_to_checkpoint(
            src, RTN(QuantSpec(bits=3, group_size=16)), tmp_path / "b", work_dir=work, progress=False
        )


_PEAK_RSS = textwrap.dedent(
    """
    import sys
    import quantlm
    from quantlm.core import QuantSpec
    from quantlm.methods import RTN
    quantlm.api.quantize_to_checkpoint(sys.argv[1], RTN(QuantSpec(bits=4, group_size=64)), sys.argv[2], progress=False)
    # VmHWM, not ru_maxrss: the latter keeps the high-water mark of the forked parent from before exec
    print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")))
    """
)


def test_peak_memory_does_not_grow_with_depth(tmp_path):
    """A 2-block and a 16-block model differ by ~140 MB of fp32 weights; quantizing from disk must not show it."""
    sizes = {}
    for layers in (2, 16):
        model = tiny_model(
            "llama",
            num_hidden_layers=layers,
            hidden_size=384,
            intermediate_size=1536,
            num_attention_heads=6,
            num_key_value_heads=2,
        )
        path = tmp_path / f"fp{layers}"
        model.save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
        weights = sum(p.numel() * 4 for p in model.parameters())
        del model
        peak = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS, str(path), str(tmp_path / f"q{layers}")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[-1]
        sizes[layers] = (weights, int(peak))
    extra_weights = sizes[16][0] - sizes[2][0]
    extra_peak = sizes[16][1] - sizes[2][1]
    assert extra_weights > 120e6
    assert extra_peak < 0.25 * extra_weights, (extra_peak / 1e6, extra_weights / 1e6)
