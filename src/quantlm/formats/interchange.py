"""Checkpoints other runtimes load, both ways: quantlm checkpoints exported as them, and theirs read as quantlm models.

A format (``quantlm.formats.gptq``, ``quantlm.formats.compressed_tensors``) is a ``LayerFormat``: it says why it
cannot hold a layer (``why_not``, as the kernels do), turns a ``QuantLinear`` into its tensors and back, and writes
its ``quantization_config``. This module does what every format shares: the checks, the float tensors, the files
of the directory (written under a temporary name and renamed when complete), and reading a directory back.

An export never re-rounds: a layer the format cannot hold exactly is refused, in one line that names it and says
what to quantize differently.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from quantlm._version import __version__
from quantlm.errors import CheckpointError, QuantlmError, first_line
from quantlm.formats.native import TOKENIZER_FILES, assemble_model, unique_state_dict
from quantlm.formats.record import QuantizationRecord
from quantlm.nn.qlinear import QuantLinear
from quantlm.paths import atomic_directory

WEIGHTS_FILE = "model.safetensors"
MARKER_FILE = "quantlm_export.json"  # what --overwrite looks for: it replaces only directories quantlm exported


class LayerFormat(Protocol):
    name: str  # what --format takes
    quant_method: str  # quantization_config.quant_method of its checkpoints

    def for_model(self, model: nn.Module) -> LayerFormat:
        """The format with its settings for this model (e.g. the dtype scales are written in)."""

    def why_not(self, module: QuantLinear) -> str | None:
        """Why this format cannot hold ``module`` exactly (None: it can)."""

    def layer_tensors(self, module: QuantLinear) -> dict[str, torch.Tensor]:
        """The tensors of one layer, by the suffix after its module name (``qweight``, ``weight_packed``, ...)."""

    def check_model(self, modules: dict[str, QuantLinear]) -> str | None:
        """Why this format cannot hold these layers together (None: it can)."""

    def quantization_config(self, modules: dict[str, QuantLinear], float_linears: list[str]) -> dict[str, Any]:
        """config.json's ``quantization_config`` for these quantized modules, with the Linears left in floating
        point."""

    def extra_files(self, qc: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """JSON files the format's loaders read besides config.json (name -> content)."""

    def read_layers(self, qc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, QuantLinear]:
        """The quantized modules of a checkpoint in this format, built from (and removed from) ``tensors``."""


def integer_grid_problem(module: QuantLinear, super_blocks: bool = False) -> str | None:
    """What no integer-grid format (GPTQ, compressed-tensors) holds: codebooks, K-quant grids (unless
    ``super_blocks``: GGUF's K types are them), fractional zero points, LLM.int8()'s outlier columns, and a last
    group narrower than the others."""
    spec = module.spec
    if spec.codebook != "none":
        return f"it is {spec.codebook}, a codebook grid (export it as GGUF, or quantize with rtn/gptq)"
    if spec.scale_bits is not None and not super_blocks:
        return (
            "it is on a K-quant grid (--scale-bits, --target-format gguf-...), whose scales are codes times one "
            "factor per 256 columns: export it as GGUF, or quantize without those options"
        )
    if module.zeros is not None and module.zeros.dtype != torch.uint8 and spec.scale_bits is None:
        return "its zero points are fractional (HQQ): quantize with rtn, gptq or awq, whose zero points are integers"
    if module.outlier_threshold is not None:
        return "it is an LLM.int8() layer (outlier columns in fp16): quantize with smoothquant for W8A8"
    if spec.granularity == "group" and module.in_features % spec.group_size:
        return (
            f"its {module.in_features} input columns are not a whole number of groups of {spec.group_size}: "
            "choose a group size that divides them"
        )
    return None


def float_tensors(model: nn.Module, modules: dict[str, QuantLinear]) -> dict[str, torch.Tensor]:
    """Every tensor of the model that is not part of a quantized module, once (tied weights under their first
    name, as transformers writes them)."""
    prefixes = tuple(f"{name}." for name in modules)
    return {name: t for name, t in unique_state_dict(model).items() if not name.startswith(prefixes)}


def refuse_layers(format_name: str, modules: dict[str, QuantLinear], why_not: Callable) -> None:
    """Refuse, in one line naming the first and counting the rest, the layers ``why_not`` gives a reason for."""
    problems = [(name, why) for name, m in modules.items() if (why := why_not(m)) is not None]
    if problems:
        name, why = problems[0]
        more = f" (and {len(problems) - 1} more layers)" if len(problems) > 1 else ""
        raise QuantlmError(f"{format_name} cannot hold {name}{more}: {why}")


def check_layers(fmt: LayerFormat, modules: dict[str, QuantLinear]) -> None:
    """Refuse, in one line, a model with a layer ``fmt`` cannot hold exactly."""
    if not modules:
        raise QuantlmError(f"the checkpoint has no quantized layers: {fmt.name} is a format for quantized models")
    refuse_layers(fmt.name, modules, fmt.why_not)
    problem = fmt.check_model(modules)
    if problem is not None:
        raise QuantlmError(problem)


def write_export(
    model: nn.Module,
    modules: dict[str, QuantLinear],
    fmt: LayerFormat,
    out: Path,
    *,
    source: Path | None,
    overwrite: bool,
) -> Path:
    """Write ``model`` as a ``fmt`` checkpoint directory at ``out`` (atomically), with the tokenizer and
    generation files of ``source``."""
    fmt = fmt.for_model(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, QuantLinear):
        raise QuantlmError(
            f"{fmt.name} export of a quantized lm_head is not supported yet: quantize without the head step"
        )
    check_layers(fmt, modules)
    float_linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    tensors = float_tensors(model, modules)
    for name, module in modules.items():
        tensors.update({f"{name}.{suffix}": t.contiguous() for suffix, t in fmt.layer_tensors(module).items()})
    config = model.config.to_dict()
    qc = fmt.quantization_config(modules, float_linears)
    config["quantization_config"] = qc
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        for file, content in fmt.extra_files(qc).items():
            (tmp / file).write_text(json.dumps(content, indent=2) + "\n")
        marker = {"format": fmt.name, "quantlm_version": __version__, "source": None if source is None else str(source)}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=1) + "\n")
        for file in TOKENIZER_FILES:  # the tokenizer and generation settings, as the checkpoint has them
            if source is not None and (source / file).is_file():
                shutil.copyfile(source / file, tmp / file)
    return out


def is_quantlm_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory quantlm exported (what ``--overwrite`` may replace)."""
    return (Path(path) / MARKER_FILE).is_file()


def read_config(path: str | os.PathLike) -> dict[str, Any] | None:
    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files (one file, or the shards of an index)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no .safetensors weights: only safetensors checkpoints are read")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file} is unreadable or corrupt: {first_line(e)}") from None
    return tensors


def load_foreign(path: Path, fmt: LayerFormat, qc: dict[str, Any]) -> nn.Module:
    """A checkpoint in ``fmt`` (made by quantlm's export or by another tool) as a model of QuantLinears."""
    tensors = read_weights(path)
    try:
        modules = fmt.read_layers(qc, tensors)
    except QuantlmError:
        raise
    except Exception as e:  # a tensor of the wrong shape or dtype: name the checkpoint, not our code
        raise CheckpointError(f"cannot read the {fmt.name} layers of {path}: {first_line(e)}") from None
    model = assemble_model(path, modules, tensors, path)
    model.quantlm_record = QuantizationRecord()  # no quantlm recipe made it
    model.eval()
    return model
