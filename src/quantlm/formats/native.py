"""quantlm's own checkpoint: a Hugging Face directory whose Linears are stored packed.

Layout of a checkpoint directory:
- ``config.json``: the model's transformers config plus ``quantization_config``: quant_method "quantlm", the
  format version, the quantlm version, the recipe and its calibration (``quantlm.formats.record``), and for every
  quantized module its QuantSpec;
- ``model.safetensors``: float tensors as they are in the model, and for each quantized module
  ``{name}.qweight`` (packed uint8 codes), ``{name}.scales``, ``{name}.zeros`` (and ``{name}.bias``); codebook
  layers (NF4/FP4) have no zeros, HQQ's zeros are fp16/fp32, and double-quantized layers hold ``scale_codes`` and
  ``scale_range`` instead of ``scales`` (``quantlm.nn.qlinear``); tensors shared by tied modules are stored once;
- ``quantization_config.kv_cache`` (when the KV cache is quantized): its bits and grid;
- ``quant_log.json``: the per-module log of the run (error, seconds, settings);
- ``checksums.json``: the SHA-256 of every other file, checked when the checkpoint is loaded (``verify=False`` or
  ``QUANTLM_VERIFY=0`` skips it), so damaged bytes are an error instead of a model that computes garbage;
- the tokenizer files and ``generation_config.json`` when known.
The directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from quantlm.errors import CheckpointError, QuantlmError, first_line
from quantlm.formats.record import QuantizationRecord
from quantlm.formats.safetensors_io import write_streaming
from quantlm.models.blocks import set_submodule
from quantlm.models.skeleton import empty_model
from quantlm.nn.kv_cache import enable_kv_quantization
from quantlm.nn.qlinear import QuantLinear, layout_scale_dtype
from quantlm.paths import atomic_directory, atomic_write_text, quantlm_home

FORMAT_NAME = "quantlm"
FORMAT_VERSION = 4  # the newest this reader takes, and what a checkpoint that needs it is written as
# 2: the calibration once per recipe, head-only and QAT steps in the method registry's terms; 3: module layouts
# with a codebook grid, float zero points or double-quantized scales; 4: K-quant grids (scale_bits). A checkpoint
# is written as the oldest version that holds its layouts, so that earlier quantlm versions read it where they can
# and say "upgrade" instead of failing on a layout where they cannot.
LAYOUT_KEYS_OF_VERSION = {3: ("codebook", "zero_dtype", "double_quant"), 4: ("scale_bits",)}


def format_version(modules: dict[str, dict]) -> int:
    """The format version a checkpoint with these module layouts is written as."""
    keys = {key for layout in modules.values() for key in layout}
    return max([2, *(v for v, names in LAYOUT_KEYS_OF_VERSION.items() if keys & set(names))])


WEIGHTS_FILE = "model.safetensors"
LOG_FILE = "quant_log.json"
CHECKSUMS_FILE = "checksums.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(directory: Path) -> None:
    """Record the SHA-256 of every file in ``directory`` (but the record itself)."""
    sums = {p.name: _sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != CHECKSUMS_FILE}
    (directory / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=1, sort_keys=True) + "\n")


# what a model directory holds besides weights and config: its tokenizer and generation settings
TOKENIZER_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
READ_FILES = frozenset({"config.json", LOG_FILE, *TOKENIZER_FILES})  # besides the weights: what loading reads


def _needs_checksum(name: str) -> bool:
    """Whether a file of this name is one a checkpoint is read from (weights, config, log, tokenizer), and so must
    have a recorded checksum; other files (a README or an eval.json someone put there) are left alone."""
    return not name.startswith(".") and (name.endswith(".safetensors") or name in READ_FILES)


def _promises_checksums(path: Path) -> bool:
    """Whether the checkpoint was written with a checksum record (its config says so; older ones were not)."""
    try:
        qc = read_quantization_config(path)
    except CheckpointError:
        return False
    return bool(qc) and qc.get("checksums") == CHECKSUMS_FILE


def checksum_problems(path: str | os.PathLike) -> list[str]:
    """Every file whose bytes differ from the checksum recorded when the checkpoint was written, that is missing,
    or that is read from the checkpoint but has no recorded checksum (added later, or its entry removed); a
    missing record where the checkpoint's config says there is one. [] for a checkpoint written before
    checksums were recorded."""
    path = Path(path)
    record = path / CHECKSUMS_FILE
    if not record.is_file():
        if _promises_checksums(path):
            return [f"{record} is missing: the checkpoint's files cannot be checked"]
        return []
    try:
        sums = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [f"{record} is unreadable: {e}"]
    if not isinstance(sums, dict):
        return [f"{record} is not a checksum record (a JSON object of file names and SHA-256 digests)"]
    problems = []
    for name, expected in sums.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif _sha256(file) != expected:
            problems.append(f"{file} does not match its recorded checksum: the file is damaged")
    for file in sorted(path.iterdir()):
        if file.is_file() and _needs_checksum(file.name) and file.name not in sums:
            problems.append(
                f"{file} has no recorded checksum (added later, or its entry removed from {record.name}): move it out "
                "of the checkpoint"
            )
    return problems


def _stamp_file(path: Path) -> Path:
    return quantlm_home() / "verified" / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]}.json"


def _file_stats(path: Path) -> dict[str, list[int]] | None:
    """Size, modification time and inode of every file the checksums cover (None: unreadable)."""
    try:
        names = json.loads((path / CHECKSUMS_FILE).read_text(encoding="utf-8"))
        guarded = [p.name for p in path.iterdir() if p.is_file() and _needs_checksum(p.name)]
        stats = {name: os.stat(path / name) for name in sorted({*names, *guarded, CHECKSUMS_FILE})}
    except (OSError, ValueError):
        return None
    return {name: [st.st_size, st.st_mtime_ns, st.st_ino] for name, st in stats.items()}


def verify_checkpoint_files(path: Path) -> None:
    """Raise if a file differs from its recorded checksum. A checkpoint verified before whose files have not been
    touched since (same size, modification time and inode, remembered under ``$QUANTLM_HOME/verified``) is not
    hashed again: about 0.12 s per 172 MB is paid once, not on every load."""
    stats = _file_stats(path)
    stamp = _stamp_file(path)
    if stats is not None:
        try:
            if json.loads(stamp.read_text(encoding="utf-8")) == stats:
                return
        except (OSError, ValueError):
            pass
    problems = checksum_problems(path)
    if problems:
        raise CheckpointError(f"{problems[0]}: re-create the checkpoint (QUANTLM_VERIFY=0 skips the check)")
    if stats is not None:
        with contextlib.suppress(OSError):
            atomic_write_text(stamp, json.dumps(stats))


def verification_enabled(verify: bool | None) -> bool:
    return os.environ.get("QUANTLM_VERIFY", "1") != "0" if verify is None else verify


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tensors that are empty (meta: held by a block store instead) or that share storage
    with an earlier entry (tied embeddings, kept once under their first name)."""
    seen: set[tuple[int, int, tuple]] = set()
    tensors = {}
    for name, t in model.state_dict().items():
        if t.is_meta:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors


