"""HQQ (Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Machine Learning Models"; the ``hqq`` library).

Calibration-free: each group of ``group_size`` consecutive input columns of a weight W [out, in] gets an asymmetric
grid ``w ≈ (q - z) · s`` with codes q in [0, 2^b - 1] and a *float* zero point z, fitted to the weights alone by
minimising a sparsity-promoting ℓp error (p < 1) instead of rounding min/max:

    min_z  Σ |W - (Q(W) - z) s|^p,     Q(W) = clamp(round(W / s + z), 0, maxq)

Half-quadratic splitting adds an auxiliary error W_e ≈ W - W_r (W_r the dequantized weight) and alternates two
easy steps, growing β after each pair (the ``hqq`` library's defaults: p = 0.7, β = 10, κ = 1.01, 20 iterations):

1. W_e ← shrink_p(W - W_r, β), the generalised soft threshold shrink_p(x) = sign(x) · relu(|x| - |x|^(p-1) / β);
2. (s, z) ← the least-squares line through (Q(W), W - W_e) per group (``optimize_scale``, the default; the library
   fits z alone for the fixed s: z = mean(Q(W) - (W - W_e) / s), which ``--no-optimize-scale`` keeps);
3. β ← κ β.

The start is RTN's grid: the min/max range (containing 0) with its zero rounded to an integer, as the library starts
at 4 bits (``round_zero``). Each group stops the first time its mean |W - W_r| does not decrease and keeps its best
grid (the library stops on the mean over the whole tensor).

What the iterations do on LLM weights: the shrink threshold |e|^(p-1)/β is not scale-free, errors below
β^(-1/(2-p)) ≈ 0.17 are shrunk to 0, and LLM weight errors are ~1e-3, so W_e = 0 and step 2 is the least-squares
grid for the current codes: Lloyd's alternation between codes and grid. Its result hinges on the start. Measured on
SmolLM2-135M, W4 g64, 8 × 2048 enwiki eval windows in fp32 (``benchmarks/calibration_free_peers.py`` has the
32-window table): the library 20.58; the same iterations with the zero alone from the rounded start 20.57 (the
library's algorithm), from the unrounded zero -min/s 21.72; scale and zero fitted from the rounded start 20.32 (the
default); from the MSE-clipped grid 20.93 (22.47 with its zeros rounded): at 4 bits, clipping a group's largest
weights costs more than its lower squared error gains.

Why the library collapses at 3 bits, and what quantlm does instead. A float zero moves the grid point nearest 0 off
0: every weight of a group's bulk of near-zero weights (half of them lie within half a step of 0 at 3 bits) then
carries the same offset δ = (round(z) - z)·s, an error that is small in the squared sum but has one sign across
the group, so it adds up coherently over inputs that are not zero-mean, as LLM hidden states are not. Measured on
SmolLM2-135M, W3 g64, 4 × 512 enwiki eval tokens (fp 27.66): RTN 86.99; the min/max grid with a float zero and no
iterations 182.6; HQQ as published 210.7 (the same collapse as the library's 7.6x); HQQ with its zeros rounded
87.3; started from the MSE-clipped grid with scale and zero fitted and the zero rounded 82.08 (RTN on the clipped
grid: 82.85). On 8 × 2048 windows: float zeros fitted from RTN's grid 53.95, integer zeros from RTN's grid 52.63,
from the clipped grid 50.95. So ``zero_point="auto"`` keeps float zeros from 4 bits up and uses the integer
variant (clipped start, scale and zero fitted, zero rounded) below. The squared weight error does not see this (the
float-zero grids have the lower one), so it is not the guard.

A second guard, per group: keep whichever of the HQQ grid and RTN's grid(s) (min/max; and the MSE-clipped one
when the search started from it) has the lower squared error, so no group ends worse than RTN on that measure.
(Started from the float zero -min/s instead, on a synthetic 256 x 1024 matrix with 1% of the weights x20, the
unguarded solver left a quarter of the groups worse than RTN: the iterations are a local search judged by mean
|e|.)

The scales and zeros are rounded to their storage dtypes before the final codes are computed, so the result is
exactly the stored layer.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from quantlm.core import QuantSpec, compute_qparams, quantize
from quantlm.core.quantizer import all_finite
from quantlm.errors import InvalidSpecError, QuantlmError
from quantlm.methods.base import Method, register, setting
from quantlm.methods.common import exclude_setting, is_excluded, swap_in
from quantlm.models.blocks import linear_weight
from quantlm.nn.qlinear import QuantLinear, storage_scale_dtype, storage_zero_dtype
from quantlm.pipeline.runner import BlockContext, LayerRecord

_F32_TINY = torch.finfo(torch.float32).tiny
ITERS, LP_NORM, BETA, KAPPA = 20, 0.7, 10.0, 1.01  # the hqq library's defaults
OPTIMIZE_SCALE = True  # fit the scale with the zero (the library fits the zero alone)
ZERO_POINTS = ("auto", "float", "integer")
SOLVE_CHUNK_ELEMENTS = 1 << 18  # weights per chunk of an iteration: its codes and errors (1 MB each) stay in the cache
INTEGER_ZERO_BELOW_BITS = 4  # auto: integer zeros below this many bits, float zeros from it up


@dataclass(frozen=True)
class HQQResult:
    codes: Tensor  # uint8 [out, in]
    scale: Tensor  # [out, n_groups] in its storage dtype (fp16, or fp32 where fp16 would not hold it)
    zero: Tensor  # [out, n_groups] float zero points in their storage dtype (fp16, or fp32)
    error: float  # ||W_q - W||_F / ||W||_F
    rtn_groups: Tensor  # bool [out, n_groups]: the groups where RTN's grid had the lower squared error
    iterations: int  # grid updates made by the group that ran longest
    group_size: int  # columns per group (in_features per channel)

    @property
    def zero_dtype(self) -> torch.dtype:
        return self.zero.dtype

    @property
    def dequantized(self) -> Tensor:
        """float32 [out, in]: (codes - zero) · scale, the stored layer's weight."""
        columns = torch.arange(self.codes.shape[1], device=self.codes.device) // self.group_size
        return (self.codes.float() - self.zero.float()[:, columns]) * self.scale.float()[:, columns]


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor | None:
    """The generalised soft threshold sign(x) · relu(|x| - |x|^(p-1) / β), the proximal step of (1/β)·|x|^p
    (p = 1: plain soft thresholding), or None where it is 0 everywhere.

    It is nonzero only where |x|^(2-p) > 1/β, i.e. |x| > β^(-1/(2-p)) (about 0.17 for the defaults), which LLM weight
    errors rarely reach: the power is computed for those entries alone."""
    threshold = beta ** (-1 / (2 - p))
    if float(torch.stack(torch.aminmax(x)).abs().max()) <= threshold:
        return None  # the usual case, found in one pass without a temporary
    a = x.abs()
    big = a > threshold
    out = torch.zeros_like(x)
    ab = a[big]
    out[big] = torch.sign(x[big]) * (ab - ab.pow(p - 1) / beta).clamp_min(0)
    return out


