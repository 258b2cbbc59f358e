"""Which formats quantlm exports and reads besides its own, by name: ``export_checkpoint`` and ``read_foreign``.

- ``gptq``: checkpoint_format v1 (``gptq``) when every layer is symmetric, else ``gptq_v2``; read by GPTQModel,
  transformers (through GPTQModel) and vLLM (v1);
- ``gptq-v2``: always ``gptq_v2``; GPTQModel and transformers;
- ``compressed-tensors``: ``pack-quantized`` (weight-only) or ``int-quantized`` (W8A8); transformers and vLLM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from quantlm.errors import QuantlmError
from quantlm.formats.compressed_tensors import CompressedTensorsFormat
from quantlm.formats.gptq import GPTQFormat
from quantlm.formats.interchange import LayerFormat, load_foreign, read_config, write_export
from quantlm.formats.native import check_output, is_quantlm_checkpoint, load_checkpoint, quantized_modules

EXPORT_FORMATS: dict[str, LayerFormat] = {
    "gptq": GPTQFormat(),
    "gptq-v2": GPTQFormat(version=2),
    "compressed-tensors": CompressedTensorsFormat(),
}
# how a checkpoint's quantization_config.quant_method names the format that reads it
READERS: dict[str, LayerFormat] = {"gptq": GPTQFormat(), "compressed-tensors": CompressedTensorsFormat()}


def export_format(name: str) -> LayerFormat:
    if name not in EXPORT_FORMATS:
        raise QuantlmError(f"unknown export format {name!r}: use one of {', '.join(EXPORT_FORMATS)}")
    return EXPORT_FORMATS[name]


def is_exported(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a checkpoint this module wrote or reads (what ``--overwrite`` may replace)."""
    return foreign_config(path) is not None


def export_checkpoint(
    checkpoint: str | os.PathLike, out: str | os.PathLike, *, format: str = "gptq", overwrite: bool = False
) -> Path:
    """Write the quantlm checkpoint at ``checkpoint`` as a ``format`` checkpoint directory at ``out``: the same
    codes, scales and zero points, bit for bit, in that format's layout. A layer the format cannot hold exactly is
    refused (nothing is re-rounded)."""
    fmt = export_format(format)
    checkpoint, out = Path(checkpoint), Path(out)
    if not is_quantlm_checkpoint(checkpoint):
        raise QuantlmError(f"{checkpoint} is not a quantlm checkpoint: quantize it first (quantlm quantize)")
    check_output(out, overwrite, replaceable=is_exported, kind=f"{format} export")
    if out.resolve() == checkpoint.resolve():
        raise QuantlmError("the export would replace the checkpoint it reads: choose another --out")
    model = load_checkpoint(checkpoint)
    return write_export(model, quantized_modules(model), fmt, out, source=checkpoint, overwrite=overwrite)


def foreign_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The quantization_config of a directory in a format quantlm reads besides its own (None: not one)."""
    path = Path(path)
    if not path.is_dir():
        return None
    config = read_config(path)
    qc = (config or {}).get("quantization_config")
    return qc if isinstance(qc, dict) and qc.get("quant_method") in READERS else None


def read_foreign(path: str | os.PathLike) -> nn.Module:
    """A GPTQ or compressed-tensors checkpoint (quantlm's export, GPTQModel's, llm-compressor's) as a model whose
    quantized Linears are QuantLinears holding the same weights."""
    path = Path(path)
    qc = foreign_config(path)
    if qc is None:
        raise QuantlmError(f"{path} is not a GPTQ or compressed-tensors checkpoint")
    return load_foreign(path, READERS[qc["quant_method"]], qc)
