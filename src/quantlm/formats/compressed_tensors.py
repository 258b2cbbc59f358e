"""The compressed-tensors checkpoint format (llm-compressor's; read by transformers and vLLM), both ways.

Per quantized Linear ``name`` with ``out`` output and ``in`` input features:
- weight-only grids (``pack-quantized``, 2, 4 or 8 bits): ``name.weight_packed`` int32 ``[out, ceil(in * bits / 32)]``,
  each row's codes as one little-endian bit stream (the bytes of quantlm's ``qweight``, padded to whole words);
  ``name.weight_shape`` int64 ``[out, in]``; asymmetric grids add ``name.weight_zero_point`` int32
  ``[ceil(out * bits / 32), g]``, the zero points packed the same way down the output dimension;
- W8A8 (``int-quantized``): ``name.weight`` int8 ``[out, in]``, and ``name.weight_zero_point`` int8 when
  asymmetric; static per-tensor activations add ``name.input_scale``;
- ``name.weight_scale`` ``[out, g]``: fp32 for an fp32 model, else quantlm's storage dtype; and ``name.bias``.
compressed-tensors counts codes from the middle: its integer is quantlm's code minus 2**(bits-1), and its packer adds
that offset back, so the packed bytes are quantlm's. Symmetric grids store no zero point (it is the middle code).
``quantization_config.config_groups`` has one scheme per distinct layer setting, targeting its modules by name;
the Linears left in floating point are listed in ``ignore``.

Not expressible, so refused: act-order with permuted groups (compressed-tensors 0.20 has no g_idx), 3-bit codes
(their packing changed between compressed-tensors releases), codebook and fractional-zero grids. A quantized KV
cache is not carried: the format's ``kv_cache_scheme`` holds static per-tensor scales, quantlm's are per token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from quantlm.core import QuantSpec
from quantlm.core.packing import from_int32_words, pack, to_int32_words, unpack
from quantlm.errors import CheckpointError
from quantlm.formats.interchange import integer_grid_problem
from quantlm.nn.qlinear import QuantLinear

PACKED_BITS = (2, 4, 8)
PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
STRATEGIES = {"group": "group", "channel": "channel", "tensor": "channel"}  # a per-tensor grid: one scale per row


def _weight_args(spec: QuantSpec) -> dict[str, Any]:
    return {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "strategy": STRATEGIES[spec.granularity],
        "group_size": spec.group_size if spec.granularity == "group" else None,
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def _input_args(module: QuantLinear) -> dict[str, Any] | None:
    if module.act_bits is None:
        return None
    per_token = module.act_granularity == "token"
    return {
        "num_bits": module.act_bits,
        "type": "int",
        "symmetric": True,
        "strategy": "token" if per_token else "tensor",
        "group_size": None,
        "dynamic": per_token,
        "actorder": None,
        "block_structure": None,
        "observer": None if per_token else "minmax",
        "observer_kwargs": {},
    }


def scheme(module: QuantLinear) -> dict[str, Any]:
    """The layer's compressed-tensors scheme (without its targets)."""
    return {
        "weights": _weight_args(module.spec),
        "input_activations": _input_args(module),
        "output_activations": None,
        "format": INT_QUANTIZED if module.act_bits is not None else PACK_QUANTIZED,
    }


