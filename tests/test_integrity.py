"""Checkpoint integrity: recorded checksums checked on load and by `quantlm verify`, non-finite scales refused, and
an already quantized model refused as a source."""

from __future__ import annotations

import errno
import json

import pytest
from typer.testing import CliRunner

import quantlm
from conftest import byte_tokenizer, tiny_model
from quantlm.cli import app
from quantlm.errors import CheckpointError, QuantlmError, os_error_message
from quantlm.formats.native import CHECKSUMS_FILE, WEIGHTS_FILE


def _checkpoint(tmp_path, name="q"):
    model = quantlm.quantize(tiny_model("llama"), [{"method": "rtn", "group_size": 16}], progress=False)
    return quantlm.save(model, tmp_path / name, tokenizer=byte_tokenizer()), model


def _damage_tensor_bytes(path):
    """Overwrite the last 64 bytes of the tensor data (the safetensors header stays intact)."""
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-64:] = b"\xff" * 64
    (path / WEIGHTS_FILE).write_bytes(bytes(data))


def test_every_file_has_a_recorded_checksum(tmp_path):
    path, _ = _checkpoint(tmp_path)
    sums = json.loads((path / CHECKSUMS_FILE).read_text())
    assert set(sums) == {p.name for p in path.iterdir()} - {CHECKSUMS_FILE}
    assert quantlm.api.verify(path) == []


def test_damaged_tensor_bytes_are_refused_on_load_and_by_verify(tmp_path, monkeypatch):
    path, _ = _checkpoint(tmp_path)
    _damage_tensor_bytes(path)
    with pytest.raises(CheckpointError, match="model.safetensors does not match its recorded checksum"):
        quantlm.load(path)
    problems = quantlm.api.verify(path)
    assert len(problems) >= 1 and "does not match its recorded checksum" in problems[0]
    result = CliRunner().invoke(app, ["verify", str(path)])
    assert result.exit_code == 2 and "damaged" in result.stderr and "Traceback" not in result.output
    monkeypatch.setenv("QUANTLM_VERIFY", "0")  # the fast path skips the check (and trusts the bytes)
    quantlm.load(path)


def test_a_missing_file_is_named(tmp_path):
    path, _ = _checkpoint(tmp_path)
    (path / "quant_log.json").unlink()
    with pytest.raises(CheckpointError, match="quant_log.json is missing"):
        quantlm.load(path)


def test_non_finite_scales_are_refused(tmp_path):
    model = quantlm.quantize(tiny_model("llama"), [{"method": "rtn", "group_size": 16}], progress=False)
    layer = model.model.layers[1].mlp.up_proj
    layer.scales[0, 0] = float("nan")
    path = quantlm.save(model, tmp_path / "nan")
    with pytest.raises(CheckpointError, match=r"non-finite scales in model\.layers\.1\.mlp\.up_proj"):
        quantlm.load(path)
    assert any("non-finite scales" in p for p in quantlm.api.verify(path))


