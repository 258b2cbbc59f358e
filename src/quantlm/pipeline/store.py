"""Finished blocks on disk: what lets an interrupted run resume at the next block and keeps memory near one block.

A work directory holds ``run.json`` (what run it belongs to) and, for each finished block, ``block-NNNN.json``
(its quant-log records and the QuantLinear layout) and ``block-NNNN.safetensors`` (its tensors), each written
under a temporary name and renamed, the tensors last, so a block counts as finished only when both are whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from quantlm.errors import CheckpointError, first_line
from quantlm.formats.safetensors_io import file_layout, read_file
from quantlm.models.blocks import DecoderBlocks, set_submodule
from quantlm.nn.qlinear import QuantLinear, layout_scale_dtype
from quantlm.paths import atomic_write_text
from quantlm.pipeline.runner import LayerRecord


class BlockStore:
    def __init__(self, work_dir: str | os.PathLike, signature: dict[str, Any]) -> None:
        self.dir = Path(work_dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise CheckpointError(f"work directory {self.dir} is a file: choose another --work-dir")
        run_file = self.dir / "run.json"
        present = list(self.dir.iterdir()) if self.dir.is_dir() else []
        foreign = [p for p in present if not p.name.startswith(".run.json.tmp-")]
        if foreign and not run_file.is_file():
            raise CheckpointError(  # the run removes its work directory at the end: never adopt someone's files
                f"work directory {self.dir} holds files but no run.json of a quantize run (--work-dir; default "
                ".OUT.work beside the output): choose a new or empty work directory"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        wanted = json.loads(json.dumps(signature, default=str))
        if run_file.is_file():
            try:
                existing = json.loads(run_file.read_text())
            except ValueError:
                existing = None
            if existing != wanted:
                raise CheckpointError(
                    f"work directory {self.dir} belongs to a different run (other model, recipe or calibration): "
                    "remove it or choose another --work-dir"
                )
        else:
            atomic_write_text(run_file, json.dumps(wanted, indent=1))

    def _paths(self, i: int) -> tuple[Path, Path]:
        return self.dir / f"block-{i:04d}.json", self.dir / f"block-{i:04d}.safetensors"

    def has(self, i: int) -> bool:
        meta, tensors = self._paths(i)
        return meta.is_file() and tensors.is_file()

    def finished(self) -> int:
        i = 0
        while self.has(i):
            i += 1
        return i

    def save(self, i: int, blocks: DecoderBlocks, records: list[LayerRecord]) -> None:
        block = blocks.blocks[i]
        prefix = f"{blocks.name(i)}."
        modules = {prefix + n: m.layout() for n, m in block.named_modules() if isinstance(m, QuantLinear)}
        meta, tensor_file = self._paths(i)
        atomic_write_text(
            meta, json.dumps({"records": [r.to_dict() for r in records], "modules": modules}, default=str)
        )
        tmp = tensor_file.with_name(tensor_file.name + ".tmp")
        save_file({prefix + k: v.detach().contiguous() for k, v in block.state_dict().items()}, str(tmp))
        os.replace(tmp, tensor_file)

    def _damaged(self, path: Path, error: Exception) -> CheckpointError:
        return CheckpointError(
            f"{path} in the work directory is damaged ({first_line(error)}): delete it (that block is redone) or "
            f"the whole {self.dir} to start over"
        )

    def _meta(self, i: int) -> dict[str, Any]:
        path = self._paths(i)[0]
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("modules"), dict):
                raise ValueError("not a block record")
            data["records"] = [LayerRecord(**r) for r in data["records"]]
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise self._damaged(path, e) from None
        return data

    def records(self, i: int) -> list[LayerRecord]:
        return self._meta(i)["records"]

    def restore(self, i: int, blocks: DecoderBlocks, device: torch.device | str = "cpu") -> list[LayerRecord]:
        """Put finished block ``i`` back into the model, QuantLinears and all."""
        data = self._meta(i)
        prefix = f"{blocks.name(i)}."
        tensors = self.tensors(i)
        block = blocks.blocks[i]
        try:
            for name, entry in data["modules"].items():
                scale_dtype = layout_scale_dtype(entry, tensors, name)
                if scale_dtype is None:
                    raise KeyError(f"{name}.scales")
                set_submodule(block, name[len(prefix) :], QuantLinear.from_layout(entry, scale_dtype))
            block.load_state_dict(
                {k[len(prefix) :]: v.to(device) for k, v in tensors.items()}, strict=True, assign=True
            )
        except (KeyError, RuntimeError, ValueError) as e:
            raise self._damaged(self._paths(i)[1], e) from None
        return data["records"]

    def tensors(self, i: int) -> dict[str, torch.Tensor]:
        path = self._paths(i)[1]
        try:
            return read_file(path)
        except (SafetensorError, OSError, ValueError) as e:  # the file is not whole
            raise self._damaged(path, e) from None

    def layout(self, i: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        path = self._paths(i)[1]
        try:
            return file_layout(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise self._damaged(path, e) from None

    def modules(self, i: int) -> dict[str, Any]:
        return self._meta(i)["modules"]
