"""The fault-and-bad-input cases of tests/test_faults.py, as data: what a careless or hostile user prepares, the
``quantlm`` command line they then run, and what they must see.

Each case is one row of the table in docs/reliability.md, rendered from this list (``python tests/fault_cases.py
--write`` rewrites that table; a test keeps the two equal). A case whose ``bug`` is set shows behaviour that is
wrong today: the test runs it as a strict xfail, and the docs row says what the user sees now.

Placeholders in ``args``: ``{model}`` a tiny random Llama (a plain Hugging Face directory), ``{ckpt}`` an RTN W4 g16
checkpoint of it, ``{text}`` a calibration/eval text file, ``{out}`` the output path of the case, ``{dir}`` the case's
own directory, ``{work}`` a work directory a setup chose. A ``setup`` may point ``{model}`` or ``{ckpt}`` at a
damaged copy (``ctx.copy``) and ``{out}`` elsewhere; a ``check`` makes case-specific assertions after the run.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CATEGORIES = (
    "model source",
    "settings",
    "data",
    "output",
    "interruption",
    "concurrency",
    "corruption",
    "security",
)


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    title: str
    args: tuple[str, ...]
    expect: str  # exit 2: a fragment of the one "error: " line; exit 0: a fragment of stdout
    code: int = 2
    setup: Callable[[Any], None] | None = None
    check: Callable[[Any], None] | None = None
    lost: str = "nothing"
    bug: str | None = None  # what goes wrong today (a strict xfail until fixed)
    many_lines: bool = False  # `quantlm verify` prints one "error: " line per problem
    needs_non_root: bool = False  # file permissions do not stop root


# ---------------------------------------------------------------------------------------------- pieces
class Payload:
    """What a planted pickle runs when it is unpickled: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the payload ran"))


def plant_pickle(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload(marker)}, protocol=4))


def no_payload(ctx) -> None:
    assert not ctx.marker.exists(), "a planted pickle was unpickled and its payload ran"


def _edit_json(path: Path, edit: Callable[[dict], Any]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _rechecksum(ckpt: Path) -> None:
    """Record the new checksums, as a buggy or hostile writer would: the damage is then not a checksum problem."""
    from quantlm.formats.native import write_checksums

    write_checksums(ckpt)


def _damage_tensor_bytes(path: Path) -> None:
    """Overwrite the last 64 bytes of the tensor data (the safetensors header stays valid)."""
    data = bytearray(path.read_bytes())
    data[-64:] = b"\xff" * 64
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: float = 1 / 3) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _patch_call(ctx, owner: Any, name: str, n: int, error: BaseException) -> None:
    """Replace ``owner.name`` by a wrapper that raises ``error`` from its ``n``-th call on."""
    original = getattr(owner, name)
    calls = []

    def replacement(*args, **kwargs):
        calls.append(None)
        if len(calls) >= n:
            raise error
        return original(*args, **kwargs)

    ctx.monkeypatch.setattr(owner, name, replacement)


def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def _interrupt_block(ctx, index: int = 2) -> None:
    """Ctrl-C when the quantization pipeline reaches decoder block ``index``."""
    from quantlm.methods.rtn import RTN

    original = RTN.process_block

    def process_block(self, block_ctx):
        if block_ctx.index == index:
            raise KeyboardInterrupt
        return original(self, block_ctx)

    ctx.monkeypatch.setattr(RTN, "process_block", process_block)


def _interrupt_forward(ctx, n: int = 1) -> None:
    """Ctrl-C in the ``n``-th forward pass of the tiny Llama."""
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    _patch_call(ctx, LlamaForCausalLM, "forward", n, KeyboardInterrupt())


QUANTIZE = ("quantize", "{model}", "--group-size", "16", "--out", "{out}")
GPTQ = ("--method", "gptq", "--calib", "{text}", "--calib-samples", "2", "--calib-seqlen", "32")
EVAL = ("--data", "{text}", "--seqlen", "32", "--max-windows", "1")
QAT = ("qat", "{model}", "--data", "{text}", "--steps", "2", "--batch-size", "2", "--seqlen", "32", "--save-every", "1")
FINETUNE = (
    "finetune",
    "{ckpt}",
    "--data",
    "{text}",
    "--steps",
    "2",
    "--batch-size",
    "2",
    "--seqlen",
    "32",
    "--save-every",
    "1",
    "--dtype",
    "float32",
)
GEN_DATA = ("generate-data", "{model}", "--samples", "4", "--max-length", "8", "--batch-size", "2")
BENCH = ("--data", "{text}", "--prefill-tokens", "8", "--decode-prompt", "4", "--decode-tokens", "2", "--repeats", "1")
REPORT = ("report", "{ckpt}", "{model}")


# ---------------------------------------------------------------------------------------------- setups and checks
def model_without_config(ctx):
    ctx.paths["model"] = ctx.dir / "not-a-model"
    ctx.paths["model"].mkdir()
    (ctx.paths["model"] / "README.md").write_text("weights go here\n")


def config_not_json(ctx):
    (ctx.copy("model") / "config.json").write_text('{"model_type": "llama", ')


def unknown_model_type(ctx):
    def edit(c):
        c["model_type"], c["architectures"] = "frobnet", ["FrobnetForCausalLM"]

    _edit_json(ctx.copy("model") / "config.json", edit)


def short_text(ctx):
    """``{text}`` is a text of a few dozen tokens."""
    path = ctx.dir / "short.txt"
    path.write_text("A short text. " * 4)
    ctx.paths["text"] = path


def config_without_model_type(ctx):
    _edit_json(ctx.copy("model") / "config.json", lambda c: c.pop("model_type"))


def weights_removed(ctx):
    (ctx.copy("model") / "model.safetensors").unlink()


def source_missing_a_tensor(ctx):
    from safetensors.torch import load_file, save_file

    weights = ctx.copy("model") / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})


def source_weights_truncated(ctx):
    _truncate(ctx.copy("model") / "model.safetensors", keep=0.001)


def tokenizer_removed(ctx):
    for file in ctx.copy("model").iterdir():
        if "token" in file.name:
            file.unlink()


def junk_gguf(ctx):
    (ctx.dir / "model.gguf").write_bytes(b"GGUF" + b"\x00" * 4)


def text_file_as_model(ctx):
    ctx.paths["model"] = ctx.paths["text"]


def gpt2_with_64_positions(ctx):
    """A tiny GPT-2: learned position embeddings for 64 positions, so a longer window cannot be run."""
    from conftest import byte_tokenizer, tiny_model

    model = ctx.dir / "gpt2-64"
    tiny_model("gpt2", n_positions=64).save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    ctx.paths["model"] = model


def write_file(name: str, content: str | bytes) -> Callable:
    """A setup that writes ``content`` to ``{dir}/name`` (a recipe, a text file)."""

    def setup(ctx):
        (ctx.dir / name).write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def out_is_a_project(ctx):
    """{out} is a directory of the user's own files (a mistyped output), which must come out byte-identical."""
    out = ctx.paths["out"]
    out.mkdir()
    (out / "thesis.tex").write_text("years of work\n")
    ctx.protect(out)


def unrelated_files_in_checkpoint(ctx):
    ckpt = ctx.copy("ckpt")
    (ckpt / "eval.json").write_text('{"ppl": 12.3}\n')
    (ckpt / "._config.json").write_bytes(b"\x00\x05\x16\x07 resource fork")


def checksums_a_list(ctx):
    (ctx.copy("ckpt") / "checksums.json").write_text("[]\n")


def protect_existing_output(ctx):
    """{out} is a checkpoint already (a copy of the shared one), which must come out byte-identical."""
    out = ctx.paths["out"]
    shutil.copytree(ctx.paths["ckpt"], out)
    (out / "notes.txt").write_text("my notes on this checkpoint\n")
    ctx.protect(out)


