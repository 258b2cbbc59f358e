"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Quantize the columns of W one at a time; after each column, spread its rounding error over the columns not yet
quantized so that the layer's output on the calibration inputs X changes least. With H = 2/n XᵀX and U the upper
Cholesky factor of H⁻¹, column i's error e = (w_i - q_i) / U_ii updates the rest by W[:, j] -= e · U_ij (j > i),
which is the Optimal Brain Surgeon update in Cholesky form (paper, Section 4, "Step 3: Cholesky Reformulation").
Updates to later columns are applied lazily, one block of ``block_size`` columns at a time (Step 2).

Conventions follow the reference implementation (IST-DASLab/gptq) so results and checkpoints interchange:
dead inputs (zero Hessian diagonal) get diagonal 1 and a zero weight column; the damping is ``damp`` times the mean
of diag(H); a group's grid is computed from the weights as they stood at the start of the current lazy block;
act-order processes columns by descending diag(H) and records each column's group in ``g_idx``; static groups
fix every group's grid from the original weight before any column is permuted or updated. On a super-block grid
(``spec.scale_bits``, llama.cpp's K-quants) the grids of a super-block's groups are made together, when its first
column is reached (or from the original weight, with static groups), since their scales share one factor.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from quantlm.core import QuantSpec, compute_qparams, dequantize, quantize
from quantlm.core.activation import static_int8_scale
from quantlm.core.spec import SUPER_BLOCK
from quantlm.errors import InvalidSpecError, QuantlmError
from quantlm.methods.base import Method, register, setting
from quantlm.methods.common import (
    act_bits_setting,
    act_granularity_setting,
    check_activation_settings,
    exclude_setting,
    is_excluded,
    relative_weight_error,
    swap_in,
)
from quantlm.models.blocks import linear_weight
from quantlm.nn.qlinear import QuantLinear, storage_scale_dtype
from quantlm.pipeline.runner import BlockContext, LayerRecord

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6
# Default weight of each sequence's first token (the attention sink) in the Hessians; docs/gptq.md has the sweep.
SINK_WEIGHT = 100.0


@dataclass
class GPTQResult:
    codes: Tensor  # uint8 [out, in], original column order
    scale: Tensor  # float32 [out, n_groups]
    zero: Tensor  # float32 [out, n_groups], integers
    g_idx: Tensor  # int32 [in]: the group of each original input column
    dequantized: Tensor  # float32 [out, in], the weight on the grid, original column order
    loss: float  # the reference's loss: sum over columns of (w - q)² / U_ii², halved
    damp: float  # the damping fraction that made H positive definite (>= the one asked for)
    perm: Tensor | None  # the column order used with act_order


def _row_spec(spec: QuantSpec) -> QuantSpec:
    """The same grid with one scale per row: how one group's columns get their scale and zero, and are rounded
    once they have them (a super-block grid's group is rounded on its scale and zero like any other)."""
    return dataclasses.replace(spec, group_size=-1, granularity="channel", scale_bits=None)


def inverse_hessian_cholesky(hessian: Tensor, damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H); raises damp tenfold until it works."""
    mean_diag = torch.diag(hessian).mean().item()
    for _ in range(MAX_DAMP_RETRIES):
        h = hessian.clone()
        h.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(h)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0 and bool(torch.isfinite(upper).all()):
                return upper, damp
        log.warning("GPTQ: Hessian not positive definite with damp=%g, retrying with %g", damp, damp * 10)
        damp *= 10
    raise QuantlmError(
        f"GPTQ: the Hessian stayed singular up to damp={damp / 10:g}: the calibration inputs are degenerate "
        "(use more or different calibration text)"
    )


def _check_inputs(weight: Tensor, hessian: Tensor, spec: QuantSpec, block_size: int, damp: float) -> None:
    if weight.dim() != 2:
        raise InvalidSpecError(f"GPTQ needs a 2-D weight [out, in], got shape {list(weight.shape)}")
    n_in = weight.shape[1]
    if hessian.shape != (n_in, n_in):
        raise InvalidSpecError(f"GPTQ needs a [{n_in}, {n_in}] Hessian for this weight, got {list(hessian.shape)}")
    if spec.granularity not in ("channel", "group"):
        raise InvalidSpecError(f"GPTQ quantizes weights per channel or per group, not per {spec.granularity}")
    if block_size < 1:
        raise InvalidSpecError(f"block_size must be at least 1, got {block_size}")
    if not damp > 0:
        raise InvalidSpecError(f"damp must be positive (e.g. 0.01), got {damp}")
    if not bool(torch.isfinite(hessian).all()) or not bool(torch.isfinite(weight).all()):
        raise QuantlmError("GPTQ: the weight or the Hessian has NaN or inf values")


@torch.no_grad()
def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    scale_dtype: torch.dtype | None = None,
    hessian_clip: bool = False,
) -> GPTQResult:
    """Quantize ``weight`` [out, in] given the Hessian ``hessian`` [in, in] (= 2/n XᵀX) of its inputs.

    ``scale_dtype`` (e.g. torch.float16): round every grid's scale to the dtype it will be stored in before it is
    used, so the error GPTQ compensates is the error of the stored model. None keeps float32 scales.
    ``hessian_clip`` (with ``spec.clip == "mse"``): the grid search weighs each column's rounding error by its
    Hessian diagonal, the diagonal part of the output error ``(w - q)ᵀ H (w - q)``, instead of counting every
    column alike as the reference does.
    """
    _check_inputs(weight, hessian, spec, block_size, damp)
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    n_out, n_in = W.shape
    row_spec = _row_spec(spec)
    grouped = spec.granularity == "group"
    group_size = spec.group_size if grouped else n_in
    n_groups = math.ceil(n_in / group_size)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scale = torch.zeros(n_out, n_groups, device=W.device)
    zero = torch.zeros(n_out, n_groups, device=W.device)

    # columns whose grids are made together: a group, or a super-block of groups whose scales share a factor
    unit, unit_spec = (SUPER_BLOCK, spec) if spec.scale_bits is not None else (group_size, row_spec)

    def set_grids(first: int) -> None:
        """The grids of the unit of columns of W (in its current order) that starts at column ``first``."""
        columns = W[:, first : first + unit]
        weights = torch.diag(H)[first : first + unit] if hessian_clip else None
        s, z = compute_qparams(columns, unit_spec, column_weights=weights)
        if scale_dtype is not None:
            s = s.to(scale_dtype).to(torch.float32)
        g = first // group_size
        scale[:, g : g + s.shape[1]], zero[:, g : g + s.shape[1]] = s, z

    fixed_grids = not grouped or static_groups
    if fixed_grids:  # every grid from the original (dead-zeroed) weight, before any permutation or update
        for first in range(0, n_in, unit):
            set_grids(first)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
    # the group of each column in processing order
    original_column = perm if perm is not None else torch.arange(n_in, device=W.device)
    if fixed_grids:
        group_of = (original_column // group_size).tolist()
    else:
        group_of = [j // group_size for j in range(n_in)]

    U, damp_used = inverse_hessian_cholesky(H, damp)
    codes = torch.zeros(n_out, n_in, dtype=torch.uint8, device=W.device)
    Q = torch.zeros_like(W)
    losses = torch.zeros(n_out, device=W.device)

    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = group_of[col]
            if not fixed_grids and col % unit == 0:
                # the reference reads the group from W, which holds this lazy block's start state
                set_grids(col)
            s, z = scale[:, g : g + 1], zero[:, g : g + 1]
            w = W1[:, i : i + 1]
            c = quantize(w, s, z, row_spec)
            q = dequantize(c, s, z, row_spec)
            codes[:, col : col + 1] = c
            Q[:, col : col + 1] = q
            d = U1[i, i]
            losses += ((w - q).squeeze(1) / d) ** 2 / 2
            err = (w - q) / d
            W1[:, i:] -= err * U1[i : i + 1, i:]
            E1[:, i : i + 1] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        Q = Q[:, inverse]
        g_idx = torch.empty(n_in, dtype=torch.int32, device=W.device)
        g_idx[perm] = torch.tensor(group_of, dtype=torch.int32, device=W.device)
    else:
        g_idx = torch.tensor(group_of, dtype=torch.int32, device=W.device)
    return GPTQResult(
        codes=codes.contiguous(),
        scale=scale,
        zero=zero,
        g_idx=g_idx,
        dequantized=Q.contiguous(),
        loss=losses.sum().item(),
        damp=damp_used,
        perm=perm,
    )


class HessianAccumulator:
    """H = 2/n Σ w x xᵀ over every input row (token) seen, accumulated in float32.

    Every token has weight w = 1 except, with ``first_token_weight``, the first token of each sequence (inputs
    shaped [batch, seq, features]): that is the attention-sink position, whose keys and values every later token
    attends to, so its output error matters far more than one token's share (docs/gptq.md has the measurements).
    n counts tokens, unweighted.

    On the CPU the sum is a BLAS symmetric rank-k update (half the work of a matmul; only the upper triangle is
    accumulated and mirrored at the end); elsewhere a plain matmul. The CPU path needs OpenBLAS's threads to sleep
    soon after each call (``quantlm.blas_threads``), and falls back to torch's matmul where that came too late.
    """

    def __init__(self, n_features: int, device: torch.device, first_token_weight: float = 1.0) -> None:
        self.device = torch.device(device)
        self.first_token_weight = first_token_weight
        self.tokens = 0
        self._syrk = _cpu_syrk() if self.device.type == "cpu" else None
        if self._syrk is not None:
            import numpy as np

            self._upper = np.zeros((n_features, n_features), dtype=np.float32, order="F")
        else:
            self.sum = torch.zeros(n_features, n_features, dtype=torch.float32, device=self.device)

    def add(self, x: Tensor) -> None:
        x = x.detach()
        if self.first_token_weight != 1.0 and x.dim() == 3:
            x = x.to(torch.float32, copy=True)
            x[:, 0] *= self.first_token_weight**0.5
        rows = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if self._syrk is not None:
            # rows.T is a Fortran-ordered [features, tokens] view: syrk computes rowsᵀ·rows without a copy
            self._upper = self._syrk(
                1.0, rows.contiguous().numpy().T, beta=1.0, c=self._upper, trans=0, lower=0, overwrite_c=1
            )
        else:
            self.sum.addmm_(rows.T, rows)
        self.tokens += rows.shape[0]

    def hessian(self) -> Tensor:
        if self._syrk is not None:
            upper = torch.from_numpy(self._upper).triu()
            total = upper + upper.triu(1).T
        else:
            total = self.sum
        return total * (2.0 / max(self.tokens, 1))


def _cpu_syrk():
    from quantlm.blas_threads import syrk_would_spin

    if syrk_would_spin():  # OpenBLAS's workers would busy-wait on torch's cores after every call
        return None
    try:
        from scipy.linalg.blas import ssyrk
    except ImportError:  # scipy is a dependency; this keeps the CPU path working without it
        return None
    return ssyrk


@register
@dataclass(frozen=True)
class GPTQ(Method):
    """GPTQ as a pipeline step: Hessians of each Linear's inputs on the calibration batch, then the solver.

    The defaults process columns in act-order with static groups: every group's grid is fixed from the original
    weight, so ``g_idx`` stays the plain layout (column // group size) and the checkpoint runs on every GPTQ kernel
    without reordering, while the columns with the largest Hessian diagonal are still quantized first.

    With ``true_sequential`` (default) the Linears of a block are quantized in the order the block runs them, one
    group of Linears sharing an input at a time (q,k,v -> o -> gate,up -> down for Llama), and each group's
    inputs are recomputed with the groups before it already quantized. Linears that share an input share one
    Hessian.
    """

    spec: QuantSpec = QuantSpec(bits=4, group_size=64)
    block_size: int = setting(128, "Columns per lazy update block.")
    damp: float = setting(0.01, "Damping, a fraction of the mean Hessian diagonal.")
    # defaults measured in docs/gptq.md: act-order with static groups beats plain order
    act_order: bool = setting(True, "Columns by descending Hessian diagonal.", flag="--act-order/--no-act-order")
    static_groups: bool = setting(
        True,
        "Group grids fixed from the original weight (with --act-order the checkpoint keeps the plain group layout, "
        "so no runtime reorders columns).",
        flag="--static-groups/--no-static-groups",
    )
    true_sequential: bool = setting(
        True,
        "Recompute each group's inputs after the groups before it are quantized.",
        flag="--true-sequential/--no-true-sequential",
    )
    sink_weight: float = setting(
        SINK_WEIGHT, "Weight of each window's first token (the attention sink) in the Hessians; 1 = plain GPTQ."
    )
    hessian_clip: bool = setting(
        False, "With --clip mse: the clip search weighs each column's rounding error by its Hessian diagonal."
    )
    exclude: tuple[str, ...] = exclude_setting()
    act_bits: int | None = act_bits_setting()
    act_granularity: str = act_granularity_setting()

    name = "gptq"
    needs_calibration = True

    def __post_init__(self) -> None:
        if self.spec.granularity not in ("channel", "group"):
            raise InvalidSpecError(f"GPTQ quantizes weights per channel or per group, not per {self.spec.granularity}")
        if not self.damp > 0:
            raise InvalidSpecError(f"damp must be positive (e.g. 0.01), got {self.damp}")
        if not self.sink_weight >= 1:
            raise InvalidSpecError(f"sink_weight must be at least 1 (1 = plain GPTQ), got {self.sink_weight}")
        if self.hessian_clip and self.spec.clip != "mse":
            raise InvalidSpecError("hessian_clip weighs the MSE clip search: use it with clip='mse' (--clip mse)")
        check_activation_settings(self.act_bits, self.act_granularity, self.spec)

    def process_block(self, ctx: BlockContext) -> list[LayerRecord]:
        targets = {n: m for n, m in ctx.linears().items() if not is_excluded(n, self.exclude)}
        if not targets:
            return []
        groups = ctx.input_groups(targets)
        stages = [[g] for g in groups] if self.true_sequential else [groups]
        records = []
        for stage in stages:
            hessians, act_scales = self._collect(ctx, {g[0]: targets[g[0]] for g in stage})
            for group in stage:
                for name in group:
                    records.append(
                        self._quantize(ctx.model, name, targets[name], hessians[group[0]], act_scales.get(group[0]))
                    )
                ctx.mark_final(group)
        return records

    def _collect(self, ctx: BlockContext, firsts: dict) -> tuple[dict[str, HessianAccumulator], dict[str, Tensor]]:
        """The Hessian of each input and, for static per-tensor activations, its int8 scale (from max|x|)."""
        accumulators = {
            n: HessianAccumulator(linear_weight(m).shape[1], linear_weight(m).device, self.sink_weight)
            for n, m in firsts.items()
        }
        absmax = dict.fromkeys(firsts, 0.0)

        def on_input(name, x):
            accumulators[name].add(x)
            if self.act_granularity == "tensor":
                absmax[name] = max(absmax[name], float(x.detach().abs().max()))

        ctx.observe(firsts, on_input)
        scales = {n: static_int8_scale(a) for n, a in absmax.items()} if self.act_granularity == "tensor" else {}
        return accumulators, scales

    def solve(self, weight: Tensor, hessian: Tensor, scale_dtype: torch.dtype | None = None) -> GPTQResult:
        """``gptq_quantize`` of ``weight`` with this step's settings."""
        return gptq_quantize(
            weight,
            hessian,
            self.spec,
            block_size=self.block_size,
            damp=self.damp,
            act_order=self.act_order,
            static_groups=self.static_groups,
            scale_dtype=scale_dtype,
            hessian_clip=self.hessian_clip,
        )

    def _quantize(
        self, root, name: str, module, acc: HessianAccumulator, act_scale: Tensor | None = None
    ) -> LayerRecord:
        t0 = time.perf_counter()
        weight = linear_weight(module).detach()
        scale_dtype = storage_scale_dtype(compute_qparams(weight, self.spec)[0], self.spec)
        result = self.solve(weight, acc.hessian(), scale_dtype)
        qlinear = QuantLinear.from_codes(
            result.codes,
            result.scale.to(scale_dtype),
            result.zero,
            self.spec,
            getattr(module, "bias", None),
            result.g_idx,
            act_bits=self.act_bits,
            act_scale=act_scale,
        )
        swap_in(root, name, qlinear, module)
        if result.damp != self.damp:
            log.warning("%s: GPTQ needed damp=%g", name, result.damp)
        return LayerRecord(
            module=name,
            method=self.name,
            seconds=time.perf_counter() - t0,
            error=relative_weight_error(weight, result.dequantized),
            details={
                "shape": list(weight.shape),
                "spec": self.spec.describe(),
                "loss": result.loss,
                "damp": result.damp,
                "damp_raised": result.damp != self.damp,
                "hessian_tokens": acc.tokens,
            },
        )
