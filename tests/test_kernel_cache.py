"""The kernel cache: a checkpoint's packed int4 kernels are read back on the next load, never stale, never an error."""

from __future__ import annotations

import os

import pytest
import torch

import quantlm
from conftest import byte_tokenizer, tiny_model
from quantlm.core import QuantSpec
from quantlm.methods import RTN
from quantlm.nn import QuantLinear, kernel_cache

IDS = torch.tensor([[5, 80, 17, 200, 33, 9, 41, 120]])
W4 = QuantSpec(bits=4, group_size=32)


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "home"
    monkeypatch.setenv("QUANTLM_HOME", str(path))
    monkeypatch.delenv(kernel_cache.ENV_SWITCH, raising=False)
    return path


def _checkpoint(path, spec=W4, overwrite=False, seed=0):
    model = tiny_model("llama", seed=seed)
    quantlm.quantize(model, RTN(spec), progress=False)
    return quantlm.save(model, path, tokenizer=byte_tokenizer(), overwrite=overwrite)


def _kernels(model):
    return [m.kernel for m in model.modules() if isinstance(m, QuantLinear)]


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _entries(home):
    return sorted((home / "kernels").glob("*.safetensors")) if (home / "kernels").is_dir() else []


def test_second_load_reads_the_packed_kernels_back(tmp_path, home):
    out = _checkpoint(tmp_path / "q")
    first = quantlm.load(out)
    assert set(first.quantlm_kernels.values()) == {"int4pack"}
    assert not any(k.from_cache for k in _kernels(first))
    assert len(_entries(home)) == 1
    second = quantlm.load(out)
    assert all(k.from_cache for k in _kernels(second))
    uncached = quantlm.load(out, kernel_cache=False)
    assert not any(k.from_cache for k in _kernels(uncached))
    for a, b in zip(_kernels(second), _kernels(uncached)):
        assert torch.equal(a.packed, b.packed) and torch.equal(a.scale_offset, b.scale_offset)
    assert torch.equal(_logits(second), _logits(uncached))


def test_each_dtype_has_its_own_entry(tmp_path, home):
    out = _checkpoint(tmp_path / "q")
    quantlm.load(out)
    bf16 = quantlm.load(out, dtype=torch.bfloat16)
    assert not any(k.from_cache for k in _kernels(bf16))
    assert len(_entries(home)) == 2


def test_switched_off_writes_nothing(tmp_path, home, monkeypatch):
    out = _checkpoint(tmp_path / "q")
    quantlm.load(out, kernel_cache=False)
    monkeypatch.setenv(kernel_cache.ENV_SWITCH, "0")
    quantlm.load(out)
    assert _entries(home) == []


def test_a_rewritten_checkpoint_never_reads_the_old_entry(tmp_path, home):
    out = _checkpoint(tmp_path / "q")
    quantlm.load(out)
    _checkpoint(tmp_path / "q", overwrite=True, seed=1)
    os.utime(out / "model.safetensors", ns=(1, 1))  # a different modification time even on a coarse clock
    fresh = quantlm.load(out)
    assert not any(k.from_cache for k in _kernels(fresh))
    reference = quantlm.load(out, kernel="torch")
    assert float((_logits(fresh) - _logits(reference)).norm() / _logits(reference).norm()) < 2e-2


def test_a_corrupt_entry_is_rebuilt(tmp_path, home):
    out = _checkpoint(tmp_path / "q")
    quantlm.load(out)
    (entry,) = _entries(home)
    entry.write_bytes(b"not a safetensors file")
    rebuilt = quantlm.load(out)
    assert not any(k.from_cache for k in _kernels(rebuilt))
    assert torch.equal(_logits(rebuilt), _logits(quantlm.load(out, kernel_cache=False)))
    assert all(k.from_cache for k in _kernels(quantlm.load(out)))


def test_tensors_that_do_not_fit_the_layer_are_rebuilt(tmp_path, home):
    out = _checkpoint(tmp_path / "q")
    model = quantlm.load(out)
    (entry,) = _entries(home)
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    wrong = {
        name: {"packed": torch.zeros(3, 3, dtype=torch.uint8), "scale_offset": torch.zeros(1)} for name in names[:2]
    }
    kernel_cache.write_entry(entry, wrong)
    mixed = quantlm.load(out)
    assert not any(k.from_cache for k in _kernels(mixed))
    assert torch.equal(_logits(mixed), _logits(quantlm.load(out, kernel_cache=False)))
    assert all(k.from_cache for k in _kernels(quantlm.load(out)))  # the entry was written anew


def test_only_the_newest_entries_are_kept(tmp_path, home):
    tensors = {"layer": {"packed": torch.zeros(2, dtype=torch.uint8)}}
    paths = [home / "kernels" / f"{i:02d}.safetensors" for i in range(kernel_cache.MAX_ENTRIES + 3)]
    for i, path in enumerate(paths):
        kernel_cache.write_entry(path, tensors)
        os.utime(path, ns=(i * 10**9, i * 10**9))
    kernel_cache.write_entry(paths[-1], tensors)  # prunes
    assert _entries(home) == sorted(paths[-kernel_cache.MAX_ENTRIES :])
    assert kernel_cache.read_entry(paths[-1])["layer"]["packed"].shape == (2,)


def test_an_unwritable_cache_is_no_error(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("QUANTLM_HOME", str(blocker))
    out = _checkpoint(tmp_path / "q")
    model = quantlm.load(out)
    assert set(model.quantlm_kernels.values()) == {"int4pack"}
    assert blocker.is_file()


def test_layers_without_a_cacheable_kernel_write_nothing(tmp_path, home):
    out = _checkpoint(tmp_path / "q8", spec=QuantSpec(bits=8, group_size=-1, symmetric=True))
    assert set(quantlm.load(out).quantlm_kernels.values()) == {"int8pack"}
    assert _entries(home) == []


def test_int4x2_halves_are_cached_too(tmp_path, home):
    """5-8-bit layers keep both int4 halves in the cache: a second load packs nothing and computes the same."""
    out = _checkpoint(tmp_path / "w6", spec=QuantSpec(bits=6, group_size=32, symmetric=True))
    first = quantlm.load(out)
    assert set(first.quantlm_kernels.values()) == {"int4x2"}
    second = quantlm.load(out)
    assert all(k.from_cache for k in _kernels(second))
    uncached = quantlm.load(out, kernel_cache=False)
    assert not any(k.from_cache for k in _kernels(uncached))
    assert torch.equal(_logits(second), _logits(uncached))
    entry = _entries(home)[0]
    names = [n for n, m in second.named_modules() if isinstance(m, QuantLinear)]
    kernel_cache.write_entry(entry, {names[0]: {"high_packed": torch.zeros(2, dtype=torch.uint8)}})
    mixed = quantlm.load(out)  # a half that does not fit: both rebuilt from the codes
    assert torch.equal(_logits(mixed), _logits(uncached))
