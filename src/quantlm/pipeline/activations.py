"""Where the calibration activations live between passes: in memory, or offloaded to files on disk.

The layer-wise pipeline holds one tensor per calibration mini-batch (the hidden states entering the current block,
the next block's inputs while they are being produced, recorded sub-module outputs). ``Batches`` is that list. On
disk each tensor is one safetensors file, read back one mini-batch at a time, so resident memory holds about one
mini-batch of activations instead of the whole calibration set.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_names = itertools.count()


class Batches:
    """An append-only list of tensors, each kept in memory (``directory=None``) or in a file under ``directory``."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = None if directory is None else Path(directory)
        self._items: list = []  # tensors, or (path, device) pairs when offloaded
        self.shapes: list[torch.Size] = []
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._prefix = f"batches-{next(_names)}"

    @property
    def offloaded(self) -> bool:
        return self.directory is not None

    def empty_like(self) -> Batches:
        """A new, empty list kept where this one is."""
        return Batches(self.directory)

    def append(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self.shapes.append(tensor.shape)
        if self.directory is None:
            self._items.append(tensor)
            return
        path = self.directory / f"{self._prefix}-{len(self._items):05d}.safetensors"
        save_file({"t": tensor.contiguous().cpu()}, str(path))
        self._items.append((path, tensor.device))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        if self.directory is None:
            return item
        path, device = item
        return load_file(str(path))["t"].to(device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self._items)):
            yield self[i]

    def consume(self) -> Iterator[torch.Tensor]:
        """Iterate once, dropping each tensor (and its file) as soon as it has been handed out."""
        for i in range(len(self._items)):
            tensor = self[i]
            if self.directory is not None:
                self._items[i][0].unlink(missing_ok=True)
            self._items[i] = None
            yield tensor
        self._items = []
        self.shapes = []

    def clear(self) -> None:
        """Drop every tensor (and its file)."""
        if self.directory is not None:
            for item in self._items:
                if item is not None:
                    item[0].unlink(missing_ok=True)
        self._items = []
        self.shapes = []


class OffloadDirectory:
    """A scratch directory for offloaded activations, removed when the run ends (also on errors)."""

    def __init__(self, parent: str | Path | None = None) -> None:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix="quantlm-activations-", dir=parent))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
