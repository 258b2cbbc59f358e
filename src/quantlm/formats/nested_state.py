"""Nested state (dicts, lists and tuples of tensors and plain values, such as a model's, an optimizer's and a
scheduler's state dicts) in a safetensors file and a JSON file: never pickle, so reading it cannot run code.

``save_nested(directory, stem, state)`` writes the tensors to ``{stem}.{token}.safetensors`` and the structure,
with every tensor replaced by a reference, to ``{stem}.json`` (written last, atomically, naming its tensor file);
older tensor files of the same stem are removed after. An interrupted save leaves the previous state readable.
Tensors that are the same tensor (tied weights) are stored once.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from quantlm.errors import CheckpointError

_TENSOR, _DICT, _TUPLE = "__tensor__", "__dict__", "__tuple__"


def _encoder(tensors: dict[str, torch.Tensor]):
    names: dict[tuple, str] = {}
    storages: set[int] = set()

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu")
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if key not in names:
                names[key] = f"t{len(names)}"
                storage = t.untyped_storage().data_ptr()
                # safetensors refuses tensors that share memory: a view of a stored tensor's storage is copied
                tensors[names[key]] = t.clone() if storage in storages else t.contiguous()
                storages.add(storage)
            return {_TENSOR: names[key]}
        if isinstance(value, dict):
            return {_DICT: [[k, encode(v)] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {_TUPLE: [encode(v) for v in value]}
        if isinstance(value, list):
            return [encode(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise CheckpointError(f"cannot store a {type(value).__name__} in a training state (tensors and plain values)")

    return encode


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if _TENSOR in value:
            return tensors[value[_TENSOR]]
        if _TUPLE in value:
            return tuple(_decode(v, tensors) for v in value[_TUPLE])
        return {k: _decode(v, tensors) for k, v in value[_DICT]}
    return value


def save_nested(directory: str | os.PathLike, stem: str, state: Any) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encoder(tensors)(state)
    tensor_file = f"{stem}.{uuid.uuid4().hex[:12]}.safetensors"
    save_file(tensors, str(directory / tensor_file))
    index = directory / f"{stem}.json"
    tmp = index.with_name(index.name + ".tmp")
    tmp.write_text(json.dumps({"tensors": tensor_file, "state": structure}))
    os.replace(tmp, index)
    for old in directory.glob(f"{stem}.*.safetensors"):
        if old.name != tensor_file:
            old.unlink(missing_ok=True)
    return index


def has_nested(directory: str | os.PathLike, stem: str) -> bool:
    return (Path(directory) / f"{stem}.json").is_file()


def load_nested(directory: str | os.PathLike, stem: str) -> Any:
    """The state ``save_nested`` wrote; a damaged or incomplete one is a one-line ``CheckpointError``."""
    index = Path(directory) / f"{stem}.json"
    try:
        saved = json.loads(index.read_text(encoding="utf-8"))
        tensors = load_file(str(Path(directory) / saved["tensors"]))
        return _decode(saved["state"], tensors)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise CheckpointError(
            f"cannot read the state in {index} ({type(e).__name__}: {e}): delete it to start over"
        ) from None