def out_is_a_file(ctx):
    ctx.paths["out"].write_text("not a directory\n")
    ctx.protect(ctx.paths["out"])


def out_parent_is_a_file(ctx):
    parent = ctx.dir / "afile"
    parent.write_text("a file where a directory is expected\n")
    ctx.protect(parent)
    ctx.paths["out"] = parent / "q"


def read_only_parent(ctx):
    parent = ctx.dir / "readonly"
    parent.mkdir()
    ctx.paths["out"] = parent / "q"
    os.chmod(parent, 0o555)
    ctx.finalizers.append(lambda: os.chmod(parent, 0o755))


def lock_file_fails(code: int, message: str) -> Callable:
    """Creating the lock file beside {out} fails as it does in a read-only directory or file system (as root, the
    permission bits alone would not stop it)."""

    def setup(ctx):
        import quantlm.paths

        def take(lock):
            raise OSError(code, message, str(lock))

        ctx.monkeypatch.setattr(quantlm.paths, "_take_lock_file", take)

    return setup


def disk_full_writing_checkpoint(ctx):
    import quantlm.formats.native as native

    _patch_call(ctx, native, "write_streaming", 1, _disk_full())


def disk_full_replacing_checkpoint(ctx):
    protect_existing_output(ctx)
    disk_full_writing_checkpoint(ctx)


def disk_full_in_work_dir(ctx):
    """safetensors (Rust) reports a full disk as a SafetensorError whose message holds the OS error."""
    from safetensors import SafetensorError

    import quantlm.pipeline.store as store

    error = SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )
    _patch_call(ctx, store, "save_file", 2, error)


def out_is_the_source(ctx):
    ctx.paths["out"] = ctx.copy("model")
    ctx.protect(ctx.paths["out"])


def work_dir_with_user_files(ctx):
    stuff = ctx.dir / "mystuff"
    stuff.mkdir()
    (stuff / "thesis.tex").write_text("years of work\n")
    ctx.paths["work"] = stuff
    ctx.protect(stuff)


def work_dir_is_the_source(ctx):
    ctx.paths["work"] = ctx.copy("model")
    ctx.protect(ctx.paths["work"])


def out_is_a_symlink(ctx):
    """{out} is a symbolic link to a checkpoint kept elsewhere."""
    real = ctx.dir / "elsewhere" / "ckpt"
    shutil.copytree(ctx.paths["ckpt"], real)
    ctx.paths["out"].symlink_to(real, target_is_directory=True)
    ctx.protect(real)


def stale_temporaries(ctx):
    for name in (".out.tmp-k1ll3d", ".out.old-4242"):
        (ctx.dir / name).mkdir()
        (ctx.dir / name / "model.safetensors").write_bytes(b"half a checkpoint")


def foreign_jsonl(ctx):
    ctx.paths["out"] = ctx.dir / "notes.jsonl"
    ctx.paths["out"].write_text('{"text": "my own data, not generated"}\n')
    ctx.protect(ctx.paths["out"])


def generated_with_other_settings(ctx):
    ctx.paths["out"] = ctx.dir / "gen.jsonl"
    earlier = ("generate-data", "{model}", "--samples", "2", "--max-length", "6", "--batch-size", "2")
    code, _, err = ctx.cli(*earlier, "--out", "{out}", "--json")
    assert code == 0, err
    ctx.protect(ctx.paths["out"])


def generated_with_more_samples(ctx):
    ctx.paths["out"] = ctx.dir / "gen.jsonl"
    code, _, err = ctx.cli(*GEN_DATA[:3], "6", *GEN_DATA[4:], "--out", "{out}", "--json")
    assert code == 0, err
    ctx.protect(ctx.paths["out"])


def jsonl_out_parent_is_a_file(ctx):
    out_parent_is_a_file(ctx)
    ctx.paths["out"] = ctx.dir / "afile" / "gen.jsonl"


def earlier_report(ctx):
    """{out} is a report an earlier `quantlm report` wrote."""
    code, _, err = ctx.cli("report", "{ckpt}", "--out", "{out}")
    assert code == 0, err


def report_replaced(ctx):
    text = (ctx.paths["out"] / "report.md").read_text()
    assert "fp32 (tiny-llama)" in text and "rtn(w4 g16 asym)" in text, text


def interrupted_quantize(ctx):
    _interrupt_block(ctx, 2)


def work_dir_kept(ctx):
    work = ctx.dir / ".out.work"
    blocks = sorted(p.name for p in work.glob("block-*.safetensors"))
    assert blocks == ["block-0000.safetensors", "block-0001.safetensors"], blocks


def resume_after_interrupt(ctx):
    _interrupt_block(ctx, 2)
    code, _, err = ctx.cli(*QUANTIZE)
    assert code == 2 and "interrupted" in err, err
    ctx.monkeypatch.undo()


def resumed_bytes_equal_a_fresh_run(ctx):
    out, fresh = ctx.paths["out"], ctx.shared["ckpt"]
    assert (out / "model.safetensors").read_bytes() == (fresh / "model.safetensors").read_bytes()
    assert not (ctx.dir / ".out.work").exists()


def interrupted_while_replacing(ctx):
    import quantlm.formats.native as native

    protect_existing_output(ctx)
    _patch_call(ctx, native, "write_streaming", 1, KeyboardInterrupt())


def interrupted_qat(ctx):
    from quantlm.qat.losses import TrainingLoss

    _patch_call(ctx, TrainingLoss, "__call__", 2, KeyboardInterrupt())


def training_state_kept(ctx):
    assert (ctx.dir / ".out.work" / "train_state.json").is_file()


def interrupted_finetune(ctx):
    from quantlm.qat.losses import TrainingLoss

    _patch_call(ctx, TrainingLoss, "__call__", 2, KeyboardInterrupt())


def resume_finetune(ctx):
    interrupted_finetune(ctx)
    code, _, err = ctx.cli(*FINETUNE, "--out", "{out}")
    assert code == 2 and "interrupted" in err, err
    ctx.monkeypatch.undo()


def resume_qat(ctx):
    interrupted_qat(ctx)
    code, _, err = ctx.cli(*QAT, "--out", "{out}")
    assert code == 2 and "interrupted" in err, err
    ctx.monkeypatch.undo()


def interrupted_generate_data(ctx):
    import quantlm.qat.data as data

    ctx.paths["out"] = ctx.dir / "gen.jsonl"
    _patch_call(ctx, data, "generate_batch", 2, KeyboardInterrupt())


def whole_lines_only(ctx):
    lines = ctx.paths["out"].read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [0, 1], lines


def hold_output_lock(ctx):
    ctx.hold_lock(ctx.paths["out"])


def hold_lock_on_existing(ctx):
    protect_existing_output(ctx)
    ctx.hold_lock(ctx.paths["out"])


def stale_lock_file(ctx):
    (ctx.dir / ".out.lock").write_text("")  # a killed run's lock file: nobody holds it


def no_work_dir(ctx):
    assert not (ctx.dir / ".out.work").exists(), "the refused run wrote into the work directory"


def hold_jsonl_lock(ctx):
    ctx.paths["out"] = ctx.dir / "gen.jsonl"
    ctx.hold_lock(ctx.paths["out"])


def jsonl_absent(ctx):
    assert not ctx.paths["out"].exists(), "the refused run wrote the file another run is writing"


def keep_first_work_dir(ctx):
    """Another run (3 bits) was interrupted and keeps its blocks in the work directory named by --work-dir."""
    _interrupt_block(ctx, 2)
    ctx.paths["work"] = ctx.dir / "shared-work"
    first = ("quantize", "{model}", "--bits", "3", "--group-size", "16", "--out", "{dir}/first")
    code, _, err = ctx.cli(*first, "--work-dir", "{work}")
    assert code == 2 and "interrupted" in err, err
    ctx.monkeypatch.undo()
    ctx.protect(ctx.paths["work"])


