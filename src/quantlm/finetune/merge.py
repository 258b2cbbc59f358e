"""Merging trained adapters back into one model, without leaving quantlm's formats.

- ``float``: every quantized layer dequantized, each adapter's update B A · alpha / r added: a float model (what
  LLaMA-Factory asks its users to do by hand before re-quantizing).
- ``requant``: the float merge, then the base checkpoint's own recipe run again (GPTQ included) on the calibration
  that recipe was made with: a low-bit model of the same recipe.
- ``exact``: QA-LoRA's fold of group-pooled adapters into the zero points (``quantlm.finetune.adapters``); codes
  and scales stay as they are, zeros become fp32 (a fractional shift), and the merged layer's weight is the base
  weight plus the adapter's update to fp32 rounding (the int4 CPU kernel's decode path keeps its per-group offsets
  in bf16, as for any asymmetric layer). Layers without adapters are left untouched.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from quantlm.core.codebook import DoubleQuantScales
from quantlm.core.spec import QuantSpec
from quantlm.errors import InvalidSpecError, QuantlmError
from quantlm.finetune.adapters import adapter_layers, is_pooled_lora_layer, is_quant_lora_layer
from quantlm.models.blocks import linear_weight, set_submodule
from quantlm.nn.qlinear import QuantLinear

MERGE_MODES = ("none", "float", "requant", "exact")


def check_merge_mode(mode: str, pooled: bool) -> str:
    if mode not in MERGE_MODES:
        raise InvalidSpecError(f"--merge is one of {', '.join(MERGE_MODES)}, got {mode!r}")
    if mode == "exact" and not pooled:
        raise InvalidSpecError(
            "--merge exact folds group-pooled adapters into the zero points: train with --pooled, or merge with "
            "float or requant"
        )
    return mode


def check_merge_base(mode: str, record) -> None:
    """Refuse, before any training, a merge the base cannot take (``record``: the base's QuantizationRecord, None
    for a float base)."""
    if mode == "exact" and record is None:
        raise InvalidSpecError("--merge exact folds adapters into a quantized grid: a float base has none")
    if mode != "requant":
        return
    if record is None or not record.recipe:
        raise InvalidSpecError("--merge requant reruns the base's recipe, and this base records none: merge with float")
    from quantlm.methods.recipe import parse_recipe

    if parse_recipe(record.recipe).trained:
        raise InvalidSpecError("the base was made by QAT, which --merge requant cannot rerun: merge with float")


def _active_delta(layer: nn.Module) -> torch.Tensor | None:
    deltas = [layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A]
    return sum(deltas) if deltas else None


def _dense(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.float())
    return linear


def dequantize_model(model: nn.Module) -> nn.Module:
    """Every QuantLinear of ``model`` replaced by an fp32 nn.Linear holding its dequantized weight (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            set_submodule(model, name, _dense(module.dequantize_weight(torch.float32), module.bias))
    return model


def merge_float(peft_model: nn.Module) -> nn.Module:
    """A float model: dequantized base weights plus each adapter's update."""
    inner = peft_model.get_base_model()
    with torch.no_grad():
        for name, layer in adapter_layers(peft_model).items():
            base = layer.get_base_layer()
            if isinstance(base, QuantLinear):
                weight = base.dequantize_weight(torch.float32)
            else:  # [out, in] also for GPT-2's Conv1D, whose peft delta is transposed like its weight
                weight = linear_weight(base).detach().float()
            delta = _active_delta(layer)
            if delta is not None:
                delta = delta.t() if getattr(layer, "fan_in_fan_out", False) else delta
                weight = weight + delta.to(weight.device)
            set_submodule(inner, name, _dense(weight, getattr(base, "bias", None)))
    return dequantize_model(inner)


def fold_into_zeros(layer: nn.Module) -> QuantLinear:
    """A pooled LoRA layer's base with the adapters folded into its zero points (fp32 zeros, asymmetric grid)."""
    base: QuantLinear = layer.get_base_layer()
    per_group = None
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            d = layer.delta(adapter) / layer.group_size
            per_group = d if per_group is None else per_group + d
    codes = base.codes()
    scale = base.scales.float()
    zero = base.zeros.float()
    if per_group is not None:
        if bool((scale == 0).any()):
            raise QuantlmError(
                "an exact merge folds the adapters into the zero points, and this base has groups of scale 0 (a "
                "constant group, as GGUF files can hold): merge with --merge requant or float"
            )
        zero = zero - per_group.to(zero.device) / scale
    # the zeros are no longer a K-quant grid's dmin * m / scale: the layer keeps its scales on a plain grid
    spec: QuantSpec = dataclasses.replace(base.spec, symmetric=False, scale_bits=None)
    # double-quantized scales stay in their stored form (the codes were computed with their decoding)
    stored = DoubleQuantScales(base.scale_codes, base.scale_range) if base.double_quant else base.scales.clone()
    return QuantLinear.from_codes(
        codes,
        stored,
        zero,
        spec,
        bias=base.bias,
        g_idx=base.g_idx,
        act_bits=base.act_bits,
        act_scale=base.act_scale,
        outlier_threshold=base.outlier_threshold,
        zero_dtype=torch.float32,
    )


def merge_exact(peft_model: nn.Module) -> nn.Module:
    """The quantized model with every pooled adapter folded into its layer's zero points; still low-bit."""
    inner = peft_model.get_base_model()
    with torch.no_grad():
        for name, layer in adapter_layers(peft_model).items():
            if not is_pooled_lora_layer(layer):
                kind = "plain adapters" if is_quant_lora_layer(layer) else "an adapter on a float layer"
                raise InvalidSpecError(
                    f"{name} has {kind}: an exact merge needs group-pooled adapters on quantized layers (--pooled)"
                )
            set_submodule(inner, name, fold_into_zeros(layer))
    return inner


def merge_adapters(peft_model: nn.Module, mode: str, *, record=None, tokenizer=None, progress: bool = True):
    """The merged model for ``mode`` (float, requant or exact; see the module docstring). ``requant`` needs the base
    checkpoint's ``record`` (its recipe and calibration) and the tokenizer."""
    if mode == "float":
        return merge_float(peft_model)
    if mode == "exact":
        return merge_exact(peft_model)
    if mode == "requant":
        return requantize(merge_float(peft_model), record, tokenizer, progress)
    raise InvalidSpecError(f"--merge is float, requant or exact here, got {mode!r}")


def requantize(model: nn.Module, record, tokenizer, progress: bool) -> nn.Module:
    """``model`` (float) quantized again with the recipe and calibration in ``record``."""
    from quantlm import api

    check_merge_base("requant", record)
    recipe = api.parse_recipe(record.recipe)
    calibration = api.Calibration(**record.calibration) if recipe.needs_calibration and record.calibration else None
    return api.quantize(model, recipe, calibration, tokenizer=tokenizer, progress=progress, kv_cache=record.kv_cache)