class BlockSource(Protocol):
    """Finished decoder blocks kept outside the model (``quantlm.pipeline.store.BlockStore``)."""

    def finished(self) -> int: ...

    def layout(self, i: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]: ...

    def tensors(self, i: int) -> dict[str, torch.Tensor]: ...

    def modules(self, i: int) -> dict[str, Any]: ...


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    record: QuantizationRecord,
    tokenizer=None,
    overwrite: bool = False,
    blocks: BlockSource | None = None,
) -> Path:
    """Write ``model`` as a quantlm checkpoint, with ``record`` saying how it was made. With ``blocks``, the decoder
    blocks' tensors are streamed from there one block at a time (the model's own copies of them may be empty)."""
    path = Path(path)
    check_output(path, overwrite)
    own = unique_state_dict(model)
    modules = {name: m.layout() for name, m in quantized_modules(model).items()}
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in own.items()]
    chunks: list = [lambda: own]
    n_stored = blocks.finished() if blocks is not None else 0
    for i in range(n_stored):
        modules.update(blocks.modules(i))
        block_layout = [entry for entry in blocks.layout(i) if entry[0] not in own]
        layout.extend(block_layout)
        names = [entry[0] for entry in block_layout]
        chunks.append(lambda i=i, names=names: {n: t for n, t in blocks.tensors(i).items() if n in names})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = {
        "quant_method": FORMAT_NAME,
        "format_version": format_version(modules),
        "checksums": CHECKSUMS_FILE,  # every file's SHA-256 is recorded there: its absence is damage
        **record.config_entries(),
        "modules": modules,
    }
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_streaming(tmp / WEIGHTS_FILE, layout, chunks, metadata={"format": "pt", "quantlm": record.version})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / LOG_FILE).write_text(json.dumps(record.log, indent=1) + "\n")
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_checksums(tmp)
    return path


