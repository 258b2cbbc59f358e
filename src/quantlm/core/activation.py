"""Dynamic per-token int8 quantization of activations (the W8A8 scheme of SmoothQuant and LLM.int8()).

Each row (token) of ``x [..., features]`` gets its own scale ``max|x| / 127`` and codes ``round(x / scale)`` in
[-127, 127] (a symmetric grid without -128, so negating a row never overflows). An all-zero row gets scale 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

INT8_MAX = 127


def quantize_per_token_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """int8 codes shaped like ``x`` and fp32 scales ``[..., 1]`` with ``x ≈ codes * scales``."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    codes = torch.round(xf / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def fake_quantize_per_token_int8(x: Tensor) -> Tensor:
    """``x`` rounded onto its per-token int8 grid, in its own dtype."""
    codes, scale = quantize_per_token_int8(x)
    return (codes.float() * scale).to(x.dtype)
