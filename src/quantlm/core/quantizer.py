"""Uniform affine quantization on the GPTQ reference grid (IST-DASLab/gptq ``quant.py`` conventions).

Per row / group / tensor (see :mod:`quantlm.core.spec` for the shapes):

- the range always contains zero: ``xmin = min(min(x), 0)``, ``xmax = max(max(x), 0)``;
- asymmetric: ``scale = (xmax - xmin) / maxq``, ``zero = round(-xmin / scale)``;
- symmetric: ``xmax = max(|xmin|, xmax)``, ``xmin = -xmax`` (always, also for all-positive rows),
  ``scale = 2 * xmax / maxq``, ``zero = 2**(bits - 1)``;
- an all-zero row/group uses ``xmin, xmax = -1, +1``;
- codes ``q = clamp(round(x / scale) + zero, 0, maxq)`` with round-half-to-even; ``x ~ (q - zero) * scale``.

Super-block grids (``spec.scale_bits``, llama.cpp's K-quants, ``quantlm.core.superblock``): the group grids above,
then every scale (and offset) rounded to a code times one fp16 factor per 256 columns; asymmetric ones have
fractional zeros. A fractional zero point (these, HQQ's) gives codes ``clamp(round(x / scale + zero), 0, maxq)``.

Codebook grids (``spec.codebook`` "nf4" / "fp4", ``quantlm.core.codebook``): ``scale`` is the absmax of the row or
group (1 for an all-zero one), ``zero`` is 0 and unused, the code is the index of the level nearest to
``x / scale``, and ``x ~ level[q] * scale``. With ``clip="fit"`` each absmax scale is then refitted by Lloyd's
alternation: the nearest levels for the current scale, then the scale ``s = sum(x * l) / sum(l * l)`` that fits
those levels best in the least-squares sense, until no unit's squared error falls (at most ``FIT_ITERS`` refits).
The grid's largest level no longer has to land on the absmax: on SmolLM2-135M the NF4 weight error falls from 9.3%
to 8.8% and perplexity with it (docs/calibration_free.md), in the same storage as bitsandbytes' NF4.

Everything is computed in float32 whatever the input dtype. ``scale`` and ``zero`` are float32 (``zero`` holds
integers in ``[0, maxq]``, except on asymmetric super-block grids), codes are ``torch.uint8``. Zero is exactly
representable on every grid but the asymmetric super-block ones (Q2_K/Q4_K/Q5_K round each offset apart from its
scale, as llama.cpp does; their all-zero groups keep 0).

Two guards go beyond the reference and only matter at the edges of float32: a scale that overflows
(|x| above ~1e38) is recomputed as ``xmax / maxq - xmin / maxq``, and a scale that underflows (range below
~1e-37) is raised to the smallest normal float32. Both keep ``|x - dequant| <= scale / 2`` for unclipped values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quantlm.core import codebook, superblock
from quantlm.core.spec import QuantSpec
from quantlm.errors import InvalidSpecError, QuantlmError

__all__ = [
    "compute_qparams",
    "expand_to_columns",
    "quantize",
    "dequantize",
    "fake_quantize",
    "round_ste",
    "QuantizedTensor",
    "quantize_tensor",
]

# GPTQ reference `mse` search: norm 2.4, grid 100, maxshrink 0.8 -> p = 1 - i/100 for i in 0..79.
MSE_NORM = 2.4
MSE_GRID = 100
MSE_MAXSHRINK = 0.8
_MSE_CHUNK_ELEMENTS = 1 << 20  # bound the temporaries of the mse search and the codebook scale fit
FIT_ITERS = 2  # clip="fit": least-squares refits of a codebook scale (more lower the weight error, not perplexity)

_F32_TINY = torch.finfo(torch.float32).tiny


# ---------------------------------------------------------------------------------------------- helpers
def _check_spec(spec: QuantSpec) -> None:
    if not isinstance(spec, QuantSpec):
        raise InvalidSpecError(f"expected a QuantSpec, got {type(spec).__name__}")


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` (non-empty, floating point) has no NaN or inf: one reduction pass (NaN reaches the min and the
    max), about 10x faster than ``isfinite(x).all()`` on the CPU."""
    return bool(torch.isfinite(torch.stack(torch.aminmax(x))).all())


