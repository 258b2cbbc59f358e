"""Round-to-nearest (RTN): every weight rounded to the nearest point of its grid, no data needed.

The grid per row or group comes from ``quantlm.core`` (min/max, or an MSE search over clipped ranges with
``clip="mse"``). It is the baseline every other method is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantlm.core import QuantSpec
from quantlm.errors import InvalidSpecError
from quantlm.methods.base import Method, register, setting
from quantlm.methods.common import (
    act_bits_setting,
    act_granularity_setting,
    check_activation_settings,
    exclude_setting,
    is_excluded,
    round_linears,
    round_output_projection,
    round_to_grid,
    static_act_scales,
)
from quantlm.pipeline.runner import BlockContext, LayerRecord


@register
@dataclass(frozen=True)
class RTN(Method):
    """Round-to-nearest weight quantization of every Linear in the decoder blocks.

    ``lm_head=True`` also quantizes the output projection (untying it from tied input embeddings, which stay in
    full precision). ``exclude`` holds fnmatch patterns of module names to leave alone. ``act_bits=8`` makes the
    layers W8A8: their inputs are quantized to int8 at run time, per token (``act_granularity="token"``, dynamic,
    no data needed) or per tensor with a static scale from the calibration set's max|x| (``"tensor"``).
    """

    spec: QuantSpec = QuantSpec(bits=4, group_size=64)
    lm_head: bool = setting(False, "Also quantize the output projection.")
    exclude: tuple[str, ...] = exclude_setting()
    act_bits: int | None = act_bits_setting()
    act_granularity: str = act_granularity_setting()

    name = "rtn"

    @property
    def needs_calibration(self) -> bool:
        return self.act_granularity == "tensor"

    def __post_init__(self) -> None:
        check_activation_settings(self.act_bits, self.act_granularity, self.spec)
        if self.lm_head and self.act_granularity == "tensor":
            raise InvalidSpecError(
                "the output projection gets no static activation scale: use per-token activations with lm_head"
            )

    def _quantize_module(self, root: nn.Module, name: str, module: nn.Module, act_scale=None) -> LayerRecord:
        return round_to_grid(root, name, module, self.spec, self.name, act_bits=self.act_bits, act_scale=act_scale)

    def process_block(self, ctx: BlockContext) -> list[LayerRecord]:
        targets = {n: m for n, m in ctx.linears().items() if not is_excluded(n, self.exclude)}
        scales = static_act_scales(ctx, targets) if self.needs_calibration and targets else {}
        return [self._quantize_module(ctx.model, name, module, scales.get(name)) for name, module in targets.items()]

    def finalize(self, model: nn.Module) -> list[LayerRecord]:
        if not self.lm_head:
            return []
        return round_output_projection(model, self.spec, self.name, self.act_bits, required=False)

    @property
    def quantizes_head(self) -> bool:
        return self.lm_head

    def describe(self) -> str:
        return super().describe().replace(self.name, "rtn+head", 1) if self.lm_head else super().describe()


INT8_WEIGHT_ONLY_SPEC = QuantSpec(bits=8, symmetric=True)


@register
@dataclass(frozen=True)
class Int8WeightOnly(Method):
    """int8 weight-only, one symmetric scale per output channel (EETQ's scheme): W8A16 on the int8pack kernel."""

    spec: QuantSpec = INT8_WEIGHT_ONLY_SPEC
    exclude: tuple[str, ...] = exclude_setting()

    name = "int8-weight-only"
    needs_calibration = False

    def __post_init__(self) -> None:
        if self.spec != INT8_WEIGHT_ONLY_SPEC:
            raise InvalidSpecError(
                f"int8-weight-only is 8-bit, symmetric, per output channel, not {self.spec.describe()}: drop the grid "
                "flags, or use --method rtn for other grids"
            )

    def process_block(self, ctx: BlockContext) -> list[LayerRecord]:
        return round_linears(ctx, self.spec, self.name, self.exclude)