def test_a_quantized_model_is_refused_as_a_source(tmp_path):
    path, model = _checkpoint(tmp_path)
    with pytest.raises(QuantlmError, match=r"already a quantlm checkpoint \(rtn\(w4 g16 asym\)\): quantize the float"):
        quantlm.api.quantize_to_checkpoint(path, [{"method": "rtn"}], tmp_path / "again", progress=False)
    with pytest.raises(QuantlmError, match="quantized already"):
        quantlm.quantize(model, [{"method": "rtn"}], progress=False)
    result = CliRunner().invoke(app, ["quantize", str(path), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 2 and "already a quantlm checkpoint" in result.stderr
    assert not (tmp_path / "again").exists() and not (tmp_path / "cli").exists()


def test_verify_names_a_directory_that_is_no_checkpoint(tmp_path):
    result = CliRunner().invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 2 and "is not a quantlm checkpoint" in result.stderr


def test_a_verified_checkpoint_is_not_hashed_again_until_a_file_changes(tmp_path, monkeypatch):
    import quantlm.formats.native as native

    path, _ = _checkpoint(tmp_path)
    hashed = []
    real = native._sha256
    monkeypatch.setattr(native, "_sha256", lambda p: hashed.append(p.name) or real(p))
    quantlm.load(path)
    assert "model.safetensors" in hashed
    hashed.clear()
    quantlm.load(path)
    assert hashed == []  # same sizes, times and inodes as when it was verified
    _damage_tensor_bytes(path)
    with pytest.raises(CheckpointError, match="does not match its recorded checksum"):
        quantlm.load(path)


def _hold_lock(target, ready, release):
    from quantlm.paths import output_lock

    with output_lock(target):
        ready.set()
        release.wait(60)


def test_a_second_run_into_the_same_output_is_refused_in_one_line(tmp_path, tiny_model_dir):
    import multiprocessing

    target = tmp_path / "q"
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(target, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(QuantlmError, match=r"another quantlm run is writing .*q \(it holds .*\.q\.lock\)"):
            quantlm.api.quantize_to_checkpoint(tiny_model_dir, [{"method": "rtn"}], target, progress=False)
        model = quantlm.quantize(tiny_model("llama"), [{"method": "rtn", "group_size": 16}], progress=False)
        with pytest.raises(QuantlmError, match="another quantlm run is writing"):
            quantlm.save(model, target)
        assert not target.exists() and not (tmp_path / ".q.work").exists()
    finally:
        release.set()
        holder.join(60)
    quantlm.save(model, target)  # the holder is gone (a killed one would release it too): it goes through
    assert quantlm.api.verify(target) == []


def test_temporaries_a_killed_save_left_are_removed_by_the_next(tmp_path):
    for leftover in (".q.tmp-abc123", ".q.old-4242"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.safetensors").write_bytes(b"half")
    path, _ = _checkpoint(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".q.")] == []
    assert quantlm.api.verify(path) == []


def test_a_source_model_missing_a_tensor_is_refused(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    from quantlm.errors import ModelSourceError

    src = tiny_model_dir
    weights = next(src.glob("*.safetensors"))
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelSourceError, match=r"lacks 1 tensor\(s\) of its model \(model.layers.1.mlp.up_proj"):
        quantlm.api.quantize_to_checkpoint(src, [{"method": "rtn"}], tmp_path / "q", progress=False)
    with pytest.raises(ModelSourceError, match="the weights are incomplete"):
        quantlm.load(src)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    "error, fragment",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on the disk"),
        (RuntimeError("Error while serializing: IoError(No space left on device (os error 28))"), "no space left"),
        (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/.q.lock"), "read-only (/mnt/ro/.q.lock)"),
        (PermissionError(errno.EACCES, "Permission denied", "/data/q"), "permission denied (/data/q)"),
    ],
)
def test_file_system_errors_say_what_to_change(error, fragment):
    message = os_error_message(error)
    assert fragment in message and "\n" not in message
    assert os_error_message(OSError(errno.EIO, "I/O error")) is None


def test_a_full_disk_during_the_final_save_is_one_line_and_leaves_nothing(tmp_path, tiny_model_dir, monkeypatch):
    from quantlm.formats import native

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(native, "write_checksums", full)
    out = tmp_path / "q"
    args = ["quantize", str(tiny_model_dir), "--group-size", "16", "--out", str(out), "--json"]
    result = CliRunner().invoke(app, args)  # --json: no progress bars on stderr
    assert result.exit_code == 2 and result.stderr.startswith("error: no space left on the disk")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".q.tmp-*"))


def test_an_output_lost_in_a_killed_swap_is_put_back_by_the_next_run(tmp_path):
    """Killed between moving the old checkpoint aside and moving the new one in: the old one survives only as
    .q.old-PID, and the next run into q restores it instead of deleting it as a leftover."""
    from quantlm.paths import output_lock

    path, _ = _checkpoint(tmp_path)
    path.rename(tmp_path / ".q.old-4242")
    with output_lock(path):
        pass
    assert quantlm.api.verify(path) == [] and not list(tmp_path.glob(".q.old-*"))
