"""int8 quantization of activations (the W8A8 schemes of SmoothQuant and LLM.int8(), and W4A4).

Grids are symmetric without -128 (codes in [-127, 127], so negating a row never overflows), scale = max|x| / 127:
- per token, dynamic: each row (token) of ``x [..., features]`` gets its own scale from its own max|x| on every
  call; an all-zero row gets scale 1. With ``bits`` 4 the codes are in [-7, 7] and scale = max|x| / 7: int4
  values held in int8, so the int8 GEMM multiplies them exactly (W4A4);
- per tensor, static: one scale for every token, fixed ahead of time from calibration (``static_int8_scale``).
Codes are ``round(x / scale)`` (half to even), computed in fp32 whatever the dtype of ``x``.

LLM.int8()'s mixed-precision decomposition (``split_outlier_columns``): the input columns (features) in which any
token reaches ``|x| >= threshold`` are taken out of the int8 product and multiplied in floating point.
"""

from __future__ import annotations

import torch
from torch import Tensor

INT8_MAX = 127
ACT_GRANULARITIES = ("token", "tensor")


INTEGER_ACT_BITS = (8, 4)  # activation widths whose codes the integer product takes (int8 storage)


def _codes(x: Tensor, scale: Tensor, qmax: int = INT8_MAX) -> Tensor:
    return torch.div(x, scale).round_().clamp_(-qmax, qmax).to(torch.int8)


