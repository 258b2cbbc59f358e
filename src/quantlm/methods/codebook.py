"""NF4 and FP4: bitsandbytes' 4-bit formats (QLoRA, Dettmers et al. 2023) as calibration-free methods.

Every block of ``group_size`` weights along a row (64 by default, bitsandbytes' blocksize) is divided by its absmax
and each value rounded to the nearest of 16 fixed levels (``quantlm.core.codebook``: NF4's normal quantiles, or
FP4's 4-bit floats). ``double_quant`` stores the block scales themselves in 8 bits (QLoRA's double
quantization), 8.125 instead of 16 bits per block.

Beyond bitsandbytes: by default (``clip="fit"``) each block's scale is then refitted by least squares to the
levels its weights round to (``quantlm.core.quantizer``), the same storage with a lower error (``--clip none``: the
absmax, bitsandbytes' own rounding); any in_features (a partial last block per row instead of blocks that run
across rows); and the same grids under GPTQ's error compensation: ``--method gptq --codebook nf4`` rounds each
column to the nearest NF4 level of its group's scale and spreads the error over the columns not yet rounded.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantlm.core import QuantSpec
from quantlm.errors import InvalidSpecError
from quantlm.methods.base import Method, register, setting
from quantlm.methods.common import exclude_setting, round_linears
from quantlm.pipeline.runner import BlockContext, LayerRecord


@register
@dataclass(frozen=True)
class NF4(Method):
    """NF4: each block of weights (``--group-size``, 64 by default) divided by its scale (the absmax refitted by least
    squares; ``--clip none``: the absmax) and rounded to the nearest NormalFloat level; ``double_quant`` stores the
    scales in 8 bits."""

    spec: QuantSpec = QuantSpec(bits=4, symmetric=True, group_size=64, codebook="nf4", clip="fit")
    double_quant: bool = setting(
        False, "Store each block's scale in 8 bits (QLoRA's double quantization).", flag="--double-quant"
    )
    exclude: tuple[str, ...] = exclude_setting()

    name = "nf4"
    needs_calibration = False

    def __post_init__(self) -> None:
        if self.spec.codebook != self.name:
            raise InvalidSpecError(
                f"--method {self.name} rounds to the {self.name} levels: drop --codebook {self.spec.codebook}, or use "
                f"--method {self.spec.codebook if self.spec.codebook != 'none' else 'rtn'}"
            )

    def process_block(self, ctx: BlockContext) -> list[LayerRecord]:
        return round_linears(ctx, self.spec, self.name, self.exclude, double_quant=self.double_quant)

    def describe(self) -> str:
        return f"{self.name}({self.spec.describe().split(' ', 1)[1]}{' dq' if self.double_quant else ''})"


@register
@dataclass(frozen=True)
class FP4(NF4):
    """FP4: each block of weights (``--group-size``, 64 by default) divided by its scale (the absmax refitted by least
    squares; ``--clip none``: the absmax) and rounded to the nearest 4-bit float (bitsandbytes' FP4 levels);
    ``double_quant`` stores the scales in 8 bits."""

    spec: QuantSpec = QuantSpec(bits=4, symmetric=True, group_size=64, codebook="fp4", clip="fit")

    name = "fp4"
