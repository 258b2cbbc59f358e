"""Super-block scales: llama.cpp's K-quant grids (``QuantSpec.scale_bits``).

A K-quant row is cut into super-blocks of ``SUPER_BLOCK`` (256) columns, each of 8 groups of 32 or 16 groups of 16.
A group's scale is not a float of its own but an integer code times one fp16 factor per super-block,
``scale = d * sc``; on asymmetric grids the group's offset (``zero * scale``, the negated lowest grid value) is
one too, ``offset = dmin * m``, so the weight is ``q * d * sc - dmin * m``: ggml's Q2_K, Q4_K and Q5_K. Symmetric
grids (Q3_K, Q6_K) keep the middle code as zero point: ``(q - 2**(bits-1)) * d * sc``.

Codes: asymmetric ``sc, m`` in ``[0, 2**scale_bits - 1]``; symmetric ``sc`` in the positive half of llama.cpp's
signed codes, ``[1, 2**(scale_bits - 1) - 1]`` (files from other tools may hold negative ones; the readers keep
them). quantlm's form of such a grid is its usual ``(q - zero) * scale`` with fp32 ``scale = d * sc`` (exact: an
fp16 number times a code of at most 8 bits) and, for asymmetric grids, the fractional fp32 ``zero = dmin * m /
scale``; ``factor`` finds ``d`` and the codes again from those scales (the GGUF writer's job).

How a grid is made (``superblock_grid``): each group's float grid first (min/max or the MSE search, as for any
grid), then ``d = fp16(max scale / top code)``, ``sc = round(scale / d)`` (at least 1, so no group loses its
scale), and the same for the offsets with ``dmin``. llama.cpp's own quantizer searches each group's scale and min
by weighted least squares instead; with GPTQ the codes are then solved on this grid with the error feedback.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantlm.core.spec import SUPER_BLOCK, QuantSpec
from quantlm.errors import QuantlmError

FP16_MAX = torch.finfo(torch.float16).max
FP16_TINY = 2.0**-24  # the smallest positive fp16 number (subnormal): llama.cpp stores subnormal factors too


def top_code(spec: QuantSpec) -> int:
    """The largest scale (and offset) code quantlm writes for ``spec``'s super-block grid."""
    if spec.symmetric:
        return (1 << (spec.scale_bits - 1)) - 1
    return (1 << spec.scale_bits) - 1


def groups_per_super_block(spec: QuantSpec) -> int:
    return SUPER_BLOCK // spec.group_size


def check_columns(n_columns: int, spec: QuantSpec) -> None:
    if n_columns % SUPER_BLOCK:
        raise QuantlmError(
            f"{spec.describe()} needs rows of whole {SUPER_BLOCK}-column super-blocks, and a layer here has "
            f"{n_columns} input columns: quantize with --target-format gguf-TYPE, which puts such layers on the "
            "32-column type llama.cpp falls back to (Q4_0, Q5_0 or Q8_0), or exclude them (--exclude)"
        )


def _factor_of(top: Tensor, code: int) -> Tensor:
    """fp16 factor that maps each super-block's largest value ``top`` to ``code`` (never 0 or inf)."""
    return (top / code).clamp(FP16_TINY, FP16_MAX).to(torch.float16).to(torch.float32)


def superblock_grid(scale: Tensor, zero: Tensor, spec: QuantSpec, empty: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A float grid (``scale``, ``zero``: float32 ``[rows, n_groups]``, positive scales) moved onto ``spec``'s
    super-block grid: scales ``d * sc``, and for asymmetric grids offsets ``dmin * m`` with ``zero = offset /
    scale`` (fractional). ``n_groups`` must be a whole number of super-blocks. ``empty`` (bool, like ``scale``):
    groups whose weights are all 0; their made-up range does not size ``d``, and they get scale code 1 and offset 0
    (every weight 0, exactly)."""
    rows, n_groups = scale.shape
    per = groups_per_super_block(spec)
    top = top_code(spec)
    empty = torch.zeros_like(scale, dtype=torch.bool) if empty is None else empty
    s = scale.masked_fill(empty, 0).reshape(rows, n_groups // per, per)
    d = _factor_of(s.amax(-1, keepdim=True), top)
    s_q = (torch.round(s / d).clamp(1, top) * d).reshape(rows, n_groups)
    if spec.symmetric:
        return s_q, zero
    offset = (zero * scale).masked_fill(empty, 0).reshape(rows, n_groups // per, per)
    dmin = _factor_of(offset.amax(-1, keepdim=True), top)
    o_q = (torch.round(offset / dmin).clamp(0, top) * dmin).reshape(rows, n_groups)
    return s_q, o_q / s_q


def factor(values: Tensor, low: int, high: int, same=None) -> tuple[Tensor, Tensor] | None:
    """``values`` (float32 ``[rows, n_super, per]``) as fp16 factors ``[rows, n_super]`` times integer codes in
    ``[low, high]``; None where some super-block has no such factorization. Tries, for each super-block's value of
    largest magnitude, every code it could have, largest magnitude first. ``same(d, codes)`` says which products
    stand for their values (default: ``d * codes == values`` exactly in fp32; pass a test of your own where
    ``values`` are only known to rounding)."""
    v = values.to(torch.float32)
    same = same or (lambda d, codes: codes * d == v)
    peak = v.gather(-1, v.abs().argmax(-1, keepdim=True))
    found = (v == 0).all(-1)  # every value 0: factor 0, codes 0
    d_out = torch.zeros(v.shape[:-1], dtype=torch.float32, device=v.device)
    codes_out = torch.zeros(v.shape, dtype=torch.int16, device=v.device)
    # largest magnitude first: llama.cpp gives the peak the code -128 or -32 (signed), quantlm the top code
    for code in sorted((c for c in range(low, high + 1) if c != 0), key=lambda c: (-abs(c), c)):
        if bool(found.all()):
            break
        d = (peak / code).to(torch.float16).to(torch.float32)
        codes = torch.round(v / torch.where(d == 0, torch.ones_like(d), d))
        ok = (d.squeeze(-1) != 0) & ((codes >= low) & (codes <= high) & same(d, codes)).all(-1)
        new = ok & ~found
        d_out = torch.where(new, d.squeeze(-1), d_out)
        codes_out = torch.where(new.unsqueeze(-1), codes.to(torch.int16), codes_out)
        found |= new
    return (d_out, codes_out) if bool(found.all()) else None