def damaged_ckpt(ctx):
    _damage_tensor_bytes(ctx.copy("ckpt") / "model.safetensors")


def truncated_ckpt(ctx):
    _truncate(ctx.copy("ckpt") / "model.safetensors")


def truncated_ckpt_unverified(ctx):
    truncated_ckpt(ctx)
    ctx.monkeypatch.setenv("QUANTLM_VERIFY", "0")


def weights_file_removed(ctx):
    (ctx.copy("ckpt") / "model.safetensors").unlink()


def checksums_not_json(ctx):
    (ctx.copy("ckpt") / "checksums.json").write_text("{sha256: ")


def checksum_entry_removed_and_damaged(ctx):
    ckpt = ctx.copy("ckpt")
    _edit_json(ckpt / "checksums.json", lambda sums: sums.pop("model.safetensors"))
    _damage_tensor_bytes(ckpt / "model.safetensors")


def checksums_removed_and_damaged(ctx):
    ckpt = ctx.copy("ckpt")
    (ckpt / "checksums.json").unlink()
    _damage_tensor_bytes(ckpt / "model.safetensors")


def config_edited(ctx):
    _edit_json(ctx.copy("ckpt") / "config.json", lambda c: c.update(num_hidden_layers=2))


def config_edited_unverified(ctx):
    config_edited(ctx)
    ctx.monkeypatch.setenv("QUANTLM_VERIFY", "0")


def quant_log_not_json(ctx):
    (ctx.copy("ckpt") / "quant_log.json").write_text("[{")


def nan_scales(ctx):
    import torch
    from safetensors.torch import load_file, save_file

    ckpt = ctx.copy("ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.2.self_attn.o_proj.scales"][0, 0] = float("nan")
    tensors["model.layers.0.mlp.gate_proj.scales"][1, 1] = torch.inf
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    _rechecksum(ckpt)


def newer_format(ctx):
    ckpt = ctx.copy("ckpt")
    _edit_json(ckpt / "config.json", lambda c: c["quantization_config"].update(format_version=99))
    _rechecksum(ckpt)


