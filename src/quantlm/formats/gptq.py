"""The GPTQ checkpoint format (AutoGPTQ's, kept by GPTQModel; read by transformers, vLLM and SGLang), both ways.

Per quantized Linear ``name`` (``in`` input and ``out`` output features, ``g`` groups along the input):
- ``name.qweight`` int32 ``[in * bits / 32, out]``: each output column's codes packed along the input, as one
  little-endian bit stream (32 codes in ``bits`` words, so 3-bit codes straddle words);
- ``name.qzeros`` int32 ``[g, out * bits / 32]``: the zero points packed the same way along the output. Format v1
  (``checkpoint_format: "gptq"``) stores zero - 1: GPTQModel subtracts the 1 from whole words when it writes (a
  zero of 0 borrows from the next field) and adds it back to whole words when it reads, and so does quantlm's
  reader; v2 (``"gptq_v2"``) stores the zero;
- ``name.scales`` fp16 ``[g, out]``; ``name.g_idx`` int32 ``[in]``, the group of each input column (act-order
  checkpoints permute it); ``name.bias``.
The weight is ``(q - zero) * scale``, the grid quantlm uses (symmetric: zero = 2**(bits-1)); a per-channel grid is
one group of all input columns. quantlm's rows of packed bytes are these bit streams already: export and import are
a reinterpretation of the bytes plus a transpose.

``--format gptq`` writes v1 (what every GPTQ reader takes) when every layer is symmetric (zero - 1 never wraps
there) and not 3-bit, and v2 otherwise; ``--format gptq-v2`` always writes v2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from quantlm._version import __version__
from quantlm.core import QuantSpec
from quantlm.core.packing import from_int32_words, pack, to_int32_words, unpack
from quantlm.errors import CheckpointError
from quantlm.formats.interchange import integer_grid_problem
from quantlm.nn.qlinear import QuantLinear

GPTQ_BITS = (2, 3, 4, 8)
QUANTIZE_CONFIG_FILE = "quantize_config.json"
CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 2}
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def natural_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """Each input column's group in natural order (one group when ``group_size`` is -1)."""
    size = in_features if group_size < 0 else group_size
    return (torch.arange(in_features, dtype=torch.int32) // size).to(torch.int32)


def _shared_settings(modules: dict[str, QuantLinear]) -> tuple[int, int, bool]:
    first = next(iter(modules.values())).spec
    return first.bits, first.group_size, first.symmetric


@dataclass(frozen=True)
class GPTQFormat:
    """GPTQ: ``version`` 0 writes v1 when every layer is symmetric (v1 cannot hold an asymmetric zero point of 0),
    else v2; ``version`` 2 always writes v2."""

    version: int = 0

    @property
    def name(self) -> str:
        return "gptq-v2" if self.version == 2 else "gptq"

    quant_method = "gptq"

    def checkpoint_format(self, symmetric: bool, bits: int) -> str:
        # 3-bit v1 zeros straddle words, and readers that add the 1 back word by word lose the carry: v2
        return "gptq" if self.version == 0 and symmetric and bits != 3 else "gptq_v2"

    def for_model(self, model) -> GPTQFormat:
        return self

    def why_not(self, module: QuantLinear) -> str | None:
        problem = integer_grid_problem(module)
        if problem is not None:
            return problem
        spec = module.spec
        if spec.bits not in GPTQ_BITS:
            return (
                f"GPTQ kernels take {', '.join(map(str, GPTQ_BITS))} bits, not {spec.bits}: quantize with one of them"
            )
        if module.act_bits is not None:
            return (
                f"its activations are quantized (a{module.act_bits}), which GPTQ has no field for: export as "
                "compressed-tensors"
            )
        if module.in_features * spec.bits % 32 or module.out_features * spec.bits % 32:
            return f"its shape {module.out_features}x{module.in_features} does not pack into 32-bit GPTQ words"
        scales = module.scales.float()
        if not torch.equal(scales.half().float(), scales):
            return "its scales are not fp16 numbers, as GPTQ stores them (double-quantized, or beyond fp16's range)"
        return None

    def check_model(self, modules: dict[str, QuantLinear]) -> str | None:
        """GPTQ has one grid for the whole model: bits, group size and symmetry must be the same everywhere."""
        bits, group_size, symmetric = _shared_settings(modules)
        for name, m in modules.items():
            if (m.spec.bits, m.spec.group_size, m.spec.symmetric) != (bits, group_size, symmetric):
                return (
                    f"GPTQ has one grid per model, and {name} is {m.spec.describe()} where others are "
                    f"{next(iter(modules.values())).spec.describe()}: quantize every layer alike, or export as "
                    "compressed-tensors"
                )
        return None

    def layer_tensors(self, module: QuantLinear) -> dict[str, torch.Tensor]:
        bits, symmetric = module.spec.bits, module.spec.symmetric
        zeros = module.zeros.to(torch.int32)  # [out, g]
        if module.spec.granularity == "tensor":
            zeros, scales = zeros[:, :1], module.scales[:, :1]
        else:
            scales = module.scales
        if self.checkpoint_format(symmetric, bits) == "gptq":
            zeros = zeros - 1  # symmetric: the middle code, so nothing wraps
        group_size = module.spec.group_size
        g_idx = module.g_idx if module.g_idx is not None else natural_g_idx(module.in_features, group_size)
        tensors = {
            "qweight": to_int32_words(module.qweight).T.contiguous(),
            "qzeros": to_int32_words(pack(zeros.T.to(torch.uint8), bits)),
            "scales": scales.T.to(torch.float16).contiguous(),
            "g_idx": g_idx.to(torch.int32).contiguous(),
        }
        if module.bias is not None:
            tensors["bias"] = module.bias.detach()
        return tensors

    def quantization_config(self, modules: dict[str, QuantLinear], float_linears: list[str]) -> dict[str, Any]:
        bits, group_size, symmetric = _shared_settings(modules)
        # Linears of the decoder blocks left in floating point: GPTQModel's "dynamic" rules skip them ("-:" regex)
        skipped = {f"-:^{re.escape(name)}$": {} for name in float_linears if name != "lm_head"}
        qc = {
            "quant_method": self.quant_method,
            "bits": bits,
            "group_size": group_size,
            "sym": symmetric,
            "desc_act": any(m.g_idx is not None for m in modules.values()),
            "lm_head": False,
            "checkpoint_format": self.checkpoint_format(symmetric, bits),
            "pack_dtype": "int32",
            "meta": {"quantizer": [f"quantlm:{__version__}"]},
        }
        if skipped:
            qc["dynamic"] = skipped
        return qc

    def extra_files(self, qc: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {QUANTIZE_CONFIG_FILE: qc}

    def read_layers(self, qc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, QuantLinear]:
        bits, group_size = int(qc.get("bits", 4)), int(qc.get("group_size", -1))
        checkpoint_format = qc.get("checkpoint_format", "gptq")
        if bits not in GPTQ_BITS or checkpoint_format not in CHECKPOINT_FORMATS:
            raise CheckpointError(
                f"quantlm reads GPTQ checkpoints of {', '.join(map(str, GPTQ_BITS))} bits in format gptq or gptq_v2, "
                f"not {bits} bits in {checkpoint_format!r}"
            )
        names = [key.removesuffix(".qweight") for key in tensors if key.endswith(".qweight")]
        return {
            name: gptq_layer(
                {s: tensors.pop(f"{name}.{s}") for s in SUFFIXES if f"{name}.{s}" in tensors},
                tensors.pop(f"{name}.bias", None),
                bits=bits,
                group_size=group_size,
                v1=checkpoint_format == "gptq",
                symmetric=bool(qc.get("sym", True)),
            )
            for name in names
        }


def gptq_layer(
    t: dict[str, torch.Tensor], bias: torch.Tensor | None, *, bits: int, group_size: int, v1: bool, symmetric: bool
) -> QuantLinear:
    """One GPTQ layer's tensors as a QuantLinear holding the same weight."""
    words, out_features = t["qweight"].shape
    in_features = words * 32 // bits
    qweight = from_int32_words(t["qweight"].T.contiguous(), bits, in_features)
    groups = t["scales"].shape[0]
    qzeros = t["qzeros"].contiguous()
    if v1 and bits != 3:  # v1 holds zero - 1; GPTQModel writes it by subtracting from whole words (a zero of 0
        # borrows from the next field) and reads it back by adding to whole words: do the same
        ones = sum(1 << (bits * i) for i in range(32 // bits))
        qzeros = ((qzeros.to(torch.int64) + ones) & 0xFFFFFFFF).to(torch.uint32).view(torch.int32)
    zeros = unpack(from_int32_words(qzeros, bits, out_features), bits, out_features).T.to(torch.int32)
    if v1 and bits == 3:  # 3-bit fields straddle words: readers add the 1 back field by field
        zeros = (zeros + 1) & 7
    g_idx = t.get("g_idx")
    if group_size < 0 or groups == 1:
        group_size = -1
    # a "symmetric" checkpoint whose zeros are not the middle code is read as the asymmetric grid it is
    symmetric = symmetric and bool((zeros == 1 << (bits - 1)).all())
    spec = QuantSpec(bits=bits, symmetric=symmetric, group_size=group_size)
    scales = t["scales"].T.contiguous()
    if scales.dtype not in (torch.float16, torch.float32):
        scales = scales.float()
    codes = unpack(qweight, bits, in_features)
    return QuantLinear.from_codes(codes, scales, zeros.to(torch.uint8), spec, bias, g_idx=g_idx)
