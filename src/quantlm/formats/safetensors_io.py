"""Safetensors access one piece at a time: an index of a checkpoint's tensors across its files, and a writer that
streams tensors into one file, so neither reading a model nor writing a quantized one needs it all in memory.

The writer follows the safetensors format: an 8-byte little-endian header length, a JSON header mapping each
tensor name to its dtype, shape and byte offsets, then the raw little-endian bytes of every tensor in order.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from quantlm.errors import CheckpointError

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class TensorIndex:
    """Which file of a Hugging Face checkpoint directory holds each tensor; loads tensors by name."""

    def __init__(self, model_dir: str | os.PathLike) -> None:
        self.model_dir = Path(model_dir)
        index_file = self.model_dir / "model.safetensors.index.json"
        self.files: dict[str, Path] = {}
        try:
            if index_file.is_file():
                weight_map = json.loads(index_file.read_text())["weight_map"]
                self.files = {name: self.model_dir / file for name, file in weight_map.items()}
            else:
                for file in sorted(self.model_dir.glob("*.safetensors")):
                    with safe_open(str(file), "pt") as f:
                        self.files.update({name: file for name in f.keys()})
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            raise CheckpointError(f"cannot read the safetensors files of {self.model_dir}: {e}") from None
        if not self.files:
            raise CheckpointError(f"{self.model_dir} has no safetensors weights")

    def names(self) -> set[str]:
        return set(self.files)

    def load(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors; floating-point ones cast to ``dtype`` when given."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            try:
                with safe_open(str(file), "pt") as f:
                    for name in file_names:
                        t = f.get_tensor(name)
                        out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            except (OSError, SafetensorError) as e:
                raise CheckpointError(f"{file} is unreadable or corrupt: {e}") from None
        return out


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def write_streaming(
    path: str | os.PathLike,
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
    chunks: Iterable[Callable[[], dict[str, torch.Tensor]]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write one safetensors file whose tensors are described up front by ``layout`` (name, dtype, shape, in file
    order) and supplied piece by piece: each callable of ``chunks`` returns some of the tensors, in layout order."""
    header: dict[str, object] = {}
    offset = 0
    for name, dtype, shape in layout:
        if dtype not in _DTYPES:
            raise CheckpointError(f"cannot store tensor {name} of dtype {dtype} in safetensors")
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned
    expected = iter(layout)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for chunk in chunks:
            for name, tensor in chunk().items():
                want_name, want_dtype, want_shape = next(expected)
                if name != want_name or tensor.dtype != want_dtype or tuple(tensor.shape) != tuple(want_shape):
                    raise CheckpointError(f"tensor {name} does not match the announced layout ({want_name})")
                f.write(_raw_bytes(tensor))
    if next(expected, None) is not None:
        raise CheckpointError(f"{path}: fewer tensors were written than announced")


_FROM_NAME = {name: dtype for dtype, name in _DTYPES.items()}


def file_layout(path: str | os.PathLike) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor of a safetensors file, in the order ``read_file`` returns them."""
    with safe_open(str(path), "pt") as f:
        out = []
        for name in f.keys():
            piece = f.get_slice(name)
            out.append((name, _FROM_NAME[piece.get_dtype()], tuple(piece.get_shape())))
        return out


def read_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}
