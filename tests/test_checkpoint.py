"""The native checkpoint: exact round trips, atomic writes, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import quantlm
from conftest import VOCAB, byte_tokenizer, tiny_model
from quantlm.core import QuantSpec
from quantlm.errors import CheckpointError
from quantlm.methods import RTN
from quantlm.nn import QuantLinear


def _quantized(family="llama", **rtn):
    model = tiny_model(family)
    quantlm.quantize(model, RTN(QuantSpec(bits=4, group_size=16), **rtn), progress=False)
    return model


def _logits(model, seed=0):
    ids = torch.randint(0, VOCAB - 4, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "family,rtn", [("llama", {}), ("llama", {"lm_head": True}), ("gpt2", {}), ("opt", {}), ("phi3", {})]
)
def test_save_then_load_gives_identical_logits(tmp_path, family, rtn):
    model = _quantized(family, **rtn)
    quantlm.save(model, tmp_path / "ckpt", tokenizer=byte_tokenizer())
    loaded = quantlm.load(tmp_path / "ckpt")
    assert torch.equal(_logits(model), _logits(loaded))
    n = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == n
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "quantlm" and qc["quantlm_version"] == quantlm.__version__
    assert qc["recipe"][0]["method"] == "rtn" and qc["recipe"][0]["group_size"] == 16
    assert len(qc["modules"]) == n
    log = json.loads((tmp_path / "ckpt" / "quant_log.json").read_text())
    assert len(log) == n and all("error" in r and "seconds" in r for r in log)
    assert quantlm.load_tokenizer(tmp_path / "ckpt")("abc").input_ids


def test_tied_embeddings_are_stored_once_and_retied(tmp_path):
    model = _quantized("llama")
    quantlm.save(model, tmp_path / "ckpt")
    from safetensors import safe_open

    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    loaded = quantlm.load(tmp_path / "ckpt")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    model = _quantized()
    with pytest.raises(CheckpointError, match="already exists"):
        quantlm.save(model, out)
    with pytest.raises(CheckpointError, match="--overwrite only replaces checkpoints"):
        quantlm.save(model, out, overwrite=True)  # a directory of someone's files is never replaced
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    shutil.rmtree(out)
    quantlm.save(model, out)
    (out / "notes.txt").write_text("about this checkpoint")
    quantlm.save(model, out, overwrite=True)  # a checkpoint is replaced whole
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directories left


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import quantlm.formats.native as native

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(native, "write_streaming", boom)
    out = tmp_path / "ckpt"
    with pytest.raises(OSError, match="disk full"):
        quantlm.save(_quantized(), out)
    assert list(tmp_path.iterdir()) == []
    # and with --overwrite, the old checkpoint survives a failed replacement
    monkeypatch.undo()
    quantlm.save(_quantized(), out)
    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(native, "write_streaming", boom)
    with pytest.raises(OSError):
        quantlm.save(_quantized(), out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_corrupt_or_incomplete_checkpoints_give_clear_errors(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    quantlm.save(_quantized(), out)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors does not match its recorded checksum"):
        quantlm.load(out)
    monkeypatch.setenv("QUANTLM_VERIFY", "0")  # without the checksums the reader's own checks still hold
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        quantlm.load(out)
    weights.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        quantlm.load(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        quantlm.load(out)


def test_a_checkpoint_missing_a_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "ckpt"
    quantlm.save(_quantized(), out)
    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.qweight"]
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not match its recorded checksum"):
        quantlm.load(out)
    with pytest.raises(CheckpointError, match="lacks tensors: model.layers.1.mlp.up_proj.qweight"):
        quantlm.load(out, verify=False)


def test_a_plain_hf_directory_loads_as_a_float_model(tiny_model_dir):
    model = quantlm.load(tiny_model_dir)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert torch.equal(_logits(model), _logits(tiny_model("llama")))
