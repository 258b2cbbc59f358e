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

Double quantization (QLoRA, section 3): the absmax of every block of weights is itself quantized to 8 bits. Here
each scale's log2 is rounded on 256 even steps between the least and the greatest log2 scale of its block of
``SCALE_BLOCK`` (256) consecutive scales (row-major), and each block keeps that range as two fp32 numbers: 8.25 bits
instead of 16 per block of weights, with a relative error of at most half a step, 2^((max - min) / 510) - 1 (0.3%
for a block whose scales span 2 octaves). An outlier scale (or the scale 1 of an all-zero group) widens one block's
steps but never sends a scale to zero. bitsandbytes instead takes out the mean scale and rounds the rest on its
8-bit dynamic map with an absmax per block, whose error depends on how far the scales sit from that mean.
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
SCALE_CODE_MAX = 255


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
def double_quantize(scales: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize positive block scales ``[rows, groups]``: (uint8 codes [rows, groups], fp32 [n_blocks, 2] the least
    and the greatest log2 scale of each block of ``SCALE_BLOCK`` scales taken row-major)."""
    flat = scales.detach().to(torch.float32).reshape(-1).clamp_min(torch.finfo(torch.float32).tiny).log2()
    n_blocks = math.ceil(flat.numel() / SCALE_BLOCK)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * SCALE_BLOCK - flat.numel()), value=float("nan"))
    blocks = padded.view(n_blocks, SCALE_BLOCK)
    low = torch.where(torch.isnan(blocks), math.inf, blocks).amin(dim=1)
    high = torch.where(torch.isnan(blocks), -math.inf, blocks).amax(dim=1)
    step = ((high - low) / SCALE_CODE_MAX).clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    codes = torch.round((blocks - low.unsqueeze(1)) / step).clamp_(0, SCALE_CODE_MAX)
    codes = codes.reshape(-1)[: flat.numel()].to(torch.uint8).view(scales.shape)
    return codes, torch.stack([low, high], dim=1)


def decode_scales(codes: Tensor, log_range: Tensor) -> Tensor:
    """The scales that double-quantized ``codes`` stand for: fp16 where every one is a normal fp16 number (the
    layers' usual scale dtype), else fp32."""
    flat = codes.reshape(-1).to(torch.float32)
    low, high = (t.to(torch.float32).repeat_interleave(SCALE_BLOCK)[: flat.numel()] for t in log_range.unbind(1))
    values = torch.exp2(low + flat * ((high - low) / SCALE_CODE_MAX)).view(codes.shape)
    fp16 = torch.finfo(torch.float16)
    return values.half() if bool(((values >= fp16.tiny) & (values <= fp16.max)).all()) else values


@dataclass(frozen=True)
class DoubleQuantScales:
    """Double-quantized block scales: uint8 ``codes`` [rows, groups] of log2 scale, and per block of ``SCALE_BLOCK``
    codes (row-major) the fp32 ``log_range`` [n_blocks, 2] they span."""

    codes: Tensor
    log_range: Tensor

    @classmethod
    def of(cls, scales: Tensor) -> DoubleQuantScales:
        return cls(*double_quantize(scales))

    def decode(self) -> Tensor:
        return decode_scales(self.codes, self.log_range)
