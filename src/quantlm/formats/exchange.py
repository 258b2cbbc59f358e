"""Which formats quantlm exports and reads besides its own, by name: ``export_checkpoint`` and ``read_foreign``.

- ``gptq``: checkpoint_format v1 (``gptq``) when every layer is symmetric, else ``gptq_v2``; read by GPTQModel,
  transformers (through GPTQModel) and vLLM (v1);
- ``gptq-v2``: always ``gptq_v2``; GPTQModel and transformers;
- ``compressed-tensors``: ``pack-quantized`` (weight-only) or ``int-quantized`` (W8A8); transformers and vLLM;
- ``gguf``: one file, llama.cpp's block types (``quantlm.formats.gguf``); llama.cpp, Ollama, LM Studio. Float models
  export too (``--gguf-type`` for their tensors).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from quantlm.errors import QuantlmError
from quantlm.formats.compressed_tensors import CompressedTensorsFormat
from quantlm.formats.gguf import FLOAT_TYPES as GGUF_FLOAT_TYPES
from quantlm.formats.gguf import is_gguf_export, write_gguf
from quantlm.formats.gptq import GPTQFormat
from quantlm.formats.interchange import LayerFormat, is_quantlm_export, load_foreign, read_config, write_export
from quantlm.formats.native import check_output, is_quantlm_checkpoint, load_checkpoint, quantized_modules

EXPORT_FORMATS: dict[str, LayerFormat] = {
    "gptq": GPTQFormat(),
    "gptq-v2": GPTQFormat(version=2),
    "compressed-tensors": CompressedTensorsFormat(),
}
# how a checkpoint's quantization_config.quant_method names the format that reads it
READERS: dict[str, LayerFormat] = {"gptq": GPTQFormat(), "compressed-tensors": CompressedTensorsFormat()}


EXPORT_FORMAT_NAMES = (*EXPORT_FORMATS, "gguf")


def export_format(name: str) -> LayerFormat:
    if name not in EXPORT_FORMATS:
        raise QuantlmError(f"unknown export format {name!r}: use one of {', '.join(EXPORT_FORMAT_NAMES)}")
    return EXPORT_FORMATS[name]


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "gptq",
    overwrite: bool = False,
    gguf_type: str = "f32",
) -> Path:
    """Write the quantlm checkpoint at ``checkpoint`` as a ``format`` checkpoint directory at ``out`` (for gguf: one
    file; there ``checkpoint`` may also be any float model source, and ``gguf_type`` is the type of float tensors):
    the same codes, scales and zero points, bit for bit, in that format's layout. A layer the format cannot hold
    exactly is refused (nothing is re-rounded)."""
    if format == "gguf":
        return export_gguf(checkpoint, out, float_type=gguf_type, overwrite=overwrite)
    fmt = export_format(format)
    checkpoint, out = Path(checkpoint), Path(out)
    if not is_quantlm_checkpoint(checkpoint):
        raise QuantlmError(f"{checkpoint} is not a quantlm checkpoint: quantize it first (quantlm quantize)")
    # only an earlier export may be replaced, so never the checkpoint being read
    check_output(out, overwrite, replaceable=is_quantlm_export, kind=f"{format} export")
    model = load_checkpoint(checkpoint)
    return write_export(model, quantized_modules(model), fmt, out, source=checkpoint, overwrite=overwrite)


def export_gguf(source: str | os.PathLike, out: str | os.PathLike, *, float_type: str, overwrite: bool) -> Path:
    """A quantlm checkpoint, or a float model (alias, directory, hub id), as one GGUF file."""
    from quantlm.models.sources import load_float_model, resolve_model_dir

    out = Path(out)
    if out.suffix != ".gguf":
        raise QuantlmError(f"--out {out} must name a .gguf file")
    if out.exists() and not overwrite:
        raise QuantlmError(f"{out} already exists: choose another path or pass --overwrite")
    path = Path(str(source)).expanduser()
    if out.exists() and out.resolve() == path.resolve():
        raise QuantlmError("the export would replace the model it reads: choose another --out")
    if out.exists() and not is_gguf_export(out):
        raise QuantlmError(
            f"{out} is not a GGUF file quantlm wrote: --overwrite only replaces those; choose another output"
        )
    if float_type not in GGUF_FLOAT_TYPES:
        raise QuantlmError(f"unknown --gguf-type {float_type!r}: use one of {', '.join(GGUF_FLOAT_TYPES)}")
    if is_quantlm_checkpoint(path):
        model, tokenizer_dir = load_checkpoint(path), path
        origin = read_config(path).get("_name_or_path")
        model_dir = Path(origin) if origin and Path(origin).is_dir() else None
    else:
        tokenizer_dir = model_dir = resolve_model_dir(str(source))
        model = load_float_model(str(source), dtype="float32")
    write_gguf(model, out, tokenizer_dir=tokenizer_dir, float_type=float_type, model_dir=model_dir)
    return out


def read_gguf(path: str | os.PathLike) -> nn.Module:
    """A GGUF file as a model whose Linears stored as llama.cpp blocks (Q4_0 ... Q5_1, Q2_K ... Q6_K) are
    QuantLinears holding those blocks, the rest float (a GGUF without such blocks: a float model)."""
    from quantlm.formats.gguf import read_gguf_layers
    from quantlm.formats.record import QuantizationRecord
    from quantlm.models.blocks import set_submodule
    from quantlm.models.sources import load_float_model

    model = load_float_model(str(path), dtype="float32")
    layers = read_gguf_layers(Path(path), model)
    for name, layer in layers.items():
        set_submodule(model, name, layer)
    if layers:
        model.quantlm_record = QuantizationRecord()
    return model


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