def check_hqq_spec(spec: QuantSpec) -> None:
    """HQQ's grids: integer codes with a fitted float zero, asymmetric, per channel or per group, no clip search."""
    if spec.codebook != "none":
        raise InvalidSpecError(f"HQQ fits an integer grid: drop --codebook {spec.codebook} (codebook='none')")
    if spec.symmetric:
        raise InvalidSpecError("HQQ fits an asymmetric grid with a float zero point: drop --sym (symmetric=False)")
    if spec.scale_bits is not None:
        raise InvalidSpecError("HQQ fits float scales and zeros per group: drop --scale-bits (a K-quant grid)")
    if spec.clip != "none":
        raise InvalidSpecError(
            f"HQQ fits its own grid: drop --clip {spec.clip} (clip='none'); --zero-point integer starts from the "
            "MSE-clipped grid"
        )
    if spec.granularity not in ("channel", "group"):
        raise InvalidSpecError(f"HQQ quantizes weights per channel or per group, not per {spec.granularity}")


def check_hqq_settings(iters: int, lp_norm: float, beta: float, kappa: float) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise InvalidSpecError(f"iters must be a whole number >= 0 (e.g. 20), got {iters!r}")
    if not 0 < lp_norm <= 1:
        raise InvalidSpecError(f"lp_norm must be in (0, 1] (e.g. 0.7), got {lp_norm}")
    if not beta > 0 or not kappa >= 1:
        raise InvalidSpecError(f"beta must be positive and kappa at least 1 (e.g. 10 and 1.01), got {beta}, {kappa}")