def module_spec_edited(ctx):
    ckpt = ctx.copy("ckpt")

    def edit(c):
        c["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]["bits"] = "four"

    _edit_json(ckpt / "config.json", edit)
    _rechecksum(ckpt)


def _interrupted_work_dir(ctx):
    _interrupt_block(ctx, 2)
    code, _, err = ctx.cli(*QUANTIZE)
    assert code == 2 and "interrupted" in err, err
    ctx.monkeypatch.undo()
    return ctx.dir / ".out.work"


def damaged_work_block(ctx):
    _truncate(_interrupted_work_dir(ctx) / "block-0001.safetensors", keep=0.01)


def work_block_meta_not_json(ctx):
    (_interrupted_work_dir(ctx) / "block-0000.json").write_text('{"records": [')


def work_run_file_not_json(ctx):
    (_interrupted_work_dir(ctx) / "run.json").write_text("{")


def training_state_not_json(ctx):
    resume_qat(ctx)
    (ctx.dir / ".out.work" / "train_state.json").write_text('{"tensors": ')


def pickle_only_source(ctx):
    model = ctx.copy("model")
    (model / "model.safetensors").unlink()
    plant_pickle(model / "pytorch_model.bin", ctx.marker)


def pickle_beside_safetensors(ctx):
    plant_pickle(ctx.copy("model") / "pytorch_model.bin", ctx.marker)


def pickle_in_checkpoint(ctx):
    plant_pickle(ctx.copy("ckpt") / "pytorch_model.bin", ctx.marker)


def pickle_in_qat_work_dir(ctx):
    plant_pickle(ctx.dir / ".out.work" / "train_state.pt", ctx.marker)


def state_index_names_a_pickle(ctx):
    plant_pickle(ctx.dir / "evil.pkl", ctx.marker)
    work = ctx.dir / ".out.work"
    work.mkdir()
    (work / "train_state.json").write_text(json.dumps({"tensors": "../evil.pkl", "state": {"step": 1}}))


def yaml_python_tag(ctx):
    (ctx.dir / "evil.yaml").write_text(
        f"- !!python/object/apply:pathlib.Path.write_text [{str(ctx.marker)!r}, 'the payload ran']\n"
    )


def remote_code_in_config(ctx):
    model = ctx.copy("model")
    code = f"import pathlib\npathlib.Path({str(ctx.marker)!r}).write_text('the payload ran')\n"
    (model / "evil.py").write_text(code)

    def edit(c):
        c["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}

    _edit_json(model / "config.json", edit)


def remote_code_in_tokenizer(ctx):
    model = ctx.copy("model")
    (model / "evil.py").write_text(f"import pathlib\npathlib.Path({str(ctx.marker)!r}).write_text('ran')\n")
    _edit_json(model / "tokenizer_config.json", lambda c: c.update(auto_map={"AutoTokenizer": ["evil.Tok", None]}))


def out_absent(ctx):
    assert not ctx.paths["out"].exists()


def assert_absent(path: Path) -> None:
    assert not path.exists(), f"the refused run wrote {path}"


def both(*checks: Callable) -> Callable:
    def check(ctx):
        for c in checks:
            c(ctx)

    return check


# ---------------------------------------------------------------------------------------------- the table
CASES: list[Case] = [
    # ---- model sources
    Case("src-missing-dir", "model source", "model path that does not exist",
         ("quantize", "{dir}/no-such-model", "--out", "{out}"), "model directory not found"),
    Case("src-no-config", "model source", "directory without config.json",
         QUANTIZE, "is not a Hugging Face model directory (no config.json)", setup=model_without_config),
    Case("src-config-not-json", "model source", "config.json that is not JSON",
         QUANTIZE, "config.json: Expecting", setup=config_not_json),
    Case("src-unknown-arch", "model source", "config.json of an architecture transformers does not know",
         QUANTIZE, "frobnet", setup=unknown_model_type),
    Case("src-no-model-type", "model source", "config.json without model_type",
         QUANTIZE, "model_type", setup=config_without_model_type),
    Case("src-no-weights", "model source", "model directory without weight files",
         QUANTIZE, "has no safetensors weights", setup=weights_removed),
    Case("src-missing-tensor", "model source", "weights that lack one tensor (eval)",
         ("eval", "{model}", *EVAL), "lacks 1 tensor(s) of its model (model.layers.1.mlp.down_proj.weight)",
         setup=source_missing_a_tensor),
    Case("src-truncated", "model source", "truncated model.safetensors",
         QUANTIZE, "cannot read the safetensors files", setup=source_weights_truncated),
    Case("src-no-tokenizer", "model source", "model directory without tokenizer files",
         QUANTIZE, "cannot load a tokenizer from", setup=tokenizer_removed),
    Case("src-unknown-alias", "model source", "misspelt model alias",
         ("quantize", "smollm-135m", "--out", "{out}"), "unknown model 'smollm-135m'"),
    Case("src-hub-offline", "model source", "hub id that is not in the cache, offline",
         ("quantize", "someone/some-model", "--out", "{out}"), "is not in the Hugging Face cache and HF_HUB_OFFLINE"),
    Case("src-gguf-missing", "model source", ".gguf path that does not exist",
         ("quantize", "{dir}/model.gguf", "--out", "{out}"), "GGUF file not found"),
    Case("src-gguf-junk", "model source", ".gguf file that is not GGUF",
         ("quantize", "{dir}/model.gguf", "--out", "{out}"), "cannot read GGUF file", setup=junk_gguf),
    Case("src-text-as-model", "model source", "a text file given as the model",
         QUANTIZE, "is neither a model directory nor a .gguf file", setup=text_file_as_model),
    Case("src-quantized-again", "model source", "quantizing a quantlm checkpoint again",
         ("quantize", "{ckpt}", "--out", "{out}"), "is already a quantlm checkpoint (rtn(w4 g16 asym))"),
    Case("src-report-missing", "model source", "report of a run path that does not exist",
         (*REPORT, "{dir}/no-such-checkpoint", "--out", "{out}"), "does not exist: pass a checkpoint directory"),
    Case("src-report-file", "model source", "report of a run that is a file, not a directory or .json",
         (*REPORT, "{text}", "--out", "{out}"), "is a file, not a directory"),
    # ---- settings
    Case("set-bits-0", "settings", "--bits 0",
         ("quantize", "{model}", "--bits", "0", "--out", "{out}"), "bits must be between 2 and 8, got 0"),
    Case("set-bits-9", "settings", "--bits 9",
         ("quantize", "{model}", "--bits", "9", "--out", "{out}"), "bits must be between 2 and 8, got 9"),
    Case("set-bits-word", "settings", "--bits four",
         ("quantize", "{model}", "--bits", "four", "--out", "{out}"), "Invalid value for '--bits'"),
    Case("set-group-negative", "settings", "--group-size -5",
         ("quantize", "{model}", "--group-size", "-5", "--out", "{out}"), "group_size must be -1 (one scale per row)"),
    Case("set-group-partial", "settings", "--group-size 24 (does not divide 64: the last group is partial)",
         ("quantize", "{model}", "--group-size", "24", "--out", "{out}"), "rtn(w4 g24 asym): 21 modules", code=0),
    Case("set-unknown-method", "settings", "--method spqr (not built)",
         ("quantize", "{model}", "--method", "spqr", "--out", "{out}"), "'spqr' is not one of"),
    Case("set-foreign-flag", "settings", "a GPTQ flag with --method rtn",
         ("quantize", "{model}", "--damp", "0.1", "--out", "{out}"), "--damp does not apply to --method rtn"),
    Case("set-head-bits", "settings", "--head-bits 7",
         ("quantize", "{model}", "--head-bits", "7", "--out", "{out}"), "head bits must be 8, 4, 3 or 2, got 7"),
    Case("set-kv-bits", "settings", "--kv-bits 1",
         ("quantize", "{model}", "--kv-bits", "1", "--out", "{out}"), "KV-cache bits must be between 2 and 8"),
    Case("set-batch-zero", "settings", "--batch-size 0",
         ("quantize", "{model}", *GPTQ, "--batch-size", "0", "--out", "{out}"), "--batch-size"),
    Case("set-alpha", "settings", "SmoothQuant --alpha 2",
         ("quantize", "{model}", "--method", "smoothquant", "--alpha", "2", "--out", "{out}"),
         "alpha must be a number in [0, 1] or 'auto'"),
    Case("set-dtype", "settings", "--dtype float64",
         ("quantize", "{model}", "--dtype", "float64", "--out", "{out}"), "'float64' is not one of"),
    Case("set-recipe-yaml", "settings", "recipe file that is not valid YAML",
         ("quantize", "{model}", "--recipe", "{dir}/r.yaml", "--out", "{out}"), "is not valid YAML",
         setup=write_file("r.yaml", "- method: rtn\n  bits: [4\n")),
    Case("set-recipe-unknown-key", "settings", "recipe step with a misspelt setting",
         ("quantize", "{model}", "--recipe", "{dir}/r.yaml", "--out", "{out}"), "rtn has no setting bitz",
         setup=write_file("r.yaml", "- method: rtn\n  bitz: 4\n")),
    Case("set-recipe-type", "settings", "recipe setting of the wrong type",
         ("quantize", "{model}", "--recipe", "{dir}/r.yaml", "--out", "{out}"),
         "symmetric must be True or False, got 'maybe'",
         setup=write_file("r.yaml", "- method: rtn\n  symmetric: maybe\n")),
    Case("set-recipe-empty", "settings", "empty recipe file",
         ("quantize", "{model}", "--recipe", "{dir}/empty.yaml", "--out", "{out}"), "empty.yaml",
         setup=write_file("empty.yaml", "")),
    Case("set-recipe-scalar", "settings", "recipe file holding a number, not steps",
         ("quantize", "{model}", "--recipe", "{dir}/number.yaml", "--out", "{out}"), "number.yaml",
         setup=write_file("number.yaml", "42\n")),
    Case("set-recipe-binary", "settings", "recipe file that is not UTF-8",
         ("quantize", "{model}", "--recipe", "{dir}/binary.yaml", "--out", "{out}"), "binary.yaml",
         setup=write_file("binary.yaml", b"\xff\xfe\x00- method: rtn\n")),
    Case("set-recipe-and-method", "settings", "--recipe together with --method",
         ("quantize", "{model}", "--recipe", "{dir}/r.json", "--method", "gptq", "--out", "{out}"),
         "--recipe replaces --method and its settings", setup=write_file("r.json", '[{"method": "rtn"}]')),
    Case("set-unknown-command", "settings", "unknown command",
         ("quantise", "{model}"), "No such command 'quantise'"),
    Case("set-unknown-option", "settings", "unknown option",
         ("quantize", "{model}", "--out", "{out}", "--bitz", "4"), "No such option: --bitz"),
    Case("set-missing-argument", "settings", "missing model argument",
         ("eval",), "Missing argument 'model'"),
    Case("set-missing-out", "settings", "quantize without --out",
         ("quantize", "{model}"), "Missing option '--out'"),
    Case("set-new-tokens-0", "settings", "generate --max-new-tokens 0",
         ("generate", "{ckpt}", "--prompt", "Hi", "--max-new-tokens", "0"), "--max-new-tokens must be at least 1"),
    Case("set-new-tokens-negative", "settings", "generate --max-new-tokens -4",
         ("generate", "{ckpt}", "--prompt", "Hi", "--max-new-tokens", "-4"), "--max-new-tokens must be at least 1"),
    Case("set-temperature-0", "settings", "generate --sample --temperature 0",
         ("generate", "{ckpt}", "--prompt", "Hi", "--max-new-tokens", "2", "--sample", "--temperature", "0"),
         "--temperature"),
    Case("set-top-p", "settings", "generate --sample --top-p 2",
         ("generate", "{ckpt}", "--prompt", "Hi", "--max-new-tokens", "2", "--sample", "--top-p", "2"), "--top-p"),
    Case("set-empty-prompt", "settings", 'generate --prompt ""',
         ("generate", "{ckpt}", "--prompt", "", "--max-new-tokens", "2"), "--prompt"),
    Case("set-kernel-name", "settings", "bench --kernel with an unknown name",
         ("bench", "{ckpt}", "--kernel", "int3"), "unknown kernel 'int3'"),
    Case("set-kernel-mismatch", "settings", "eval --kernel int8 on W4 layers",
         ("eval", "{ckpt}", "--kernel", "int8", *EVAL), "kernel 'int8' cannot run a w4 g16 asym layer"),
    Case("set-bench-repeats", "settings", "bench --repeats 0",
         ("bench", "{ckpt}", "--repeats", "0"), "--repeats must be at least 1"),
    Case("set-qat-steps", "settings", "qat --steps 0",
         ("qat", "{model}", "--data", "{text}", "--steps", "0", "--out", "{out}"),
         "--steps, --batch-size and --grad-accum must be at least 1"),
    Case("set-qat-bits", "settings", "qat --w-bits 1",
         (*QAT, "--w-bits", "1", "--out", "{out}"), "weight bits must be 2..8, or 16"),
    Case("set-qat-lsq-a16", "settings", "qat --act-clip lsq with 16-bit activations",
         (*QAT, "--act-clip", "lsq", "--a-bits", "16", "--out", "{out}"), "LSQ learns a symmetric activation step"),
    Case("set-qat-clip-w16", "settings", "qat --clip stats with 16-bit weights",
         (*QAT, "--w-bits", "16", "--clip", "stats", "--out", "{out}"), "clip set the weight grid"),
    Case("set-qat-clip-init", "settings", "qat --clip stats with --init (a fixed start grid)",
         (*QAT, "--group-size", "16", "--clip", "stats", "--init", "{ckpt}", "--out", "{out}"),
         "--init keeps the start checkpoint's grid fixed"),
    Case("set-qat-init-offsets", "settings", "qat --init-offsets without --init",
         (*QAT, "--init-offsets", "float", "--out", "{out}"), "--init-offsets needs --init CHECKPOINT"),
    Case("set-qat-smooth-folds", "settings", "qat --smooth-folds without --smooth-alpha",
         (*QAT, "--smooth-folds", "norm", "--out", "{out}"), "add --smooth-alpha"),
    Case("set-qat-smooth-a16", "settings", "qat --smooth-alpha with 16-bit activations",
         (*QAT, "--smooth-alpha", "auto", "--a-bits", "16", "--out", "{out}"), "it needs quantized activations"),
    Case("set-qat-smooth-init", "settings", "qat --smooth-alpha with --init (a start quantized unsmoothed)",
         (*QAT, "--group-size", "16", "--smooth-alpha", "0.5", "--init", "{ckpt}", "--out", "{out}"),
         "--init starts from a checkpoint quantized without smoothing"),
    Case("set-finetune-float", "settings", "finetune of a float model (not a quantized checkpoint)",
         ("finetune", "{model}", *FINETUNE[2:], "--out", "{out}"), "not a quantized quantlm checkpoint"),
    Case("set-finetune-targets", "settings", "finetune --targets with a layer name the model lacks",
         (*FINETUNE, "--targets", "qkv_proj", "--out", "{out}"), "no layer named qkv_proj"),
    Case("set-finetune-requant-float", "settings", "finetune --float-base --merge requant (no recipe to rerun)",
         ("finetune", "{model}", *FINETUNE[2:], "--float-base", "--merge", "requant", "--out", "{out}"),
         "this base records none", check=both(out_absent, no_work_dir)),
    Case("set-finetune-exact", "settings", "finetune --merge exact without --pooled adapters",
         (*FINETUNE, "--merge", "exact", "--out", "{out}"), "train with --pooled"),
    Case("set-finetune-float-model", "settings", "finetune --float-model that is not the model the base was made from",
         (*FINETUNE, "--float-model", "{ckpt}", "--out", "{out}"), "pass --float-model PATH",
         check=both(out_absent, no_work_dir)),
    Case("set-finetune-init-float", "settings", "finetune --lora-init cloq of a float base (no rounding error)",
         ("finetune", "{model}", *FINETUNE[2:], "--float-base", "--lora-init", "cloq", "--out", "{out}"),
         "a float base has no rounding error"),
    Case("set-export-format", "settings", "export --format with an unknown name",
         ("export", "{ckpt}", "--format", "awq", "--out", "{out}"), "unknown --format 'awq'", check=out_absent),
    Case("set-export-float", "settings", "export --format gptq of a float model (not a quantized checkpoint)",
         ("export", "{model}", "--format", "gptq", "--out", "{out}"), "not a quantlm checkpoint", check=out_absent),
    Case("set-export-grid", "settings", "export --format gguf of W4 g16 layers (no llama.cpp block has that grid)",
         ("export", "{ckpt}", "--format", "gguf", "--out", "{dir}/m.gguf"), "none of llama.cpp's block grids",
         check=lambda ctx: assert_absent(ctx.dir / "m.gguf")),
    Case("set-target-grid", "settings", "quantize --target-format gguf-q4_k_m with --bits (the target sets grids)",
         ("quantize", "{model}", "--target-format", "gguf-q4_k_m", "--bits", "4", "--out", "{out}"),
         "--target-format sets each layer's grid: drop --bits", check=out_absent),
    Case("set-target-act", "settings", "quantize --target-format gguf-q4_0 --a-bits 8 (GGUF blocks are weight-only)",
         ("quantize", "{model}", "--target-format", "gguf-q4_0", "--a-bits", "8", "--out", "{out}"),
         "drop --a-bits", check=out_absent),
    Case("set-scale-bits-group", "settings", "quantize --scale-bits 6 with groups of 64 (K-quants: 16 or 32)",
         ("quantize", "{model}", "--scale-bits", "6", "--group-size", "64", "--out", "{out}"),
         "pass --group-size 32", check=out_absent),
    Case("set-greedy-range", "settings", "generate-data --greedy-tokens 5-3",
         (*GEN_DATA, "--greedy-tokens", "5-3", "--out", "{dir}/gen.jsonl"), "greedy tokens must be a range lo-hi"),
    Case("set-report-no-runs", "settings", "report without any run",
         ("report", "--out", "{out}"), "no runs given"),
    Case("set-report-label", "settings", "report --label without RUN=TEXT",
         (*REPORT, "--label", "best", "--out", "{out}"), "--label wants RUN=TEXT"),
    # ---- data
    Case("data-empty", "data", "empty calibration text file",
         ("quantize", "{model}", *GPTQ[:2], "--calib", "{dir}/empty.txt", "--out", "{out}"), "contains no text",
         setup=write_file("empty.txt", "  \n\n")),
    Case("data-binary", "data", "binary (non-UTF-8) calibration file",
         ("quantize", "{model}", *GPTQ[:2], "--calib", "{dir}/blob.txt", "--out", "{out}"), "as UTF-8 text",
         setup=write_file("blob.txt", bytes(range(256)) * 8)),
    Case("data-missing", "data", "calibration file that does not exist",
         ("quantize", "{model}", *GPTQ[:2], "--calib", "{dir}/none.txt", "--out", "{out}"), "text file not found"),
    Case("data-format", "data", "calibration file of an unknown kind (.csv)",
         ("quantize", "{model}", *GPTQ[:2], "--calib", "{dir}/data.csv", "--out", "{out}"), "unknown text source",
         setup=write_file("data.csv", "a,b\n1,2\n")),
    Case("data-too-short", "data", "calibration text shorter than one window",
         ("quantize", "{model}", *GPTQ[:-2], "--calib-seqlen", "256", "--out", "{out}"),
         "fewer than one window of 256", setup=short_text),
    Case("data-seqlen-0", "data", "--calib-seqlen 0",
         ("quantize", "{model}", *GPTQ[:-2], "--calib-seqlen", "0", "--out", "{out}"),
         "calibration needs at least 1 window of at least 2 tokens, got 2 x 0"),
    Case("data-seqlen-negative", "data", "--calib-seqlen -3",
         ("quantize", "{model}", *GPTQ[:-2], "--calib-seqlen", "-3", "--out", "{out}"),
         "calibration needs at least 1 window of at least 2 tokens, got 2 x -3"),
    Case("data-samples-0", "data", "--calib-samples 0",
         ("quantize", "{model}", *GPTQ[:4], "--calib-samples", "0", "--out", "{out}"),
         "calibration needs at least 1 window"),
    Case("data-eval-seqlen-0", "data", "eval --seqlen 0",
         ("eval", "{model}", "--data", "{text}", "--seqlen", "0"), "--seqlen must be at least 2, got 0"),
    Case("data-jsonl-invalid", "data", "eval text .jsonl with a broken line",
         ("eval", "{model}", "--data", "{dir}/t.jsonl", "--seqlen", "32"), "t.jsonl:2 is not valid JSON",
         setup=write_file("t.jsonl", '{"text": "fine"}\n{"text": \n')),
    Case("data-jsonl-shape", "data", "eval text .jsonl without text fields",
         ("eval", "{model}", "--data", "{dir}/t.jsonl", "--seqlen", "32"),
         'each line must be a JSON string or an object with a "text" field',
         setup=write_file("t.jsonl", '{"body": "no text key"}\n')),
    Case("data-max-windows-0", "data", "eval --max-windows 0 (means all windows)",
         ("eval", "{model}", "--data", "{text}", "--seqlen", "32", "--max-windows", "0"),
         "x 32)", code=0),
    Case("data-past-context-eval", "data", "eval --seqlen longer than the model's context (GPT-2, 64 positions)",
         ("eval", "{model}", "--data", "{text}", "--seqlen", "128", "--max-windows", "1"), "has only 64",
         setup=gpt2_with_64_positions),
    Case("data-past-context-bos", "data", "eval --seqlen equal to the context, with a BOS in front (GPT-2)",
         ("eval", "{model}", "--data", "{text}", "--seqlen", "64", "--bos", "--max-windows", "1"), "plus BOS",
         setup=gpt2_with_64_positions),
    Case("data-past-context-qat", "data", "qat --seqlen longer than the model's context",
         ("qat", "{model}", "--data", "{text}", "--steps", "1", "--seqlen", "128", "--out", "{out}"), "has only 64",
         setup=gpt2_with_64_positions),
    Case("data-past-context-gen-data", "data", "generate-data --max-length longer than the model's context",
         ("generate-data", "{model}", "--samples", "2", "--max-length", "100", "--out", "{dir}/g.jsonl"),
         "has only 64", setup=gpt2_with_64_positions),
    Case("data-past-context-calib", "data", "--calib-seqlen longer than the model's context",
         ("quantize", "{model}", *GPTQ[:-2], "--calib-seqlen", "128", "--out", "{out}"), "has only 64",
         setup=gpt2_with_64_positions),
    Case("data-past-context-generate", "data", "generate past the model's context",
         ("generate", "{model}", "--prompt", "Hi", "--max-new-tokens", "100"), "has only 64",
         setup=gpt2_with_64_positions),
    Case("data-past-context-bench", "data", "bench --prefill-tokens longer than the model's context",
         ("bench", "{model}", *BENCH[:2], "--prefill-tokens", "128", *BENCH[4:]), "has only 64",
         setup=gpt2_with_64_positions),
    Case("data-qat-missing", "data", "qat --data .jsonl that does not exist",
         ("qat", "{model}", "--data", "{dir}/gen.jsonl", "--steps", "1", "--out", "{out}"),
         "does not exist: write one with quantlm generate-data"),
    Case("data-qat-foreign", "data", "qat --data .jsonl not written by generate-data",
         ("qat", "{model}", "--data", "{dir}/gen.jsonl", "--steps", "1", "--out", "{out}"),
         "line 1 is not a generated sample", setup=write_file("gen.jsonl", '{"text": "hello"}\n')),
    Case("data-finetune-empty", "data", "finetune --data of an empty text file",
         ("finetune", "{ckpt}", "--data", "{dir}/empty.txt", "--out", "{out}"), "contains no text",
         setup=write_file("empty.txt", "  \n\n")),
    Case("data-finetune-short", "data", "finetune --data too short for one --seqlen window",
         ("finetune", "{ckpt}", "--data", "{dir}/short.txt", *FINETUNE[4:], "--out", "{out}"),
         "fewer than one --seqlen 32 window", setup=write_file("short.txt", "A few words only.")),
    Case("data-report-missing-json", "data", "report of a .json file that does not exist",
         (*REPORT, "{dir}/eval.json", "--out", "{out}"), "JSON file not found"),
    Case("data-report-not-json", "data", "report of a .json file that is not valid JSON",
         (*REPORT, "{dir}/eval.json", "--out", "{out}"), "is not valid JSON",
         setup=write_file("eval.json", '{"model": "x", "ppl": 12.')),
    Case("data-report-foreign-json", "data", "report of a JSON file that no quantlm eval or bench printed",
         (*REPORT, "{dir}/recipe.json", "--out", "{out}"), "is not a quantlm eval or bench JSON",
         setup=write_file("recipe.json", '[{"method": "rtn", "bits": 4}]')),
    Case("data-report-no-model", "data", "report of an eval JSON without its \"model\" key",
         (*REPORT, "{dir}/eval.json", "--out", "{out}"), "does not say which model it measured",
         setup=write_file("eval.json", '{"ppl": 12.5, "tokens": 100}')),
    Case("data-report-bad-number", "data", "report of an eval JSON whose ppl is not a number",
         (*REPORT, "{dir}/eval.json", "--out", "{out}"), '"ppl" is "12.5", not a number',
         setup=write_file("eval.json", '{"model": "x", "ppl": "12.5"}')),
    # ---- outputs
    Case("out-exists", "output", "--out that already holds a checkpoint",
         QUANTIZE, "already exists: choose another path or pass --overwrite", setup=protect_existing_output,
         lost="nothing: the existing checkpoint is byte-identical"),
    Case("out-overwrite-project", "output", "--overwrite naming a directory that is not a checkpoint",
         (*QUANTIZE, "--overwrite"), "--overwrite only replaces checkpoints", setup=out_is_a_project,
         lost="nothing; refused before any work"),
    Case("out-export-project", "output", "export --overwrite naming a directory that is not an export",
         ("export", "{ckpt}", "--format", "compressed-tensors", "--out", "{out}", "--overwrite"),
         "--overwrite only replaces compressed-tensors exports", setup=out_is_a_project,
         lost="nothing; refused before any work"),
    Case("out-inside-model", "output", "--out inside the source model directory (its work directory too)",
         ("quantize", "{model}", "--group-size", "16", "--out", "{model}/q4"), "rtn(w4 g16 asym)", code=0,
         setup=lambda ctx: ctx.copy("model")),
    Case("out-is-file", "output", "--out that is a file, with --overwrite",
         (*QUANTIZE, "--overwrite"), "exists and is not a directory", setup=out_is_a_file,
         lost="nothing: the file is unchanged"),
    Case("out-parent-file", "output", "--out inside a path that is a file",
         QUANTIZE, "afile", setup=out_parent_is_a_file),
    Case("out-read-only-dir", "output", "--out in a read-only directory (chmod 555, not root)",
         QUANTIZE, "permission denied", setup=read_only_parent, needs_non_root=True),
    Case("out-permission", "output", "--out where creating files is not permitted",
         QUANTIZE, "permission denied", setup=lock_file_fails(errno.EACCES, "Permission denied")),
    Case("out-read-only-fs", "output", "--out on a read-only file system",
         QUANTIZE, "the file system is read-only", setup=lock_file_fails(errno.EROFS, "Read-only file system")),
    Case("out-disk-full", "output", "disk full while writing the checkpoint",
         QUANTIZE, "no space left on the disk", setup=disk_full_writing_checkpoint,
         lost="nothing: no partial checkpoint; finished blocks stay in .OUT.work for the rerun"),
    Case("out-disk-full-overwrite", "output", "disk full while replacing a checkpoint (--overwrite)",
         (*QUANTIZE, "--overwrite"), "no space left on the disk", setup=disk_full_replacing_checkpoint,
         lost="nothing: the old checkpoint is byte-identical"),
    Case("out-disk-full-work", "output", "disk full while saving a finished block (safetensors' own error)",
         QUANTIZE, "no space left on the disk", setup=disk_full_in_work_dir,
         lost="nothing: the blocks finished before stay in .OUT.work"),
    Case("out-is-source", "output", "--out that is the source model directory, with --overwrite",
         ("quantize", "{model}", "--group-size", "16", "--out", "{out}", "--overwrite"), "model-copy",
         setup=out_is_the_source,
         lost="nothing; refused before any work"),
    Case("out-qat-is-source", "output", "qat --out that is the source model directory, with --overwrite",
         (*QAT, "--out", "{out}", "--overwrite"), "model-copy", setup=out_is_the_source,
         lost="nothing; refused before training"),
    Case("out-work-dir-user", "output", "--work-dir naming a directory with the user's files",
         ("quantize", "{model}", "--group-size", "16", "--work-dir", "{work}", "--out", "{out}"), "mystuff",
         setup=work_dir_with_user_files,
         lost="nothing; a directory quantlm did not make is never adopted"),
    Case("out-work-dir-source", "output", "--work-dir naming the source model directory",
         ("quantize", "{model}", "--group-size", "16", "--work-dir", "{work}", "--out", "{out}"), "model-copy",
         setup=work_dir_is_the_source,
         lost="nothing; refused before any work"),
    Case("out-work-dir-is-out", "output", "--work-dir equal to --out",
         ("quantize", "{model}", "--group-size", "16", "--work-dir", "{out}", "--out", "{out}"), "--work-dir"),
    Case("out-symlink-overwrite", "output", "--out that is a symbolic link to a checkpoint, with --overwrite",
         (*QUANTIZE, "--overwrite", "--json"), '"quantized_modules": 21', code=0, setup=out_is_a_symlink,
         lost="nothing: the linked checkpoint is unchanged"),
    Case("out-stale-temporaries", "output", "leftovers of a killed write beside --out",
         (*QUANTIZE, "--json"), '"quantized_modules": 21', code=0, setup=stale_temporaries,
         lost="nothing: the leftovers are removed"),
    Case("out-jsonl-foreign", "output", "generate-data --out that is someone else's .jsonl",
         (*GEN_DATA, "--out", "{out}"), "exists but was not written by quantlm generate-data", setup=foreign_jsonl,
         lost="nothing: the file is unchanged"),
    Case("out-jsonl-other-settings", "output", "generate-data --out written with other settings",
         (*GEN_DATA, "--out", "{out}"), "was generated with other settings", setup=generated_with_other_settings,
         lost="nothing: the file is unchanged"),
    Case("out-jsonl-more-samples", "output", "generate-data --samples fewer than the --out file holds",
         (*GEN_DATA, "--out", "{out}"), "already holds 6 samples, more than --samples 4",
         setup=generated_with_more_samples, lost="nothing: the file is unchanged"),
    Case("out-jsonl-parent-file", "output", "generate-data --out inside a path that is a file",
         (*GEN_DATA, "--out", "{out}"), "afile", setup=jsonl_out_parent_is_a_file),
    Case("out-report-exists", "output", "report --out that exists",
         (*REPORT, "--out", "{out}"), "already exists: choose another path or pass --overwrite",
         setup=out_is_a_project, lost="nothing: the directory is byte-identical"),
    Case("out-report-overwrite-project", "output", "report --overwrite naming a directory that is not a report",
         (*REPORT, "--out", "{out}", "--overwrite"), "--overwrite only replaces earlier reports",
         setup=out_is_a_project, lost="nothing; refused before any work"),
    Case("out-report-overwrite", "output", "report --overwrite of an earlier report",
         (*REPORT, "--out", "{out}", "--overwrite"), "2 runs", code=0, setup=earlier_report, check=report_replaced,
         lost="the earlier report, as asked"),
    # ---- interruption
    Case("int-quantize", "interruption", "Ctrl-C in the middle of quantize",
         QUANTIZE, "interrupted", setup=interrupted_quantize, check=both(out_absent, work_dir_kept),
         lost="nothing: no output; the 2 finished blocks stay in .OUT.work"),
    Case("int-quantize-resume", "interruption", "quantize rerun after Ctrl-C",
         (*QUANTIZE, "--json"), '"quantized_modules": 21', code=0, setup=resume_after_interrupt,
         check=resumed_bytes_equal_a_fresh_run,
         lost="nothing: resumed; weights byte-identical to an uninterrupted run"),
    Case("int-overwrite", "interruption", "Ctrl-C while replacing a checkpoint (--overwrite)",
         (*QUANTIZE, "--overwrite"), "interrupted", setup=interrupted_while_replacing,
         lost="nothing: the old checkpoint is byte-identical"),
    Case("int-eval", "interruption", "Ctrl-C during eval",
         ("eval", "{ckpt}", *EVAL), "interrupted", setup=lambda ctx: _interrupt_forward(ctx)),
    Case("int-generate", "interruption", "Ctrl-C during generate",
         ("generate", "{ckpt}", "--prompt", "Hi", "--max-new-tokens", "4"), "interrupted",
         setup=lambda ctx: _interrupt_forward(ctx, 2)),
    Case("int-qat", "interruption", "Ctrl-C during QAT training",
         (*QAT, "--out", "{out}"), "interrupted", setup=interrupted_qat, check=both(out_absent, training_state_kept),
         lost="nothing: no output; the step-1 training state stays in .OUT.work"),
    Case("int-qat-resume", "interruption", "qat rerun after Ctrl-C",
         (*QAT, "--out", "{out}", "--json"), '"bits": "4-8-4"', code=0, setup=resume_qat,
         lost="nothing: resumed from the saved step"),
    Case("int-finetune", "interruption", "Ctrl-C during finetune training",
         (*FINETUNE, "--out", "{out}"), "interrupted", setup=interrupted_finetune,
         check=both(out_absent, training_state_kept),
         lost="nothing: no output; the step-1 adapter state stays in .OUT.work"),
    Case("int-finetune-resume", "interruption", "finetune rerun after Ctrl-C",
         (*FINETUNE, "--out", "{out}", "--json"), '"resumed_from": 1', code=0, setup=resume_finetune,
         lost="nothing: resumed from the saved step"),
    Case("int-generate-data", "interruption", "Ctrl-C during generate-data",
         (*GEN_DATA, "--out", "{out}"), "interrupted", setup=interrupted_generate_data, check=whole_lines_only,
         lost="nothing: the finished batch is kept, whole lines only"),
    # ---- concurrency
    Case("con-locked", "concurrency", "quantize into an --out another process is writing",
         QUANTIZE, "another quantlm run is writing", setup=hold_output_lock, check=both(out_absent, no_work_dir)),
    Case("con-locked-overwrite", "concurrency", "--overwrite of a checkpoint another process is writing",
         (*QUANTIZE, "--overwrite"), "another quantlm run is writing", setup=hold_lock_on_existing,
         lost="nothing: the checkpoint is byte-identical"),
    Case("con-stale-lock", "concurrency", "lock file a killed run left behind",
         (*QUANTIZE, "--json"), '"quantized_modules": 21', code=0, setup=stale_lock_file,
         lost="nothing: the lock is taken over and removed"),
    Case("con-qat-locked", "concurrency", "qat into an --out another process is writing",
         (*QAT, "--out", "{out}"), "another quantlm run is writing", setup=hold_output_lock, check=no_work_dir,
         lost="nothing; refused before training"),
    Case("con-generate-data-locked", "concurrency", "generate-data into a file another process is writing",
         (*GEN_DATA, "--out", "{out}"), "another quantlm run is writing", setup=hold_jsonl_lock, check=jsonl_absent,
         lost="nothing; refused before writing"),
    Case("con-work-dir", "concurrency", "--work-dir that belongs to another run",
         ("quantize", "{model}", "--group-size", "16", "--work-dir", "{work}", "--out", "{out}"),
         "belongs to a different run", setup=keep_first_work_dir,
         lost="nothing: the other run's work directory is unchanged"),
    # ---- corruption
    Case("cor-eval", "corruption", "damaged tensor bytes, eval",
         ("eval", "{ckpt}", *EVAL), "model.safetensors does not match its recorded checksum", setup=damaged_ckpt),
    Case("cor-generate", "corruption", "damaged tensor bytes, generate",
         ("generate", "{ckpt}", "--prompt", "Hi", "--max-new-tokens", "2"),
         "model.safetensors does not match its recorded checksum", setup=damaged_ckpt),
    Case("cor-bench", "corruption", "damaged tensor bytes, bench",
         ("bench", "{ckpt}", *BENCH), "model.safetensors does not match its recorded checksum", setup=damaged_ckpt),
    Case("cor-verify", "corruption", "damaged tensor bytes, verify",
         ("verify", "{ckpt}"), "the file is damaged", setup=damaged_ckpt, many_lines=True),
    Case("cor-truncated", "corruption", "truncated model.safetensors, verify",
         ("verify", "{ckpt}"), "is unreadable or corrupt", setup=truncated_ckpt, many_lines=True),
    Case("cor-truncated-unverified", "corruption", "truncated model.safetensors, QUANTLM_VERIFY=0",
         ("eval", "{ckpt}", *EVAL), "model.safetensors is unreadable or corrupt", setup=truncated_ckpt_unverified),
    Case("cor-weights-missing", "corruption", "model.safetensors deleted",
         ("eval", "{ckpt}", *EVAL), "model.safetensors is missing", setup=weights_file_removed),
    Case("cor-checksums-not-json", "corruption", "checksums.json that is not JSON",
         ("eval", "{ckpt}", *EVAL), "checksums.json is unreadable", setup=checksums_not_json),
    Case("cor-checksum-entry", "corruption", "weights damaged and their checksums.json entry removed",
         ("verify", "{ckpt}"), "model.safetensors", setup=checksum_entry_removed_and_damaged, many_lines=True),
    Case("cor-checksums-removed", "corruption", "weights damaged and checksums.json deleted",
         ("eval", "{ckpt}", *EVAL), "checksums.json", setup=checksums_removed_and_damaged),
    Case("cor-unrelated-files", "corruption", "a user's eval.json and a macOS ._ file put inside a checkpoint",
         ("eval", "{ckpt}", *EVAL), "perplexity", code=0, setup=unrelated_files_in_checkpoint),
    Case("cor-checksums-list", "corruption", "checksums.json that is JSON but not a record",
         ("eval", "{ckpt}", *EVAL), "is not a checksum record", setup=checksums_a_list),
    Case("cor-config-edited", "corruption", "config.json edited by hand",
         ("eval", "{ckpt}", *EVAL), "config.json does not match its recorded checksum", setup=config_edited),
    Case("cor-config-unverified", "corruption", "config.json edited, QUANTLM_VERIFY=0",
         ("eval", "{ckpt}", *EVAL), "cannot rebuild the model from", setup=config_edited_unverified),
    Case("cor-log", "corruption", "quant_log.json that is not JSON",
         ("eval", "{ckpt}", *EVAL), "quant_log.json does not match its recorded checksum", setup=quant_log_not_json),
    Case("cor-nan-scales", "corruption", "non-finite scales (checksums recomputed)",
         ("eval", "{ckpt}", *EVAL), "has non-finite scales in", setup=nan_scales),
    Case("cor-format-version", "corruption", "checkpoint of a newer format version",
         ("eval", "{ckpt}", *EVAL), "was written by a newer quantlm", setup=newer_format),
    Case("cor-module-spec", "corruption", "a module's spec in config.json edited (checksums recomputed)",
         ("eval", "{ckpt}", *EVAL), "bits must be an integer between 2 and 8, got 'four'", setup=module_spec_edited),
    Case("cor-work-block", "corruption", "damaged block in the work directory, on resume",
         QUANTIZE, "block-0001", setup=damaged_work_block),
    Case("cor-work-meta", "corruption", "block record in the work directory that is not JSON, on resume",
         QUANTIZE, "block-0000", setup=work_block_meta_not_json),
    Case("cor-work-run", "corruption", "run.json in the work directory that is not JSON, on resume",
         QUANTIZE, "belongs to a different run", setup=work_run_file_not_json),
    Case("cor-train-state", "corruption", "QAT training state that is not JSON, on resume",
         (*QAT, "--out", "{out}"), "cannot read the state in", setup=training_state_not_json),
    Case("cor-qat-init", "corruption", "qat --init with a damaged checkpoint",
         (*QAT, "--group-size", "16", "--asym", "--init", "{ckpt}", "--out", "{out}"),
         "model.safetensors does not match its recorded checksum", setup=damaged_ckpt),
    Case("cor-verify-good", "corruption", "verify an intact checkpoint",
         ("verify", "{ckpt}"), ": ok", code=0),
    Case("cor-verify-float", "corruption", "verify a plain model directory",
         ("verify", "{model}"), "is not a quantlm checkpoint", many_lines=True),
    # ---- security
    Case("sec-pickle-quantize", "security", "model whose only weights are a pickle (.bin), quantize",
         QUANTIZE, "has no safetensors weights", setup=pickle_only_source, check=no_payload,
         lost="nothing; the pickle is never unpickled"),
    Case("sec-pickle-eval", "security", "model whose only weights are a pickle (.bin), eval",
         ("eval", "{model}", *EVAL), "safetensors", setup=pickle_only_source, check=no_payload,
         lost="nothing; the pickle is never opened"),
    Case("sec-pickle-beside", "security", "pickle planted beside the safetensors weights",
         ("eval", "{model}", *EVAL), "perplexity", code=0, setup=pickle_beside_safetensors, check=no_payload,
         lost="nothing; the pickle is never unpickled"),
    Case("sec-pickle-in-checkpoint", "security", "pickle planted in a quantlm checkpoint",
         ("eval", "{ckpt}", *EVAL), "perplexity", code=0, setup=pickle_in_checkpoint, check=no_payload,
         lost="nothing; the pickle is never unpickled"),
    Case("sec-qat-pickle", "security", "train_state.pt pickle planted in the QAT work directory",
         (*QAT, "--out", "{out}", "--json"), '"bits": "4-8-4"', code=0, setup=pickle_in_qat_work_dir,
         check=no_payload,
         lost="nothing; the pickle is never unpickled"),
    Case("sec-qat-state-pickle", "security", "QAT state index pointing at a pickle",
         (*QAT, "--out", "{out}"), "cannot read the state in", setup=state_index_names_a_pickle, check=no_payload,
         lost="nothing; the pickle is never unpickled"),
    Case("sec-yaml-tag", "security", "recipe YAML with a python object tag",
         ("quantize", "{model}", "--recipe", "{dir}/evil.yaml", "--out", "{out}"), "is not valid YAML",
         setup=yaml_python_tag, check=no_payload,
         lost="nothing; the tag is never constructed"),
    Case("sec-remote-code", "security", "config.json asking for custom model code (auto_map)",
         QUANTIZE, "rtn(w4 g16 asym): 21 modules", code=0, setup=remote_code_in_config, check=no_payload,
         lost="nothing; the custom code is never imported"),
    Case("sec-remote-tokenizer", "security", "tokenizer_config.json asking for custom tokenizer code",
         ("eval", "{model}", *EVAL), "perplexity", code=0, setup=remote_code_in_tokenizer, check=no_payload,
         lost="nothing; the custom code is never imported"),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------- docs
TABLE_BEGIN = "<!-- fault cases: generated by `python tests/fault_cases.py --write`; do not edit by hand -->"
TABLE_END = "<!-- end of fault cases -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _seen(case: Case) -> str:
    if case.code == 0:
        shown = f"exit 0; prints `…{case.expect}…`"
    else:
        shown = f"`error: …{case.expect}…`"
    if case.bug:
        return f"should be {shown}; **today**: {case.bug}"
    return shown


def table_markdown() -> str:
    """The cases as a markdown table, in the order of CASES."""
    lines = [
        "| category | case | what the user sees | anything lost? |",
        "|---|---|---|---|",
    ]
    for case in CASES:
        lines.append(f"| {case.category} | {_cell(case.title)} | {_cell(_seen(case))} | {_cell(case.lost)} |")
    return "\n".join(lines)


def generated_block() -> str:
    return f"{TABLE_BEGIN}\n{table_markdown()}\n{TABLE_END}"


DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


def write_doc(path: Path = DOC) -> None:
    text = path.read_text()
    pattern = re.compile(re.escape(TABLE_BEGIN) + r".*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no generated table block ({TABLE_BEGIN!r} ... {TABLE_END!r})")
    path.write_text(pattern.sub(lambda _: generated_block(), text))


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_doc()
    else:
        print(generated_block())