def quantize_per_token_int8(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """int8 codes shaped like ``x`` and fp32 scales ``[..., 1]`` with ``x ≈ codes * scales``; codes in
    [-(2^(bits-1) - 1), 2^(bits-1) - 1] (``bits`` one of ``INTEGER_ACT_BITS``)."""
    if bits not in INTEGER_ACT_BITS:
        raise ValueError(f"integer activation codes are 8 or 4 bits wide, got {bits!r}")
    qmax = (1 << (bits - 1)) - 1
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return _codes(x, scale, qmax), scale


def static_int8_scale(absmax: float | Tensor) -> Tensor:
    """The per-tensor scale [1] (fp32) of a static grid whose range is ±``absmax`` (1 for an all-zero input)."""
    a = torch.as_tensor(absmax, dtype=torch.float32).reshape(1)
    return torch.where(a > 0, a / INT8_MAX, torch.ones_like(a))


def quantize_per_tensor_int8(x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """int8 codes of ``x`` on the fixed grid ``scale`` ([1], fp32); values beyond ±127·scale are clipped."""
    return _codes(x, scale), scale


def quantize_int8(
    x: Tensor, granularity: str = "token", static_scale: Tensor | None = None, bits: int = 8
) -> tuple[Tensor, Tensor]:
    """Codes and scales of ``x`` per token (dynamic, ``bits`` wide) or per tensor (static int8, ``static_scale``)."""
    if granularity == "tensor":
        if static_scale is None:
            raise ValueError("per-tensor static activation quantization needs a calibrated scale")
        if bits != 8:
            raise ValueError(f"static per-tensor activation grids are 8-bit, got {bits}")
        return quantize_per_tensor_int8(x, static_scale)
    return quantize_per_token_int8(x, bits)


def fake_quantize_int8(
    x: Tensor, granularity: str = "token", static_scale: Tensor | None = None, bits: int = 8
) -> Tensor:
    """``x`` rounded onto its integer grid (``quantize_int8``), in its own dtype."""
    codes, scale = quantize_int8(x, granularity, static_scale, bits)
    return (codes.float() * scale).to(x.dtype)


def fake_quantize_per_token_int8(x: Tensor) -> Tensor:
    """``x`` rounded onto its per-token int8 grid, in its own dtype."""
    return fake_quantize_int8(x, "token")


def outlier_columns(x2: Tensor, threshold: float) -> Tensor:
    """Indices (int64) of the columns of ``x2 [tokens, features]`` in which some |x| >= ``threshold``."""
    return ((x2.abs() >= threshold).any(dim=0)).nonzero().squeeze(1)


def split_outlier_columns(x2: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """LLM.int8()'s decomposition of ``x2 [tokens, features]``: (the inlier part, with the outlier columns set to
    zero; the outlier columns themselves [tokens, n_outliers]; their indices)."""
    cols = outlier_columns(x2, threshold)
    if cols.numel() == 0:
        return x2, x2[:, :0], cols
    return x2.index_fill(1, cols, 0), x2.index_select(1, cols), cols


# ---------------------------------------------------------------------------------------------- any bit width
# The per-token grids of quantization-aware training (LLM-QAT) and of the quantized KV cache, for 2..8 bits.
# Symmetric (the paper's MinMax choice): codes in [-(2**(b-1) - 1), 2**(b-1) - 1], scale = max|x| / (2**(b-1) - 1);
# at 8 bits this is exactly the int8 per-token grid above. Asymmetric: codes in [0, 2**b - 1] over
# [min(x, 0), max(x, 0)], zero = round(-min / scale). Codes are returned as uint8 in offset form (symmetric codes
# shifted by 2**(b-1)), so that both kinds pack with ``quantlm.core.packing`` and decode as (codes - zero) * scale.
TOKEN_BITS = (2, 3, 4, 5, 6, 7, 8)


def check_token_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in TOKEN_BITS:
        raise ValueError(f"per-token quantization takes 2 to 8 bits, got {bits!r}")
    return int(bits)


def per_token_grid(x: Tensor, bits: int, symmetric: bool = True) -> tuple[Tensor, Tensor]:
    """fp32 ``(scale, zero)`` of shape ``[..., 1]`` for each row of ``x [..., features]`` (computed on ``x`` as
    given: pass ``x.detach()`` for a straight-through estimator)."""
    bits = check_token_bits(bits)
    xf = x.float()
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        amax = xf.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        return scale, torch.full_like(scale, float(1 << (bits - 1)))
    lo = xf.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = xf.amax(dim=-1, keepdim=True).clamp(min=0)
    span = hi - lo
    scale = torch.where(span > 0, span / ((1 << bits) - 1), torch.ones_like(span))
    return scale, torch.round(-lo / scale)


def _code_range(bits: int, symmetric: bool, zero: Tensor) -> tuple[Tensor | int, Tensor | int]:
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        return -qmax, qmax
    return -zero, ((1 << bits) - 1) - zero


def quantize_per_token(x: Tensor, bits: int, symmetric: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """uint8 codes (offset form, shaped like ``x``), fp32 scale and zero ``[..., 1]``: x ≈ (codes - zero) * scale."""
    scale, zero = per_token_grid(x, bits, symmetric)
    lo, hi = _code_range(bits, symmetric, zero)
    q = torch.clamp(torch.round(x.float() / scale), lo, hi)
    return (q + zero).to(torch.uint8), scale, zero


def dequantize_per_token(codes: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype) -> Tensor:
    return ((codes.float() - zero) * scale).to(dtype)


def fake_quantize_per_token(x: Tensor, bits: int, symmetric: bool = True) -> Tensor:
    """``x`` on its per-token grid, in its own dtype, with a straight-through gradient (1 inside the grid's
    range, 0 where a value was clipped; the grid itself gets no gradient). The forward value equals
    ``dequantize_per_token(*quantize_per_token(x, bits, symmetric), x.dtype)``."""
    scale, zero = per_token_grid(x.detach(), bits, symmetric)
    lo, hi = _code_range(bits, symmetric, zero)
    t = x.float() / scale
    q = torch.clamp(t + (torch.round(t) - t).detach(), lo, hi)
    return (q * scale).to(x.dtype)


def lsq_initial_step(x: Tensor, bits: int) -> Tensor:
    """LSQ's starting step for the input ``x`` (Esser et al. 2020): 2·mean|x| / sqrt(Qp), Qp = 2^(bits-1) - 1
    (a scalar fp32; 1 for an all-zero input)."""
    qmax = (1 << (check_token_bits(bits) - 1)) - 1
    step = 2 * x.detach().float().abs().mean() / qmax**0.5
    return torch.where(step > 0, step, torch.ones_like(step))


def lsq_fake_quantize(x: Tensor, step: Tensor, bits: int) -> Tensor:
    """LSQ (Esser et al. 2020): ``x`` on the fixed symmetric grid ``step · {-Qp..Qp}``, Qp = 2^(bits-1) - 1 (at 8
    bits the static int8 grid of ``quantize_per_tensor_int8``), in its own dtype. Gradients: straight through to
    ``x`` inside the range, 0 where clipped; to ``step``, LSQ's ``round(x/s) - x/s`` inside and ``±Qp`` outside,
    scaled by ``1/sqrt(features · Qp)`` (features: the last dim of ``x``; not the batch, so the gradient does not
    depend on how a batch is split across processes or micro-batches)."""
    qmax = (1 << (check_token_bits(bits) - 1)) - 1
    g = 1.0 / (x.shape[-1] * qmax) ** 0.5
    step = step.float().clamp(min=torch.finfo(torch.float32).tiny)
    s = step.detach() + (step * g - (step * g).detach())  # exactly the value of step; its gradient times g
    t = torch.clamp(x.float() / s, -qmax, qmax)
    return ((t + (torch.round(t) - t).detach()) * s).to(x.dtype)
