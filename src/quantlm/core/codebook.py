"""4-bit codebooks (NF4, FP4) and the double quantization of their block scales.

A codebook grid stores, for every weight, the index of one of 16 levels in [-1, 1], and for every block (group) of
weights its absmax: w ≈ level[q] · absmax. The levels are not evenly spaced:

- **NF4** (NormalFloat, QLoRA, Dettmers et al. 2023, section 3): the levels are quantiles of the standard normal
  distribution, so that weights drawn from N(0, σ²) and scaled by their block's absmax fill every level equally
  often. Asymmetric around 0 so that 0 is exactly representable: 8 levels from the quantiles of the upper half
  (probabilities from 0.5 to ``NF4_OFFSET``, 0.5 itself dropped), 7 from the lower half, plus 0, each half divided by
  its largest quantile so the ends are exactly ±1. These are the levels bitsandbytes ships (the tests check them
  against its published table to 1e-7).
- **FP4** (bitsandbytes' 4-bit float: 1 sign bit, 2 exponent bits, 1 mantissa bit, with its own exponent bias):
  magnitudes 0, 0.0052083, 1/6, 1/4, 1/3, 1/2, 2/3 and 1, both signs (0 twice). Level ``i`` is the value of
  bitsandbytes' 4-bit code ``i``.

Double quantization (QLoRA, section 3): the fp32 absmax of every block is itself quantized. The mean of all of a
layer's scales is taken out as one fp32 offset, the rest is quantized to int8 in blocks of ``SCALE_BLOCK`` (256)
consecutive scales (row-major), each block with an fp32 absmax of its own: 8.125 bits instead of 32 (or 16) per
block of weights. bitsandbytes rounds these to its 8-bit dynamic (log-spaced) map; a linear int8 grid is used here,
whose error on scales that sit around their mean is no larger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from quantlm.errors import InvalidSpecError

CODEBOOKS = ("nf4", "fp4")
NF4_OFFSET = 0.9677083  # QLoRA's choice: the mean of the outermost quantiles for 2^4 levels (1/2 (1 - 1/32 + 1 - 1/30))
FP4_MAGNITUDES = (0.0, 0.005208333333, 2 / 3, 1.0, 1 / 3, 0.5, 1 / 6, 0.25)  # code & 0b0111 -> magnitude
SCALE_BLOCK = 256
SCALE_CODE_MAX = 127


def _normal_quantiles(probabilities: Tensor) -> Tensor:
    return torch.special.ndtri(probabilities.double())


@cache
def _levels(name: str) -> tuple[float, ...]:
    if name == "nf4":
        upper = _normal_quantiles(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1])  # 8 positive levels
        lower = -_normal_quantiles(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1])  # 7 negative levels
        values = torch.cat([upper, torch.zeros(1, dtype=torch.float64), lower])
        values = values / values.abs().max()
        return tuple(sorted(values.tolist()))
    if name == "fp4":
        return tuple(FP4_MAGNITUDES) + tuple(-m for m in FP4_MAGNITUDES)
    raise InvalidSpecError(f"unknown codebook {name!r}: choose one of {', '.join(CODEBOOKS)}")


def codebook_levels(name: str, device: torch.device | str | None = None) -> Tensor:
    """The 16 levels of codebook ``name`` as float32 [16]: level ``i`` is the value of code ``i``."""
    return torch.tensor(_levels(name), dtype=torch.float32, device=device)


def nearest_level(x: Tensor, name: str) -> Tensor:
    """The code (uint8) of the level nearest to each value of ``x`` (already divided by its block's absmax).

    Ties go to the smaller level (both are equally near; bitsandbytes' decision tree does the same at its
    thresholds up to float rounding)."""
    levels = codebook_levels(name, x.device)
    order = torch.argsort(levels, stable=True)
    ordered = levels[order]
    midpoints = (ordered[1:] + ordered[:-1]) / 2
    position = torch.bucketize(x.to(torch.float32).contiguous(), midpoints, right=False)
    return order[position].to(torch.uint8)


def decode(codes: Tensor, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """The level of every code, in ``dtype``."""
    return codebook_levels(name, codes.device).to(dtype)[codes.long()]


# -- double quantization of the scales ---------------------------------------------------------------------------
def double_quantize(scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize positive block scales ``[rows, groups]`` (fp32): (int8 codes [rows, groups], fp32 absmax per block of
    ``SCALE_BLOCK`` scales taken row-major [ceil(n / SCALE_BLOCK)], fp32 offset [1] = the mean scale)."""
    flat = scales.detach().to(torch.float32).reshape(-1)
    offset = flat.mean().reshape(1)
    centred = flat - offset
    n_blocks = math.ceil(flat.numel() / SCALE_BLOCK)
    padded = torch.nn.functional.pad(centred, (0, n_blocks * SCALE_BLOCK - flat.numel())).view(n_blocks, SCALE_BLOCK)
    absmax = padded.abs().amax(dim=1)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = torch.round(padded / absmax.unsqueeze(1) * SCALE_CODE_MAX).clamp_(-SCALE_CODE_MAX, SCALE_CODE_MAX)
    codes = codes.reshape(-1)[: flat.numel()].to(torch.int8).view(scales.shape)
    return codes, absmax, offset


def decode_scales(codes: Tensor, absmax: Tensor, offset: Tensor) -> Tensor:
    """The fp32 scales that double-quantized ``codes`` stand for, never below the smallest normal float32 (a
    scale at the bottom of its block's range may decode to 0 or below)."""
    flat = codes.reshape(-1).to(torch.float32)
    per_value = absmax.to(torch.float32).repeat_interleave(SCALE_BLOCK)[: flat.numel()]
    values = flat / SCALE_CODE_MAX * per_value + offset.to(torch.float32)
    return values.clamp_min(torch.finfo(torch.float32).tiny).view(codes.shape)


def scale_bits_per_group(double_quant: bool, scale_dtype: torch.dtype = torch.float16) -> float:
    """Bits a group's scale costs: 8 + the block absmax's share with double quantization, else the dtype's width."""
    if double_quant:
        return 8 + 32 / SCALE_BLOCK
    return torch.finfo(scale_dtype).bits


@dataclass(frozen=True)
class DoubleQuantScales:
    """Double-quantized block scales: int8 ``codes`` [rows, groups], fp32 ``absmax`` per block of ``SCALE_BLOCK``
    codes (row-major), fp32 ``offset`` [1]."""

    codes: Tensor
    absmax: Tensor
    offset: Tensor

    @classmethod
    def of(cls, scales: Tensor) -> DoubleQuantScales:
        return cls(*double_quantize(scales))

    def decode(self) -> Tensor:
        return decode_scales(self.codes, self.absmax, self.offset)
