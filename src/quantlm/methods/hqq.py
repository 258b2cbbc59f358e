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
SOLVE_CHUNK_ELEMENTS = 1 << 20  # weights per chunk of groups solved at a time: bounds the temporaries (4 MB each)
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
    if spec.clip != "none":
        raise InvalidSpecError(
            "HQQ fits its own grid: drop --clip mse (clip='none'); --zero-point integer starts from the clipped grid"
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


def group_rows(weight: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """W [out, in] as rows of a [out · n_groups, group_size] float32 matrix (a partial last group padded with 0),
    and the mask of real (non-padding) entries."""
    n_out, n_in = weight.shape
    gs = spec.group_size if spec.granularity == "group" else n_in
    n_groups = math.ceil(n_in / gs)
    pad = n_groups * gs - n_in
    w = torch.nn.functional.pad(weight.detach().float(), (0, pad))
    mask = torch.ones(n_out, n_groups * gs, dtype=torch.bool, device=weight.device)
    mask[:, n_in:] = False
    return w.reshape(n_out * n_groups, gs), mask.reshape(n_out * n_groups, gs)


def _per_group(t: Tensor, n_out: int) -> Tensor:
    """[out · n_groups] (or [out · n_groups, 1]) -> [out, n_groups]."""
    return t.reshape(n_out, -1)


def _columns(units: Tensor, n_out: int, n_in: int) -> Tensor:
    """[out · n_groups, group_size] -> [out, in], dropping the padding."""
    return units.reshape(n_out, -1)[:, :n_in]


def _fit(m: Tensor | None, count: Tensor, q: Tensor, target: Tensor, t_mean: Tensor, s: Tensor, optimize_scale: bool):
    """The least-squares grid through (q, target) per group (``t_mean``: target's mean): z = mean(q) - t_mean / s
    for the fixed s, or with ``optimize_scale`` the line's slope as s too (kept where the line is degenerate: no
    codes spread, or a slope that is not positive). ``m``: the 0/1 mask of real entries (None: all are); ``q`` is
    overwritten."""
    q_mean = q.mean(1, keepdim=True) if m is None else (q * m).sum(1, keepdim=True) / count
    if optimize_scale:
        dq = q.sub_(q_mean) if m is None else q.sub_(q_mean).mul_(m)
        # Σ dq = 0, so Σ dq · (target - t_mean) = Σ dq · target
        slope = (torch.linalg.vecdot(dq, target, dim=1) / torch.linalg.vecdot(dq, dq, dim=1)).unsqueeze(1)
        s = torch.where(torch.isfinite(slope) & (slope > _F32_TINY), slope, s)
    return s, q_mean - t_mean / s


@torch.no_grad()
def hqq_solve(
    W: Tensor,
    mask: Tensor,
    s: Tensor,
    z: Tensor,
    maxq: int,
    *,
    iters: int = ITERS,
    lp_norm: float = LP_NORM,
    beta: float = BETA,
    kappa: float = KAPPA,
    optimize_scale: bool = OPTIMIZE_SCALE,
) -> tuple[Tensor, Tensor, int]:
    """The half-quadratic iterations on groups laid out as rows of ``W`` [groups, size] (``mask``: real entries),
    from the grids ``s``, ``z`` [groups, 1]; returns the (s, z) of each group's lowest mean |W - W_r| and the number
    of updates the longest-running group made. No guard, no storage rounding: ``hqq_quantize`` adds those.

    A group stops the first time its error does not decrease. Stopped groups are dropped from the work once they
    are a quarter of the rows still held (copying the rest out costs about one iteration), so later iterations
    touch fewer rows."""
    m = None if bool(mask.all()) else mask.float()  # no padding (the usual case): plain means
    count = mask.sum(1, keepdim=True).clamp_min(1).float()
    w_mean = W.sum(1, keepdim=True) / count  # the padding is 0
    best_err = torch.full_like(s, math.inf)
    best_s, best_z = s.clone(), z.clone()
    rows = torch.arange(W.shape[0], device=W.device)  # the rows held, and their slices of everything
    active = torch.ones(W.shape[0], dtype=torch.bool, device=W.device)  # which of them still run
    updates = 0
    for t in range(iters + 1):
        q = torch.div(W, s).add_(z).round_().clamp_(0, maxq)
        e = torch.addcmul(W, q - z, s, value=-1)  # W - W_r
        if m is not None:
            e.mul_(m)
        err = e.abs().sum(1, keepdim=True) / count
        active &= (err < best_err[rows]).squeeze(1)
        kept = rows[active]
        best_err[kept], best_s[kept], best_z[kept] = err[active], s[active], z[active]
        if t == iters or kept.numel() == 0:
            break
        if kept.numel() < 0.75 * rows.numel():
            rows = kept
            W, w_mean, count, q, e, s, z = (x[active] for x in (W, w_mean, count, q, e, s, z))
            m = None if m is None else m[active]
            active = active[active]
        W_e = shrink_lp(e, beta, lp_norm)
        if W_e is None:
            s, z = _fit(m, count, q, W, w_mean, s, optimize_scale)
        else:
            target = W - W_e
            s, z = _fit(m, count, q, target, target.sum(1, keepdim=True) / count, s, optimize_scale)
        beta *= kappa
        updates = t + 1
    return best_s, best_z, updates


def _sse(W: Tensor, m: Tensor | None, codes: Tensor, s: Tensor, z: Tensor) -> Tensor:
    """Each group's squared error ‖(codes - z) · s - W‖² over its real entries (``m``: their mask, None: all)."""
    d = (codes - z).mul_(s).sub_(W)  # rounded as the stored layer's weight is (no fused multiply-add)
    if m is not None:
        d.mul_(m)
    return torch.linalg.vecdot(d, d, dim=1).unsqueeze(1)


@torch.no_grad()
def hqq_quantize(
    weight: Tensor,
    spec: QuantSpec,
    *,
    iters: int = ITERS,
    lp_norm: float = LP_NORM,
    beta: float = BETA,
    kappa: float = KAPPA,
    optimize_scale: bool = OPTIMIZE_SCALE,
    integer_zero: bool = False,
    clipped_start: bool = False,
) -> HQQResult:
    """Quantize ``weight`` [out, in] on ``spec``'s grid (asymmetric, per channel or per group) with HQQ float zeros
    (``integer_zero``: the fitted zeros rounded to integers, stored as uint8), falling back to round-to-nearest on
    every group where that has the lower squared error. ``clipped_start``: start from the MSE-clipped RTN grid (and
    let it be a fallback too) instead of the min/max one."""
    _check(weight, spec)
    check_hqq_settings(iters, lp_norm, beta, kappa)
    n_out, n_in = weight.shape
    maxq = spec.maxq
    W, mask = group_rows(weight, spec)
    m = None if bool(mask.all()) else mask.float()

    # RTN: quantlm's grid (range containing 0, integer zero), and with ``clipped_start`` the MSE-clipped one too;
    # the search starts from the last, its zero an integer as the library's round_zero start at 4 bits
    rtn_grids = [tuple(t.reshape(-1, 1) for t in compute_qparams(weight.detach().float(), spec))]
    if clipped_start:
        clipped = dataclasses.replace(spec, clip="mse")
        rtn_grids.append(tuple(t.reshape(-1, 1) for t in compute_qparams(weight.detach().float(), clipped)))
    s0, z0 = rtn_grids[-1]
    if not optimize_scale:  # the scale never changes: use the stored one throughout
        s0 = s0.to(storage_scale_dtype(s0)).float()
    # the groups in chunks whose temporaries stay in the cache (each group is solved on its own anyway)
    chunk = max(1, SOLVE_CHUNK_ELEMENTS // W.shape[1])
    s, z, updates = torch.empty_like(s0), torch.empty_like(z0), 0
    for start in range(0, W.shape[0], chunk):
        sl = slice(start, start + chunk)
        s[sl], z[sl], n = hqq_solve(
            W[sl],
            mask[sl],
            s0[sl],
            z0[sl],
            maxq,
            iters=iters,
            lp_norm=lp_norm,
            beta=beta,
            kappa=kappa,
            optimize_scale=optimize_scale,
        )
        updates = max(updates, n)

    # round every candidate's grid to the storage dtypes, then codes, then keep the best per group (squared error)
    scale_dtype = storage_scale_dtype(torch.cat([s, *(g[0] for g in rtn_grids)]))
    if integer_zero:
        z = torch.round(z).clamp_(0, maxq)
    zero_dtype = torch.uint8 if integer_zero else storage_zero_dtype(z, spec.bits)
    s_h, z_h = s.to(scale_dtype).float(), z.to(zero_dtype).float()
    codes = torch.clamp(torch.round(W / s_h + z_h), 0, maxq)
    scale, zero = s_h, z_h
    best = _sse(W, m, codes, s_h, z_h)
    use_rtn = torch.zeros_like(best, dtype=torch.bool)
    integer_spec = QuantSpec(bits=spec.bits)
    for grid_scale, grid_zero in rtn_grids:
        s_r = grid_scale.to(scale_dtype).float()
        codes_r = quantize(W, s_r, grid_zero, integer_spec).float()  # RTN's own codes on that grid, exactly
        sse = _sse(W, m, codes_r, s_r, grid_zero)
        better = sse < best
        if not bool(better.any()):
            continue
        best = torch.where(better, sse, best)
        use_rtn |= better
        codes = torch.where(better, codes_r, codes)
        scale = torch.where(better, s_r, scale)
        zero = torch.where(better, grid_zero, zero)

    denom = float(torch.linalg.vecdot(W.reshape(-1), W.reshape(-1)))  # ‖W‖², the padding is 0
    return HQQResult(
        codes=_columns(codes, n_out, n_in).to(torch.uint8).contiguous(),
        scale=_per_group(scale, n_out).to(scale_dtype),
        zero=_per_group(zero, n_out).to(zero_dtype),
        error=math.sqrt(float(best.sum()) / denom) if denom > 0 else 0.0,
        rtn_groups=_per_group(use_rtn, n_out),
        iterations=updates,
        group_size=W.shape[1],
    )


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
        targets = {n: m for n, m in ctx.linears().items() if not is_excluded(n, self.exclude)}
        return [self._quantize(ctx.model, name, module) for name, module in targets.items()]

    def _quantize(self, root, name: str, module) -> LayerRecord:
        t0 = time.perf_counter()
        weight = linear_weight(module).detach()
        result = hqq_quantize(
            weight,
            self.spec,
            iters=self.iters,
            lp_norm=self.lp_norm,
            beta=self.beta,
            kappa=self.kappa,
            optimize_scale=self.optimize_scale or self.integer_zero,
            integer_zero=self.integer_zero,
            clipped_start=self.integer_zero,
        )
        qlinear = QuantLinear.from_codes(
            result.codes,
            result.scale,
            result.zero,
            self.spec,
            getattr(module, "bias", None),
            zero_dtype=result.zero_dtype,
        )
        error = result.error  # of exactly the stored layer (its grid was rounded to the storage dtypes first)
        swap_in(root, name, qlinear, module)
        return LayerRecord(
            module=name,
            method=self.name,
            seconds=time.perf_counter() - t0,
            error=error,
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