@dataclass(frozen=True)
class CompressedTensorsFormat:
    """``scale_dtype``: the dtype ``weight_scale`` is written in (None: quantlm's storage dtype). compressed-tensors
    dequantizes in the scale's dtype, so an fp32 model gets fp32 scales (``for_model``): fp16 ones would round
    every weight to fp16 in transformers."""

    scale_dtype: torch.dtype | None = None
    name = "compressed-tensors"
    quant_method = "compressed-tensors"

    def for_model(self, model) -> CompressedTensorsFormat:
        float_dtype = model.get_input_embeddings().weight.dtype
        return replace(self, scale_dtype=torch.float32 if float_dtype == torch.float32 else None)

    def why_not(self, module: QuantLinear) -> str | None:
        problem = integer_grid_problem(module)
        if problem is not None:
            return problem
        bits = module.spec.bits
        if module.act_bits not in (None, 8):
            return f"{module.act_bits}-bit activations have no compressed-tensors kernel: quantize with --a-bits 8"
        if module.act_bits is not None and bits != 8:
            return (
                f"compressed-tensors' int-quantized W{bits}A8 is not read by transformers: quantize weights at 8 bits"
            )
        if module.act_bits is None and bits not in PACKED_BITS:
            return (
                f"{bits}-bit codes are packed differently by different compressed-tensors releases: quantize at "
                f"{', '.join(map(str, PACKED_BITS))} bits, or export as gptq"
            )
        if module.g_idx is not None:
            return "its act-order groups are permuted (g_idx), which compressed-tensors cannot store: export as gptq"
        return None

    def check_model(self, modules: dict[str, QuantLinear]) -> str | None:
        return None

    def layer_tensors(self, module: QuantLinear) -> dict[str, torch.Tensor]:
        spec, middle = module.spec, 1 << (module.spec.bits - 1)
        scale = module.scales if self.scale_dtype is None else module.scales.to(self.scale_dtype)
        tensors = {"weight_scale": scale.contiguous()}
        if module.act_bits is not None:
            tensors["weight"] = (module.codes().to(torch.int16) - middle).to(torch.int8)
            if not spec.symmetric:
                tensors["weight_zero_point"] = (module.zeros.to(torch.int16) - middle).to(torch.int8)
            if module.act_scale is not None:
                tensors["input_scale"] = module.act_scale.detach().float().reshape(1)
        else:
            tensors["weight_packed"] = to_int32_words(module.qweight)
            tensors["weight_shape"] = torch.tensor([module.out_features, module.in_features], dtype=torch.int64)
            if not spec.symmetric:
                tensors["weight_zero_point"] = to_int32_words(pack(module.zeros.T, spec.bits)).T.contiguous()
        if module.bias is not None:
            tensors["bias"] = module.bias.detach()
        return tensors

    def quantization_config(self, modules: dict[str, QuantLinear], float_linears: list[str]) -> dict[str, Any]:
        groups: list[tuple[dict[str, Any], list[str]]] = []
        for name, module in modules.items():
            s = scheme(module)
            for known, targets in groups:
                if known == s:
                    targets.append(name)
                    break
            else:
                groups.append((s, [name]))
        formats = {s["format"] for s, _ in groups}
        return {
            "quant_method": self.quant_method,
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": {f"group_{i}": {**s, "targets": targets} for i, (s, targets) in enumerate(groups)},
            "ignore": float_linears,
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
        }

    def extra_files(self, qc: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {}

    def read_layers(self, qc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, QuantLinear]:
        modules = {}
        for group in (qc.get("config_groups") or {}).values():
            for name in _layer_names(group, tensors):
                prefix = f"{name}."
                own = {key[len(prefix) :]: tensors.pop(key) for key in list(tensors) if key.startswith(prefix)}
                bias = own.pop("bias", None)
                modules[name] = compressed_layer(own, bias, group)
        return modules


def _layer_names(group: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[str]:
    """The modules a config group quantizes: its targets that are names, or, for class and regex targets, every
    module with a scale in the file that no earlier group took."""
    targets = group.get("targets") or []
    names = [t for t in targets if f"{t}.weight_scale" in tensors]
    if len(names) < len(targets):  # "Linear" or "re:..." targets: every remaining quantized layer
        names += [k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale")]
    return list(dict.fromkeys(names))


def compressed_layer(t: dict[str, torch.Tensor], bias: torch.Tensor | None, group: dict[str, Any]) -> QuantLinear:
    """One compressed-tensors layer's tensors as a QuantLinear holding the same weight."""
    w, a = group.get("weights") or {}, group.get("input_activations")
    bits, strategy = int(w.get("num_bits", 8)), w.get("strategy")
    if w.get("type", "int") != "int" or strategy not in ("group", "channel", "tensor") or w.get("actorder") == "group":
        raise CheckpointError(
            f"quantlm reads integer compressed-tensors weights per group, channel or tensor, not {w.get('type')} "
            f"{strategy}" + (" with act-order groups" if w.get("actorder") == "group" else "")
        )
    middle, symmetric = 1 << (bits - 1), bool(w.get("symmetric", True))
    scale = t.pop("weight_scale")
    if scale.dtype not in (torch.float16, torch.float32):
        scale = scale.float()
    if "weight_packed" in t:
        out_features, in_features = (int(v) for v in t.pop("weight_shape"))
        codes = unpack(from_int32_words(t.pop("weight_packed"), bits, in_features), bits, in_features)
    else:
        codes = (t.pop("weight").to(torch.int16) + middle).to(torch.uint8)
        out_features, in_features = codes.shape
    if scale.dim() < 2 or scale.numel() == 1:
        scale = scale.reshape(1, 1).expand(out_features, 1).contiguous()
    zero = t.pop("weight_zero_point", None)
    if zero is None:
        zero = torch.full(scale.shape, middle, dtype=torch.uint8)
    elif zero.dtype == torch.int32:  # packed down the output dimension
        zero = unpack(from_int32_words(zero.T.contiguous(), bits, out_features), bits, out_features).T
    else:
        zero = (zero.to(torch.int16) + middle).to(torch.uint8).reshape(scale.shape)
    group_size = int(w["group_size"]) if strategy == "group" else -1
    # a "symmetric" layer whose zero points are not the middle code is read as the asymmetric grid it is
    symmetric = symmetric and bool((zero.to(torch.int16) == middle).all())
    spec = QuantSpec(bits=bits, symmetric=symmetric, group_size=group_size)
    act_scale = t.pop("input_scale", None)
    act_bits = None
    if a is not None:
        if a.get("type", "int") != "int" or int(a.get("num_bits", 8)) != 8 or not a.get("symmetric", True):
            raise CheckpointError("quantlm reads compressed-tensors activations quantized to symmetric int8 only")
        act_bits, dynamic = 8, a.get("dynamic", True) is True
        if not dynamic and act_scale is None:
            raise CheckpointError("a compressed-tensors layer with static activations has no input_scale")
        act_scale = None if dynamic else act_scale
    t.pop("weight_global_scale", None)
    if t:
        raise CheckpointError(f"unexpected compressed-tensors tensors {', '.join(sorted(t))}: quantlm cannot read them")
    return QuantLinear.from_codes(
        codes, scale, zero.to(torch.uint8), spec, bias, act_bits=act_bits, act_scale=act_scale
    )