def _check(weight: Tensor, spec: QuantSpec) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.numel() == 0:
        shape = list(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise InvalidSpecError(f"HQQ needs a non-empty 2-D weight [out, in], got {shape}")
    check_hqq_spec(spec)
    if not all_finite(weight):
        raise QuantlmError("HQQ: the weight has NaN or inf values")


def group_rows(weight: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor | None]:
    """W [out, in] as rows of a [out · n_groups, group_size] float32 matrix (a partial last group padded with 0),
    and the mask of real (non-padding) entries, or None where there is no padding."""
    n_out, n_in = weight.shape
    gs = spec.group_size if spec.granularity == "group" else n_in
    n_groups = math.ceil(n_in / gs)
    pad = n_groups * gs - n_in
    w = torch.nn.functional.pad(weight.detach().float(), (0, pad))
    if not pad:
        return w.reshape(n_out * n_groups, gs), None
    mask = torch.ones(n_out, n_groups * gs, dtype=torch.bool, device=weight.device)
    mask[:, n_in:] = False
    return w.reshape(n_out * n_groups, gs), mask.reshape(n_out * n_groups, gs)


def _per_group(t: Tensor, n_out: int) -> Tensor:
    """[out · n_groups] (or [out · n_groups, 1]) -> [out, n_groups]."""
    return t.reshape(n_out, -1)


def _columns(units: Tensor, n_out: int, n_in: int) -> Tensor:
    """[out · n_groups, group_size] -> [out, in], dropping the padding."""
    return units.reshape(n_out, -1)[:, :n_in]


def _row_dot(a: Tensor, b: Tensor, scratch: Tensor) -> Tensor:
    """Σ a · b per row, [rows, 1], through ``scratch`` (a buffer at least as large; a multiply and a sum are about
    twice as fast as ``vecdot`` on these narrow rows)."""
    return torch.mul(a, b, out=scratch[: a.shape[0]]).sum(1, keepdim=True)


def _fit(q: Tensor, target: Tensor, t_sum: Tensor, count: Tensor, s: Tensor, optimize_scale: bool, scratch: Tensor):
    """The least-squares grid through (q, target) per group, from sums (``t_sum``: Σ target; ``count``: the real
    entries; ``q`` is 0 on the padding): z = mean(q) - mean(target) / s for the fixed s, or with ``optimize_scale``
    the line's slope cov(q, target) / var(q) as s too (kept where the line is degenerate: no codes spread, or a
    slope that is not positive). ``scratch``: a buffer the size of ``q``."""
    q_sum = q.sum(1, keepdim=True)
    q_mean = q_sum / count
    if optimize_scale:
        cov = _row_dot(q, target, scratch) - q_mean * t_sum
        var = _row_dot(q, q, scratch) - q_mean * q_sum
        slope = cov / var
        s = torch.where(torch.isfinite(slope) & (slope > _F32_TINY), slope, s)
    return s, q_mean - t_sum / count / s


class Solution(NamedTuple):
    scale: Tensor  # [groups, 1]: each group's grid of lowest mean |W - W_r|
    zero: Tensor
    updates: int  # grid updates made by the group that ran longest
    start_sse: Tensor  # [groups, 1]: the squared error of the start grid's codes, as a stored layer computes it


@torch.no_grad()
def hqq_solve(
    W: Tensor,
    mask: Tensor | None,
    s: Tensor,
    z: Tensor,
    maxq: int,
    *,
    iters: int = ITERS,
    lp_norm: float = LP_NORM,
    beta: float = BETA,
    kappa: float = KAPPA,
    optimize_scale: bool = OPTIMIZE_SCALE,
) -> Solution:
    """The half-quadratic iterations on groups laid out as rows of ``W`` [groups, size] (``mask``: real entries,
    None: all), from the grids ``s``, ``z`` [groups, 1]. No guard, no storage rounding: ``hqq_quantize`` adds those.

    A group stops the first time its error does not decrease. Every iteration runs over the rows still held, in
    chunks of ``SOLVE_CHUNK_ELEMENTS`` whose codes and errors stay in the cache (two buffers reused throughout);
    stopped rows are dropped once they are a quarter of those held. So a late iteration, where few groups still
    run, is one small chunk, whichever matrices the rows came from: pass all the groups of many weights at once."""
    m = None if mask is None else mask.float()
    count = torch.full_like(s, W.shape[1]) if m is None else m.sum(1, keepdim=True).clamp_min(1)
    w_sum = W.sum(1, keepdim=True)  # the padding is 0
    integer_start = bool((z == z.round()).all())
    chunk = max(1, SOLVE_CHUNK_ELEMENTS // W.shape[1])
    q_buf, d_buf = (torch.empty(min(chunk, W.shape[0]), W.shape[1], device=W.device) for _ in range(2))
    best_s, best_z = s.clone(), z.clone()  # every group's, written back from the held rows' as they are dropped
    start_sse = torch.empty_like(s)
    err = torch.empty_like(s)
    rows = torch.arange(W.shape[0], device=W.device)  # the rows held, and their slices of everything
    held_err, held_s, held_z = torch.full_like(s, math.inf), s, z  # the held rows' best so far
    active = torch.ones(W.shape[0], 1, dtype=torch.bool, device=W.device)  # which of them still run
    updates = 0
    for t in range(iters + 1):
        fit = t < iters
        new_s, new_z = (torch.empty_like(s), torch.empty_like(z)) if fit else (s, z)
        for lo in range(0, W.shape[0], chunk):
            c = slice(lo, lo + chunk)
            Wc, sc, zc, mc = W[c], s[c], z[c], None if m is None else m[c]
            q, d = q_buf[: Wc.shape[0]], d_buf[: Wc.shape[0]]
            if t == 0 and integer_start:  # RTN's codes on its grid, exactly: round(W / s) + z
                torch.div(Wc, sc, out=q).round_().add_(zc).clamp_(0, maxq)
            else:
                torch.div(Wc, sc, out=q).add_(zc).round_().clamp_(0, maxq)
            torch.sub(q, zc, out=d).mul_(sc).sub_(Wc)  # W_r - W, rounded as the stored layer's weight is (no FMA)
            if mc is not None:
                d.mul_(mc)
            if t == 0:
                start_sse[c] = torch.linalg.vecdot(d, d, dim=1).unsqueeze(1)
            # the shrink of W - W_r = -d (odd: W_e = -shrink(d)); None where it is 0 everywhere
            shrunk = shrink_lp(d, beta, lp_norm) if fit else None
            torch.div(d.abs_().sum(1, keepdim=True), count[c], out=err[c])
            if not fit:
                continue
            if mc is not None:
                q.mul_(mc)
            target = Wc if shrunk is None else Wc + shrunk
            t_sum = w_sum[c] if shrunk is None else target.sum(1, keepdim=True)
            new_s[c], new_z[c] = _fit(q, target, t_sum, count[c], sc, optimize_scale, scratch=d)
        active &= err < held_err
        held_err = torch.where(active, err, held_err)
        held_s, held_z = torch.where(active, s, held_s), torch.where(active, z, held_z)
        n_active = int(active.sum())
        if not fit or n_active == 0:
            break
        s, z = new_s, new_z
        if n_active < 0.75 * rows.numel():  # drop the stopped rows, their best grids written back
            done = ~active.squeeze(1)
            best_s[rows[done]], best_z[rows[done]] = held_s[done], held_z[done]
            keep = active.squeeze(1)
            rows = rows[keep]
            W, w_sum, count, s, z, held_err, held_s, held_z, active, err = (
                x[keep] for x in (W, w_sum, count, s, z, held_err, held_s, held_z, active, err)
            )
            m = None if m is None else m[keep]
        beta *= kappa
        updates = t + 1
    best_s[rows], best_z[rows] = held_s, held_z
    return Solution(best_s, best_z, updates, start_sse)


def _sse(W: Tensor, m: Tensor | None, codes: Tensor, s: Tensor, z: Tensor) -> Tensor:
    """Each group's squared error ‖(codes - z) · s - W‖² over its real entries (``m``: their mask, None: all)."""
    d = (codes - z).mul_(s).sub_(W)  # rounded as the stored layer's weight is (no fused multiply-add)
    if m is not None:
        d.mul_(m)
    return torch.linalg.vecdot(d, d, dim=1).unsqueeze(1)


@dataclass
class _Problem:
    """One weight's groups as rows, and its RTN grid(s); the search starts from the last, as stored."""

    shape: tuple[int, int]
    W: Tensor
    mask: Tensor | None
    rtn_grids: list[tuple[Tensor, Tensor]]
    start_dtype: torch.dtype

    @property
    def start(self) -> tuple[Tensor, Tensor]:
        scale, zero = self.rtn_grids[-1]
        return scale.to(self.start_dtype).float(), zero


def _problem(weight: Tensor, spec: QuantSpec, clipped_start: bool) -> _Problem:
    _check(weight, spec)
    W, mask = group_rows(weight, spec)
    # RTN: quantlm's grid (range containing 0, integer zero), and with ``clipped_start`` the MSE-clipped one too;
    # the search starts from the last as stored (its scale in the storage dtype, its zero an integer as the
    # library's round_zero start at 4 bits), so the start's error is RTN's
    rtn_grids = [tuple(t.reshape(-1, 1) for t in compute_qparams(weight.detach().float(), spec))]
    if clipped_start:
        clipped = dataclasses.replace(spec, clip="mse")
        rtn_grids.append(tuple(t.reshape(-1, 1) for t in compute_qparams(weight.detach().float(), clipped)))
    start_dtype = storage_scale_dtype(torch.cat([g[0] for g in rtn_grids]))
    return _Problem(tuple(weight.shape), W, mask, rtn_grids, start_dtype)


def _finish(problem: _Problem, spec: QuantSpec, solution: Solution, integer_zero: bool) -> HQQResult:
    """Round the solved grid to the storage dtypes, then the codes, then keep RTN's grid on every group where that
    has the lower squared error."""
    (n_out, n_in), W, maxq = problem.shape, problem.W, spec.maxq
    m = None if problem.mask is None else problem.mask.float()
    s, z = solution.scale, solution.zero
    scale_dtype = storage_scale_dtype(torch.cat([s, *(g[0] for g in problem.rtn_grids)]))
    if integer_zero:
        z = torch.round(z).clamp_(0, maxq)
    zero_dtype = torch.uint8 if integer_zero else storage_zero_dtype(z, spec.bits)
    scale, zero = s.to(scale_dtype).float(), z.to(zero_dtype).float()
    codes = torch.div(W, scale).add_(zero).round_().clamp_(0, maxq)
    best = _sse(W, m, codes, scale, zero)
    use_rtn = torch.zeros_like(best, dtype=torch.bool)
    integer_spec = QuantSpec(bits=spec.bits)
    for i, (grid_scale, grid_zero) in enumerate(problem.rtn_grids):
        s_r = grid_scale.to(scale_dtype).float()
        if i == len(problem.rtn_grids) - 1 and scale_dtype == problem.start_dtype:
            sse = solution.start_sse  # the search's start is this grid as stored
        else:
            sse = _sse(W, m, quantize(W, s_r, grid_zero, integer_spec).float(), s_r, grid_zero)
        better = (sse < best).squeeze(1)
        if not bool(better.any()):
            continue
        idx = better.nonzero().squeeze(1)
        codes[idx] = quantize(W[idx], s_r[idx], grid_zero[idx], integer_spec).float()  # RTN's own codes, exactly
        best[idx], scale[idx], zero[idx] = sse[idx], s_r[idx], grid_zero[idx]
        use_rtn[idx] = True

    denom = float(torch.linalg.vecdot(W.reshape(-1), W.reshape(-1)))  # ‖W‖², the padding is 0
    return HQQResult(
        codes=_columns(codes, n_out, n_in).to(torch.uint8).contiguous(),
        scale=_per_group(scale, n_out).to(scale_dtype),
        zero=_per_group(zero, n_out).to(zero_dtype),
        error=math.sqrt(float(best.sum()) / denom) if denom > 0 else 0.0,
        rtn_groups=_per_group(use_rtn, n_out),
        iterations=solution.updates,
        group_size=W.shape[1],
    )


@torch.no_grad()
def hqq_quantize_many(
    weights: list[Tensor],
    spec: QuantSpec,
    *,
    iters: int = ITERS,
    lp_norm: float = LP_NORM,
    beta: float = BETA,
    kappa: float = KAPPA,
    optimize_scale: bool = OPTIMIZE_SCALE,
    integer_zero: bool = False,
    clipped_start: bool = False,
) -> list[HQQResult]:
    """``hqq_quantize`` of every weight of ``weights``, their groups solved together (each group is solved on its
    own, so the results are those of one weight at a time; the late iterations, where few groups still run, are
    shared). ``iterations`` of each result: the most updates any group of the batch made."""
    check_hqq_settings(iters, lp_norm, beta, kappa)
    problems = [_problem(w, spec, clipped_start) for w in weights]
    results: list[HQQResult | None] = [None] * len(problems)
    widths = {p.W.shape[1] for p in problems}  # one unless per-channel grids of weights with other in_features
    for width in widths:
        batch = [i for i, p in enumerate(problems) if p.W.shape[1] == width]
        W = torch.cat([problems[i].W for i in batch])
        first = 0
        for i in batch:  # each problem's rows become a view of the batch (one copy of the weights, not two)
            problems[i].W = W[first : first + problems[i].W.shape[0]]
            first += problems[i].W.shape[0]
        masks = [problems[i].mask for i in batch]
        mask = None
        if any(m is not None for m in masks):
            mask = torch.cat(
                [torch.ones_like(problems[i].W, dtype=torch.bool) if m is None else m for i, m in zip(batch, masks)]
            )
        starts = [problems[i].start for i in batch]
        solution = hqq_solve(
            W,
            mask,
            torch.cat([st[0] for st in starts]),
            torch.cat([st[1] for st in starts]),
            spec.maxq,
            iters=iters,
            lp_norm=lp_norm,
            beta=beta,
            kappa=kappa,
            optimize_scale=optimize_scale,
        )
        first = 0
        for i in batch:
            rows = slice(first, first + problems[i].W.shape[0])
            first = rows.stop
            part = Solution(solution.scale[rows], solution.zero[rows], solution.updates, solution.start_sse[rows])
            results[i] = _finish(problems[i], spec, part, integer_zero)
    return results


def hqq_quantize(weight: Tensor, spec: QuantSpec, **settings) -> HQQResult:
    """Quantize ``weight`` [out, in] on ``spec``'s grid (asymmetric, per channel or per group) with HQQ float zeros,
    falling back to round-to-nearest on every group where that has the lower squared error. ``settings`` are those of
    ``hqq_quantize_many``: ``iters``, ``lp_norm``, ``beta``, ``kappa``, ``optimize_scale``, ``integer_zero`` (the
    fitted zeros rounded to integers, stored as uint8) and ``clipped_start`` (start from the MSE-clipped RTN grid,
    and let it be a fallback too, instead of the min/max one)."""
    return hqq_quantize_many([weight], spec, **settings)[0]


@register
@dataclass(frozen=True)
class HQQ(Method):
    """HQQ as a pipeline step: every Linear of the decoder blocks on its own fitted grid, no calibration data.

    Asymmetric integer grids per group (or per channel) with float zero points stored in fp16 (fp32 where fp16 does
    not hold them); each group falls back to RTN's grid where that has the lower squared error. ``exclude`` holds
    fnmatch patterns of module names to leave alone.
    """

    spec: QuantSpec = QuantSpec(bits=4, group_size=64)
    iters: int = setting(ITERS, "Iterations per group (0: RTN's grid).", flag="--hqq-iters")
    lp_norm: float = setting(LP_NORM)
    beta: float = setting(BETA)
    kappa: float = setting(KAPPA)
    optimize_scale: bool = setting(
        OPTIMIZE_SCALE,
        "Refit each group's scale by least squares with its zero in every iteration (off: the zero alone).",
        flag="--optimize-scale/--no-optimize-scale",
    )
    zero_point: str = setting(
        "auto",
        "float (from RTN's grid, a fitted float zero), integer (MSE-clipped start, scale and zero "
        "fitted, zero rounded so 0 stays on the grid) or auto (float from 4 bits up, integer below).",
        flag="--zero-point",
    )
    exclude: tuple[str, ...] = exclude_setting()

    name = "hqq"
    needs_calibration = False
    fits_own_grid = True  # a step before it (AWQ) cannot search on the grid HQQ will fit

    def __post_init__(self) -> None:
        check_hqq_spec(self.spec)
        check_hqq_settings(self.iters, self.lp_norm, self.beta, self.kappa)
        if self.zero_point not in ZERO_POINTS:
            raise InvalidSpecError(f"zero_point must be one of {', '.join(ZERO_POINTS)}, got {self.zero_point!r}")

    @property
    def integer_zero(self) -> bool:
        """Whether the fitted zeros are rounded (then the search starts from the MSE-clipped grid and fits the scale
        too): ``auto`` does so below 4 bits, where a float zero moves the grid point nearest 0 off it and the bulk of
        small weights with it (docs/calibration_free.md)."""
        return self.zero_point == "integer" or (self.zero_point == "auto" and self.spec.bits < INTEGER_ZERO_BELOW_BITS)

    def process_block(self, ctx: BlockContext) -> list[LayerRecord]:
        """Every Linear of the block, their groups solved together (``hqq_quantize_many``)."""
        targets = {n: m for n, m in ctx.linears().items() if not is_excluded(n, self.exclude)}
        if not targets:
            return []
        t0 = time.perf_counter()
        weights = [linear_weight(m).detach() for m in targets.values()]
        results = hqq_quantize_many(
            weights,
            self.spec,
            iters=self.iters,
            lp_norm=self.lp_norm,
            beta=self.beta,
            kappa=self.kappa,
            optimize_scale=self.optimize_scale or self.integer_zero,
            integer_zero=self.integer_zero,
            clipped_start=self.integer_zero,
        )
        seconds = (time.perf_counter() - t0) / len(targets)  # solved together: each Linear's share
        return [
            self._swap(ctx.model, name, module, weight, result, seconds)
            for (name, module), weight, result in zip(targets.items(), weights, results)
        ]

    def _swap(self, root, name: str, module, weight: Tensor, result: HQQResult, seconds: float) -> LayerRecord:
        qlinear = QuantLinear.from_codes(
            result.codes,
            result.scale,
            result.zero,
            self.spec,
            getattr(module, "bias", None),
            zero_dtype=result.zero_dtype,
        )
        swap_in(root, name, qlinear, module)
        return LayerRecord(
            module=name,
            method=self.name,
            seconds=seconds,
            error=result.error,  # of exactly the stored layer (its grid was rounded to the storage dtypes first)
            details={
                "shape": list(weight.shape),
                "spec": qlinear.describe(),
                "rtn_groups": int(result.rtn_groups.sum()),
                "groups": result.rtn_groups.numel(),
                "iterations": result.iterations,
            },
        )

    def describe(self) -> str:
        fits_scale = self.optimize_scale or self.integer_zero
        extra = ("" if fits_scale else " zero-only") + (" integer-zero" if self.integer_zero else "")
        return super().describe().replace(")", f"{extra})", 1)