def _as_rows(x: Tensor, check_values: bool = True) -> Tensor:
    """Validate ``x`` and return it as a float32 2-D ``[rows, n]`` tensor (n = last dim)."""
    if not isinstance(x, Tensor):
        raise QuantlmError(f"expected a torch.Tensor to quantize, got {type(x).__name__}")
    if not x.is_floating_point():
        raise QuantlmError(f"cannot quantize a tensor of dtype {x.dtype}: expected a floating-point tensor")
    if x.dim() == 0:
        raise QuantlmError("cannot quantize a 0-dim tensor: give it at least one dimension (e.g. x.reshape(1))")
    if x.numel() == 0:
        raise QuantlmError(f"cannot quantize an empty tensor (shape {list(x.shape)})")
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    if check_values and not all_finite(x2):
        bad = int((~torch.isfinite(x2)).sum())
        raise QuantlmError(f"cannot quantize a tensor with NaN or inf values ({bad} of {x2.numel()} are not finite)")
    return x2


def _params_2d(t: Tensor) -> Tensor:
    """Bring a scale/zero tensor to 2-D: 0-dim -> [1, 1]; 1-D [k] -> [k, 1] (one per row); N-D -> [-1, last]."""
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t, dtype=torch.float32)
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(-1, 1)
    return t.reshape(-1, t.shape[-1])


def _range_scale(xmin: Tensor, xmax: Tensor, maxq: int) -> Tensor:
    scale = (xmax - xmin) / maxq
    # xmax - xmin can overflow float32 only for |x| > ~1.7e38; no host sync here (hot loop on GPU)
    scale = torch.where(torch.isfinite(scale), scale, xmax / maxq - xmin / maxq)
    return scale.clamp_min(_F32_TINY)


