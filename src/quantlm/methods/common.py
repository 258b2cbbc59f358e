"""Pieces shared by weight-quantization methods: which modules they touch, how a Linear becomes a QuantLinear."""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Sequence

import torch
from torch import nn

from quantlm.core import QuantSpec
from quantlm.core.activation import static_int8_scale
from quantlm.errors import InvalidSpecError
from quantlm.methods.base import setting
from quantlm.models.blocks import linear_weight, output_embedding_name, set_submodule
from quantlm.nn.qlinear import QuantLinear, check_act_bits, check_act_granularity
from quantlm.pipeline.dequantized import run_dequantized


# -- settings several methods take (each call makes a new field) ------------------------------------------------
def exclude_setting():
    return setting((), "Comma list of fnmatch patterns of module names to leave in float (e.g. '*.o_proj').")


def act_bits_setting():
    return setting(
        None,
        "8: W8A8, activations quantized to int8 at run time (use with --bits 8 --group-size -1 --sym for the "
        "int8 GEMM kernel); 4: 4-bit activations per token (W4A4, on the same int8 GEMM).",
        flag="--a-bits",
    )


def act_granularity_setting():
    return setting(
        "token",
        "With --a-bits 8: token (dynamic per-token scales) or tensor (one static scale per layer from calibration).",
        flag="--a-granularity",
    )


def is_excluded(name: str, patterns: Sequence[str]) -> bool:
    """True when the module name matches one of the fnmatch patterns (``*`` matches dots too)."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p) for p in patterns)


def relative_weight_error(reference: torch.Tensor, quantized: torch.Tensor) -> float:
    """||W_q - W||_F / ||W||_F."""
    ref = reference.detach().float()
    denom = ref.norm().item()
    return (quantized.float() - ref).norm().item() / denom if denom > 0 else 0.0


def swap_in(root: nn.Module, name: str, qlinear: QuantLinear, original: nn.Module) -> QuantLinear:
    """Put ``qlinear`` where ``original`` was, on its device, running on its weight dequantized once (the pipeline
    still runs it on the calibration batch; ``quantlm.pipeline.dequantized.drop_dequantized`` drops that copy when
    the block is done)."""
    weight = linear_weight(original)
    qlinear = run_dequantized(qlinear.to(weight.device), weight.dtype)
    set_submodule(root, name, qlinear)
    return qlinear


def round_to_grid(root: nn.Module, name: str, module: nn.Module, spec, method: str, details=None, **options):
    """Replace the Linear ``name`` by its round-to-nearest QuantLinear on ``spec``'s grid (``options``: the
    activation and double-quantization settings of ``QuantLinear.from_weight``); return its quant-log record."""
    from quantlm.pipeline.runner import LayerRecord

    t0 = time.perf_counter()
    weight = linear_weight(module)
    q = QuantLinear.from_weight(weight, spec, getattr(module, "bias", None), **options)
    error = relative_weight_error(weight, q.dequantize_weight())
    swap_in(root, name, q, module)
    return LayerRecord(
        module=name,
        method=method,
        seconds=time.perf_counter() - t0,
        error=error,
        details={"shape": list(weight.shape), "spec": q.describe(), **(details or {})},
    )


def round_linears(ctx, spec: QuantSpec, method: str, exclude: Sequence[str], **options) -> list:
    """Round every Linear of the block that no ``exclude`` pattern names onto ``spec``'s grid (``round_to_grid``)."""
    return [
        round_to_grid(ctx.model, name, module, spec, method, **options)
        for name, module in ctx.linears().items()
        if not is_excluded(name, exclude)
    ]


def round_output_projection(model: nn.Module, spec: QuantSpec, method: str, act_bits=None, *, required: bool):
    """Round the output projection (lm_head) onto ``spec``'s grid and untie it from tied input embeddings (which
    stay in float); ``required``: a model without one is an error instead of nothing to do."""
    name = output_embedding_name(model)
    if name is None:
        if required:
            raise InvalidSpecError(
                f"{type(model).__name__} has no output projection for a head-only step (--head-bits)"
            )
        return []
    module = model.get_submodule(name)
    if isinstance(module, QuantLinear):
        raise InvalidSpecError(f"the output projection {name} is quantized already: quantize it in one step only")
    record = round_to_grid(model, name, module, spec, method, act_bits=act_bits)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    return [record]


def check_activation_settings(act_bits, act_granularity: str, spec: QuantSpec | None = None) -> None:
    """The activation settings of a weight-quantizing step: none, or int8 per token / static per tensor (and none
    with a codebook weight grid, whose layers are weight-only)."""
    check_act_bits(act_bits)
    check_act_granularity(act_granularity)
    if spec is not None and spec.codebook != "none" and act_bits is not None:
        raise InvalidSpecError(f"{spec.codebook} layers are weight-only: drop --a-bits, or drop --codebook")
    if act_granularity == "tensor" and act_bits != 8:
        raise InvalidSpecError("per-tensor static activations need 8-bit activations: set act_bits=8 (--a-bits 8)")


def static_act_scales(ctx, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """A static per-tensor int8 activation scale for each of ``modules``: max|x| of its input over the calibration
    set, / 127."""
    from quantlm.pipeline.stats import collect_input_stats

    stats = collect_input_stats(ctx, modules)
    return {name: static_int8_scale(st.tensor_absmax) for name, st in stats.items()}