def check_output(path: str | os.PathLike, overwrite: bool, replaceable=None, kind: str = "checkpoint") -> None:
    """Refuse an output that exists, unless ``overwrite``; and even then one that is not a directory, or a
    directory that is neither empty nor a quantlm ``kind`` (``replaceable(path)`` says; default: a checkpoint): a
    mistyped output must not delete someone's project."""
    path = Path(path)
    replaceable = is_quantlm_checkpoint if replaceable is None else replaceable
    if path.exists() and not overwrite:
        raise CheckpointError(f"output directory {path} already exists: choose another path or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory: choose another output")
    if path.is_dir() and any(path.iterdir()) and not replaceable(path):
        raise CheckpointError(
            f"{path} is not a quantlm {kind}: --overwrite only replaces {kind}s; choose another output"
        )


def read_quantization_config(path: str | os.PathLike) -> dict[str, Any] | None:
    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no config.json: not a model directory") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {config_file}: {e}") from None
    qc = config.get("quantization_config")
    return qc if isinstance(qc, dict) and qc.get("quant_method") == FORMAT_NAME else None


def is_quantlm_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and read_quantization_config(p) is not None


def read_quant_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    try:
        return json.loads((Path(path) / LOG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []


def read_record(path: str | os.PathLike) -> QuantizationRecord:
    """How the checkpoint at ``path`` was made (any format version)."""
    qc = read_quantization_config(path)
    if qc is None:
        raise CheckpointError(f"{path} is not a quantlm checkpoint (no quantization_config with quant_method quantlm)")
    return QuantizationRecord.from_config_entries(qc, read_quant_log(path))


def assemble_model(path: Path, modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor], where) -> nn.Module:
    """The model of the config at ``path`` with ``modules`` in place and every tensor assigned from ``tensors`` (read
    from ``where``, named in errors): a tensor the model lacks, or a parameter no tensor fills, is an error."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = empty_model(config)
        for name, module in modules.items():
            set_submodule(model, name, module)
        result = model.load_state_dict(tensors, strict=False, assign=True)
    except QuantlmError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot rebuild the model from {path}: {first_line(e)}") from None
    if result.unexpected_keys:
        raise CheckpointError(f"{where} has tensors the model does not: {', '.join(result.unexpected_keys[:5])}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise CheckpointError(f"{where} lacks tensors: {', '.join(missing[:5])}: the checkpoint is incomplete")
    return model


def load_checkpoint(
    path: str | os.PathLike, *, device: str | torch.device | None = None, verify: bool | None = None
) -> nn.Module:
    """Rebuild the quantized model of a quantlm checkpoint: the skeleton without weights, QuantLinears where the
    config lists them, then every tensor assigned from the safetensors file. Every file is first checked against
    its recorded checksum (``verify``: None = unless ``QUANTLM_VERIFY=0``), and non-finite scales are refused."""
    path = Path(path)
    qc = read_quantization_config(path)
    if qc is None:
        raise CheckpointError(f"{path} is not a quantlm checkpoint (no quantization_config with quant_method quantlm)")
    if qc.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer quantlm ({qc.get('quantlm_version')}): upgrade quantlm")
    if verification_enabled(verify):
        verify_checkpoint_files(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}: the checkpoint is incomplete")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is unreadable or corrupt: {e}") from None
    modules = {}
    for name, entry in qc.get("modules", {}).items():
        scale_dtype = layout_scale_dtype(entry, tensors, name)
        if scale_dtype is None:
            raise CheckpointError(f"{weights} has no scales for {name}: the checkpoint is corrupt")
        try:
            modules[name] = QuantLinear.from_layout(entry, scale_dtype)
        except QuantlmError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot rebuild the model from {path}: {first_line(e)}") from None
    model = assemble_model(path, modules, tensors, weights)
    bad = [name for name, m in quantized_modules(model).items() if not torch.isfinite(m.scales).all()]
    if bad:
        raise CheckpointError(f"{weights} has non-finite scales in {', '.join(bad[:3])}: the checkpoint is corrupt")
    if device is not None:
        model = model.to(device)
    model.quantlm_record = QuantizationRecord.from_config_entries(qc, read_quant_log(path))
    enable_kv_quantization(model, model.quantlm_record.kv_cache)
    model.eval()
    return model