def _grid(xmin: Tensor, xmax: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From raw per-unit min/max (already containing 0) to (xmin, xmax, scale, zero) on the GPTQ grid."""
    maxq = spec.maxq
    if spec.symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(both_zero, torch.full_like(xmax, 1.0), xmax)
    scale = _range_scale(xmin, xmax, maxq)
    zero = _zero_for(xmin, scale, spec)
    return xmin, xmax, scale, zero


def _zero_for(xmin: Tensor, scale: Tensor, spec: QuantSpec) -> Tensor:
    if spec.symmetric:
        return torch.full_like(scale, float((spec.maxq + 1) // 2))
    return torch.round(-xmin / scale).clamp_(0, spec.maxq).add_(0.0)  # add_: no -0.0


def _stats_range(units: Tensor, absmax: Tensor, n: int, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """StatsQ's range (Liu et al. 2023, "Oscillation-free quantization for low-bit vision transformers"): ±2 times
    the mean magnitude of each unit, computed from the values alone, never wider than the unit's MinMax range. A
    partial last group's mean is over its real columns, not its zero padding."""
    counts = torch.full((units.shape[0],), float(units.shape[1]), device=units.device)
    if spec.granularity == "group" and n % spec.group_size:
        counts = counts.reshape(-1, spec.n_groups(n))
        counts[:, -1] = n % spec.group_size
        counts = counts.reshape(-1)
    r = torch.minimum(2 * units.abs().sum(dim=1) / counts, absmax)
    return -r, r


def _units(x2: Tensor, spec: QuantSpec) -> tuple[Tensor, tuple[int, int]]:
    """Lay x2 out as [units, m], one unit per scale/zero. Returns (units, qparam shape).

    A partial last group is padded with zeros: they never move min/max (the range always contains 0) and add
    exactly 0 to the mse error (0 is always exactly representable), so no mask is needed.
    """
    rows, n = x2.shape
    if spec.granularity == "tensor":
        return x2.reshape(1, -1), (1, 1)
    if spec.granularity in ("channel", "token"):
        return x2, (rows, 1)
    gs = spec.group_size
    n_groups = spec.n_groups(n)
    pad = n_groups * gs - n
    if pad:
        x2 = torch.nn.functional.pad(x2, (0, pad))
    return x2.reshape(rows * n_groups, gs), (rows, n_groups)


def _mse_search(
    units: Tensor,
    xmin: Tensor,
    xmax: Tensor,
    scale: Tensor,
    zero: Tensor,
    spec: QuantSpec,
    unit_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """GPTQ-reference shrink search, vectorized over units (loop over the 80 grid points).

    ``unit_weights`` (``[n_units, m]`` like ``units``, non-negative): each element's error is multiplied by its
    weight before the sum (None: all 1, the reference).

    The error of each unit is measured in units of its unclipped scale (``|x - q(x)| / scale0``): a positive
    per-unit constant, so the argmin is unchanged, but float32 neither overflows (|x| ~ 1e30) nor underflows
    (|x| ~ 1e-30). p = 1 is evaluated first and only a strictly smaller error replaces it, so the result is
    never worse than no clipping.
    """
    maxq = spec.maxq
    out_scale = scale.clone()
    out_zero = zero.clone()
    n_units, m = units.shape
    chunk = max(1, _MSE_CHUNK_ELEMENTS // max(m, 1))
    steps = int(MSE_MAXSHRINK * MSE_GRID)
    for start in range(0, n_units, chunk):
        sl = slice(start, start + chunk)
        x = units[sl]
        w = None if unit_weights is None else unit_weights[sl]
        lo, hi, s0, z0 = xmin[sl], xmax[sl], scale[sl], zero[sl]
        inv0 = (1.0 / s0).unsqueeze(1)
        best_err = None
        best_s, best_z = s0.clone(), z0.clone()
        for i in range(steps):
            p = 1.0 - i / MSE_GRID
            if i == 0:
                s, z = s0, z0
            else:
                lo_p, hi_p = p * lo, p * hi
                s = _range_scale(lo_p, hi_p, maxq)
                z = _zero_for(lo_p, s, spec)
            s_c, z_c = s.unsqueeze(1), z.unsqueeze(1)
            q = torch.clamp(torch.round(x / s_c) + z_c, 0, maxq)
            err = ((x - (q - z_c) * s_c).abs_() * inv0).pow_(MSE_NORM)
            if w is not None:
                err.mul_(w)
            err = err.sum(dim=1)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
        out_scale[sl] = best_s
        out_zero[sl] = best_z
    return out_scale, out_zero


def _fit_codebook_scale(units: Tensor, scale: Tensor, spec: QuantSpec, unit_weights: Tensor | None = None) -> Tensor:
    """``clip="fit"``: each unit's scale refitted by Lloyd's alternation from ``scale`` (the absmax): the least-squares
    scale for the current levels, then the levels nearest under it, kept only where the (``unit_weights``-weighted)
    squared error falls; a unit stops when it does not, all stop after ``FIT_ITERS`` refits. A partial group's zero
    padding sits on the level 0, so it adds nothing to either sum."""
    levels = codebook.codebook_levels(spec.codebook, units.device)
    out = scale.clone()
    chunk = max(1, _MSE_CHUNK_ELEMENTS // max(units.shape[1], 1))
    for start in range(0, units.shape[0], chunk):
        sl = slice(start, start + chunk)
        x = units[sl]
        w = torch.ones_like(x) if unit_weights is None else unit_weights[sl]
        s = scale[sl].unsqueeze(1)
        lv = levels[codebook.nearest_level(x / s, spec.codebook).long()]
        err = (w * (x - lv * s).square()).sum(1, keepdim=True)
        for _ in range(FIT_ITERS):
            fitted = (w * x * lv).sum(1, keepdim=True) / (w * lv * lv).sum(1, keepdim=True)
            fitted = torch.where(torch.isfinite(fitted) & (fitted > _F32_TINY), fitted, s)
            lv_new = levels[codebook.nearest_level(x / fitted, spec.codebook).long()]
            err_new = (w * (x - lv_new * fitted).square()).sum(1, keepdim=True)
            better = err_new < err
            if not bool(better.any()):
                break
            s, lv, err = torch.where(better, fitted, s), torch.where(better, lv_new, lv), torch.minimum(err, err_new)
        out[sl] = s.squeeze(1)
    return out


# ---------------------------------------------------------------------------------------------- public API
def compute_qparams(x: Tensor, spec: QuantSpec, *, column_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Scale and zero point of ``x`` for ``spec`` (float32, shape ``spec.qparams_shape(rows, n)``).

    ``x`` may have any shape with at least one dim; it is viewed as ``[rows, n]`` with ``n = x.shape[-1]``.
    ``column_weights`` ([n], finite, non-negative; only read when ``spec.clip`` is "mse" or "fit"): the MSE search
    (and the codebook scale fit) weighs each column's error by it, e.g. the Hessian diagonal (the inputs' second
    moments), so the clipping protects the columns that reach the output most. Raises :class:`QuantlmError` for
    non-floating, empty or non-finite input. The result carries no gradient.
    """
    _check_spec(spec)
    x2 = _as_rows(x)
    if column_weights is not None:
        column_weights = _check_column_weights(column_weights, x2.shape[1])
    return _qparams_2d(x2, spec, column_weights)


def _check_column_weights(weights: Tensor, n: int) -> Tensor:
    if not isinstance(weights, Tensor) or weights.dim() != 1 or weights.shape[0] != n:
        shape = list(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise QuantlmError(f"column_weights must be a 1-D tensor with one weight per column ({n}), got {shape}")
    weights = weights.detach().to(torch.float32)
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise QuantlmError("column_weights must be finite and non-negative")
    return weights


@torch.no_grad()
def _qparams_2d(x2: Tensor, spec: QuantSpec, column_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    units, shape = _units(x2, spec)
    # the weights laid out like the values: one per element of each unit (0 on a partial group's padding)
    weights = None
    if column_weights is not None and spec.clip != "none":
        weights = _units(column_weights.to(units.device).expand_as(x2), spec)[0]
    if spec.codebook != "none":
        absmax = units.abs().amax(dim=1)
        scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).clamp_min(_F32_TINY)
        if spec.clip == "fit":
            scale = _fit_codebook_scale(units, scale, spec, weights)
        return scale.reshape(shape).contiguous(), torch.zeros(shape, device=x2.device)
    xmin = units.amin(dim=1).clamp(max=0.0)
    xmax = units.amax(dim=1).clamp(min=0.0)
    if spec.clip == "stats":
        xmin, xmax = _stats_range(units, torch.maximum(-xmin, xmax), x2.shape[1], spec)
    xmin, xmax, scale, zero = _grid(xmin, xmax, spec)
    if spec.clip == "mse":
        scale, zero = _mse_search(units, xmin, xmax, scale, zero, spec, weights)
    scale, zero = scale.reshape(shape), zero.reshape(shape)
    if spec.scale_bits is not None:
        superblock.check_columns(x2.shape[1], spec)
        empty = ((units == 0).all(dim=1)).reshape(shape)
        scale, zero = superblock.superblock_grid(scale, zero, spec, empty)
    return scale.contiguous(), zero.contiguous()


def expand_to_columns(t: Tensor, spec: QuantSpec, n_columns: int) -> Tensor:
    """Expand per-group/per-row/per-tensor values to one per column.

    ``[rows, ceil(n / group_size)]`` (granularity 'group') -> ``[rows, n]``, each group value repeated over its
    columns, the last group possibly partial. ``[rows, 1]`` -> ``[rows, n]`` and ``[1, 1]`` -> ``[1, n]`` as
    broadcast views. A tensor that already has ``n`` columns is returned as is. 0-dim -> [1, 1]; 1-D ``[k]`` is
    read as one value per row ``[k, 1]``; more dims are flattened to ``[-1, last]``.
    """
    _check_spec(spec)
    t = _params_2d(t)
    rows, k = t.shape
    if spec.granularity == "group" and k == spec.n_groups(n_columns) and k != n_columns:
        idx = torch.arange(n_columns, device=t.device) // spec.group_size
        return t.index_select(1, idx)
    if k == n_columns:
        return t
    if k == 1:
        return t.expand(rows, n_columns)
    want = spec.n_groups(n_columns)
    raise QuantlmError(
        f"scale/zero with {k} columns do not fit a tensor with {n_columns} columns for '{spec.describe()}' "
        f"(expected {want}{'' if want == 1 else ' or 1'} or {n_columns})"
    )


def _expand_params(scale: Tensor, zero: Tensor, spec: QuantSpec, rows: int, n: int) -> tuple[Tensor, Tensor]:
    out = []
    for name, t in (("scale", scale), ("zero", zero)):
        e = expand_to_columns(t, spec, n)
        if e.shape[0] not in (1, rows):
            raise QuantlmError(f"{name} has {e.shape[0]} rows but the tensor has {rows} rows (expected {rows} or 1)")
        out.append(e)
    return out[0], out[1]


def quantize(x: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Integer codes ``clamp(round(x / scale) + zero, 0, maxq)`` as uint8, same shape as ``x``.

    ``scale``/``zero`` as returned by :func:`compute_qparams` (or anything :func:`expand_to_columns` accepts,
    e.g. one group's ``[rows, 1]`` slice for a column block of a grouped weight). Values are not checked for
    NaN here (hot path); :func:`quantize_tensor` and :func:`compute_qparams` do check.
    """
    _check_spec(spec)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.float32)
    s, z = _expand_params(scale, zero, spec, x2.shape[0], x2.shape[1])
    if spec.codebook != "none":
        return codebook.nearest_level(x2 / s.to(torch.float32), spec.codebook).reshape(shape)
    whole, part = _split_zero(z.to(torch.float32))
    q = torch.clamp(torch.round(x2 / s.to(torch.float32) + part) + whole, 0, spec.maxq)
    return q.to(torch.uint8).reshape(shape)


def _split_zero(z: Tensor) -> tuple[Tensor, Tensor]:
    """A zero point as its nearest integer and the rest: codes are ``round(x / scale + rest) + integer``, which is
    ``round(x / scale) + zero`` for integer zeros (the GPTQ reference) and ``round(x / scale + zero)`` for
    fractional ones (HQQ, super-block grids) without a branch on the values."""
    whole = torch.round(z)
    return whole, z - whole


def dequantize(
    codes: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``(codes - zero) * scale`` (codebook grids: ``level[codes] * scale``) computed in float32, returned in ``dtype``
    with the shape of ``codes``."""
    _check_spec(spec)
    shape = codes.shape
    if spec.codebook != "none":
        c2 = codebook.decode(codes.reshape(-1, shape[-1]), spec.codebook)
        s, _ = _expand_params(scale, scale, spec, c2.shape[0], c2.shape[1])
        return (c2 * s.to(torch.float32)).to(dtype).reshape(shape)
    c2 = codes.reshape(-1, shape[-1]).to(torch.float32)
    s, z = _expand_params(scale, zero, spec, c2.shape[0], c2.shape[1])
    out = (c2 - z.to(torch.float32)) * s.to(torch.float32)
    return out.to(dtype).reshape(shape)


def round_ste(t: Tensor) -> Tensor:
    """Round-half-to-even in the forward pass, identity gradient in the backward pass."""
    return t + (torch.round(t) - t).detach()


def fake_quantize(x: Tensor, spec: QuantSpec, scale: Tensor | None = None, zero: Tensor | None = None) -> Tensor:
    """Quantize then dequantize, differentiably; output in ``x``'s dtype and shape.

    The forward value equals ``dequantize(quantize(x, scale, zero, spec), scale, zero, spec)`` exactly.
    Gradient w.r.t. ``x`` (straight-through estimator): 1 where ``round(x / scale) + zero`` lies in
    ``[0, maxq]``, 0 where it was clamped. Without ``scale``/``zero`` they come from
    :func:`compute_qparams` on ``x.detach()`` (no gradient to them). Given ``scale``/``zero`` stay in the graph
    (LSQ-style): for in-range entries d out / d scale = ``round(x/scale) - x/scale``, for clamped ones
    ``q - zero``.
    """
    _check_spec(spec)
    if (scale is None) != (zero is None):
        raise QuantlmError("fake_quantize needs both scale and zero, or neither")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise QuantlmError("fake_quantize expects a floating-point tensor")
    if scale is None:
        scale, zero = compute_qparams(x.detach(), spec)
    shape = x.shape
    if spec.codebook != "none":  # straight through the level lookup; no gradient to the scales
        on_grid = dequantize(quantize(x.detach(), scale.detach(), zero, spec), scale.detach(), zero, spec)
        return x + (on_grid.to(x.dtype) - x).detach()
    x2 = x.reshape(-1, shape[-1]).to(torch.float32)
    s, z = _expand_params(scale, zero, spec, x2.shape[0], x2.shape[1])
    s = s.to(torch.float32)
    z = z.to(torch.float32)
    whole, part = _split_zero(z)
    q = torch.clamp(round_ste(x2 / s + part) + whole, 0, spec.maxq)
    out = (q - z) * s
    return out.to(x.dtype).reshape(shape)


@dataclass
class QuantizedTensor:
    """Codes plus the grid that decodes them. ``codes`` is 2-D ``[rows, n]`` (leading dims of the source folded)."""

    codes: Tensor  # uint8 [rows, n]
    scale: Tensor  # float32, spec.qparams_shape(rows, n)
    zero: Tensor  # float32, integers but on asymmetric super-block grids
    spec: QuantSpec

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Reconstructed ``[rows, n]`` tensor in ``dtype``."""
        return dequantize(self.codes, self.scale, self.zero, self.spec, dtype=dtype)


def quantize_tensor(x: Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Quantize ``x`` (any shape, >= 1 dim) with ``spec``; codes are reshaped to 2-D ``[rows, n]``, n = last dim.

    Raises :class:`QuantlmError` for non-floating, empty, 0-dim or non-finite (NaN/inf) input.
    """
    _check_spec(spec)
    x2 = _as_rows(x)
    scale, zero = _qparams_2d(x2, spec)
    codes = quantize(x2, scale, zero, spec)
    return QuantizedTensor(codes=codes, scale=scale, zero=zero, spec=spec)
