"""Prepared kernel tensors kept on disk, so that loading a checkpoint does not repack its weights every time.

Some kernels rearrange a layer's stored codes into the layout of one fast op when the model loads (``int4pack``:
unpack the codes, widen them to int32, then torch's own int4 packing; about 0.15 s for SmolLM2-135M's 210 Linears,
more than half of the checkpoint's load time). That layout depends on the torch build and on the CPU (torch packs
differently for AVX-512 and AVX2), so it is not part of the portable checkpoint; it is cached instead:

- one safetensors file per (checkpoint weights file, its size and modification time, torch version, torch's CPU
  capability, compute dtype, kernel of every layer) under ``$QUANTLM_HOME/kernels/``, named by a digest of all
  that, so a rewritten checkpoint, another torch or another CPU never sees a stale entry;
- only the tensors of kernels that say they are worth caching (``Kernel.cacheable``), and each one is checked
  against the shapes and dtypes its layer needs before use (anything else is rebuilt, and the entry rewritten);
- written through a temporary file and a rename; the most recently used ``MAX_ENTRIES`` entries are kept;
- never an error: an unreadable entry is removed and rebuilt, an unwritable cache directory means no cache.

``QUANTLM_KERNEL_CACHE=0`` (or ``quantlm.load(..., kernel_cache=False)``) turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from quantlm.paths import quantlm_home

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
MAX_ENTRIES = 8
ENV_SWITCH = "QUANTLM_KERNEL_CACHE"


def cache_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    return quantlm_home() / "kernels"


def entry_path(weights: Path, dtype: torch.dtype, kernels: dict[str, str]) -> Path | None:
    """The cache file for the prepared kernels of the checkpoint whose tensors are ``weights`` (None if that file
    cannot be read)."""
    try:
        weights = Path(weights).resolve()
        st = weights.stat()
    except OSError:
        return None
    identity = [
        CACHE_FORMAT,
        str(weights),
        st.st_size,
        st.st_mtime_ns,
        torch.__version__,
        torch.backends.cpu.get_cpu_capability(),
        str(dtype),
        sorted(kernels.items()),
    ]
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]
    return cache_dir() / f"{digest}.safetensors"


def read_entry(path: Path) -> dict[str, dict[str, Tensor]]:
    """{layer name: {tensor name: tensor}} from a cache file; empty when there is none or it is unreadable."""
    from safetensors.torch import load_file

    if not path.is_file():
        return {}
    try:
        flat = load_file(str(path))
        os.utime(path)  # most recently used
    except Exception as e:  # a torn or foreign file: drop it and rebuild
        log.info("kernel cache %s is unreadable (%s): rebuilding it", path, e)
        path.unlink(missing_ok=True)
        return {}
    layers: dict[str, dict[str, Tensor]] = {}
    for key, tensor in flat.items():
        layer, _, name = key.rpartition(".")
        layers.setdefault(layer, {})[name] = tensor
    return layers


def write_entry(path: Path, layers: dict[str, dict[str, Tensor]]) -> None:
    """Store the prepared tensors of ``layers`` at ``path`` atomically, then keep only the newest entries."""
    from safetensors.torch import save_file

    flat = {f"{layer}.{name}": t.contiguous() for layer, tensors in layers.items() for name, t in tensors.items()}
    if not flat:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        try:
            save_file(flat, tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        _prune(path.parent)
    except OSError as e:
        log.info("kernel cache not written to %s: %s", path, e)


def _prune(directory: Path) -> None:
    entries = []
    for p in directory.glob("*.safetensors"):
        try:
            entries.append((p.stat().st_mtime_ns, p))
        except OSError:
            continue
    for _, p in sorted(entries, reverse=True)[MAX_ENTRIES:]:
        p.unlink(missing_ok=True)
