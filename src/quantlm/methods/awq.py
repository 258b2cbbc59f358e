"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

A few input channels of each Linear carry much larger activations than the rest, and the weights in those columns
matter most to the output. Scaling such a column up by s_j before rounding (and its input down by s_j, folded into
the module that produces the input) shrinks its relative rounding error; the other weights of its group then share
a slightly coarser grid. Per group of Linears sharing an input (the same groups and exact folds as SmoothQuant:
norm -> q/k/v, norm -> gate/up, v -> o, up -> down; ``quantlm.models.smoothing``):

    s = mean|X|^α, clamped at 1e-4 and divided by sqrt(max(s) · min(s))     (per input channel j)
    loss(α) = ‖ M(X; W_q) − M(X; W) ‖²,   W_q = Q(W · s) / s                (Q: RTN on the step's grid)

α is searched on ``n_grid`` points of [0, 1) (α = 0 is s = 1, plain RTN, so the search never does worse than RTN
on its own objective). M, the module whose output is measured, is the smallest module of the block that holds all
the group's Linears when the producer is a norm (the attention for q/k/v, the MLP for gate/up), run on its own
captured inputs; for the linear-to-linear folds (v -> o, up -> down) and where the Linears sit directly in the
block (OPT's fc1) it is the group's Linears themselves. Only the group's Linears are rounded while M runs.

Then the weight clipping search (the paper's reference code, ``auto_clip``): for every Linear but the query and key
projections (their outputs go through the softmax; fused q/k/v Linears are skipped too), per output row and group,
max|w| is shrunk by the ratios 1, 0.95, ..., 0.5; the weight clamped to ±max is rounded on the grid and the error
of that group's share of the output, on ``clip_tokens`` sampled calibration tokens, measured; the best ratio per
(row, group) clamps the float weight (ratio 1 first, a ratio only replaces it when strictly better).

The step leaves float weights; the next recipe step (RTN by default, or GPTQ) quantizes them on the same grid, which
the recipe checks. Before GPTQ (``search_rounding`` and ``auto_clip`` left to the step after AWQ) two things change,
both beyond the paper. The candidates are rounded the way the next step will round: GPTQ(W · s) / s, GPTQ on the
problem the scales make (weight W·s, inputs X/s, Hessian H / (s sᵀ) from the searched windows), so α = 0 is plain
GPTQ and the search never does worse than GPTQ on its objective. And there is no clipping search: clamping weights to
RTN's best range takes away what GPTQ's error compensation and its own MSE clip would use. Measured on the first 6
blocks of SmolLM2-135M (16 x 2048 calibration tokens, relative squared error of block 6's output on 4 x 2048 eval
tokens): GPTQ with the Hessian-weighted MSE clip alone 0.01088; AWQ as the paper (RTN-rounded search, clipping),
then that GPTQ 0.01142; without the clipping 0.01016; GPTQ-rounded search without clipping 0.00969. (With GPTQ
rounding, candidates past ``CANDIDATE_CACHE_BYTES`` are solved again on every searched mini-batch: by default one.)

Also beyond the paper: channels never active in calibration keep s = 1 (the reference would give them 1e-4 and
fold 1e4 into the producer); the scale search can be limited to the first ``search_windows``
calibration windows (the search runs M n_grid + 1 times per mini-batch and group); every block is run before and
after the folds, and a change beyond float rounding is an error, as in SmoothQuant.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantlm.core import QuantSpec, compute_qparams, dequantize, expand_to_columns, quantize
from quantlm.errors import InvalidSpecError, QuantlmError
from quantlm.methods.base import Method, register, setting
from quantlm.methods.common import exclude_setting, is_excluded
from quantlm.methods.gptq import GPTQ, HessianAccumulator
from quantlm.methods.smoothquant import check_folds
from quantlm.models.blocks import linear_weight
from quantlm.models.smoothing import FOLD_KINDS, SmoothGroup, apply_fold, fold_channel_map, fold_groups, parse_folds
from quantlm.pipeline.runner import BlockContext, LayerRecord
from quantlm.pipeline.stats import collect_input_stats

DEFAULT_SPEC = QuantSpec(bits=4, group_size=64)
MIN_SCALE = 1e-4
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5
CLIP_RATIOS = tuple(1 - i / CLIP_GRID for i in range(round(CLIP_MAX_SHRINK * CLIP_GRID) + 1))  # 1, 0.95, ..., 0.5
# Linears AWQ does not clip (by the last part of their name): queries and keys, alone or fused with the values
NO_CLIP = ("q_proj", "k_proj", "query", "key", "qkv_proj", "query_key_value", "c_attn", "Wqkv")
_CLIP_CHUNK = 1 << 22  # elements of the partial outputs one chunk of rows of the clip search holds
# bytes of candidate weights (Q(W·s)/s for every α) a block's scale search keeps instead of rounding them again on
# every mini-batch; groups past it round their candidates anew each time (the same numbers, more time)
CANDIDATE_CACHE_BYTES = 1 << 30
SEARCH_ROUNDINGS = ("auto", "rtn", "gptq")


def awq_scales(x_mean: Tensor, alpha: float) -> Tensor:
    """s = x_mean^α clamped at ``MIN_SCALE`` and divided by sqrt(max(s) · min(s)) (float32); channels with
    x_mean = 0 (never active in calibration) keep s = 1."""
    x_mean = x_mean.float()
    live = x_mean > 0
    s = torch.ones_like(x_mean)
    if bool(live.any()):
        v = x_mean[live].pow(alpha).clamp(min=MIN_SCALE)
        s[live] = v / (v.max() * v.min()).sqrt()
    return s


def on_grid(weight: Tensor, spec: QuantSpec) -> Tensor:
    """``weight`` [out, in] rounded to its round-to-nearest grid on ``spec`` and back (float32)."""
    scale, zero = compute_qparams(weight, spec)
    return dequantize(quantize(weight, scale, zero, spec), scale, zero, spec)


def scaled_on_grid(weight: Tensor, s: Tensor, spec: QuantSpec) -> Tensor:
    """Q(W · s) / s: the weight AWQ's scales ``s`` (one per input column) give, seen from the unscaled input."""
    return on_grid(weight.float() * s, spec) / s


def scaled_gptq(weight: Tensor, s: Tensor, hessian: Tensor, solver: GPTQ) -> Tensor:
    """GPTQ(W · s) / s: ``solver`` on the problem AWQ's scales make, the weight W·s on the inputs X/s (so the
    Hessian H / (s sᵀ) of ``hessian`` = H of X), seen from the unscaled input (float32)."""
    s = s.to(weight.device).float()
    scaled_hessian = hessian.to(weight.device).float() / torch.outer(s, s)
    return solver.solve(weight.float() * s, scaled_hessian).dequantized / s


@dataclass
class ClipResult:
    max_val: Tensor  # [out, n_groups]: the clamp of each (row, group)
    ratio: Tensor  # [out, n_groups]: max_val / the original max|w|
    error: Tensor  # [out, n_groups]: mean over tokens of the squared error of the group's share of the output
    error_unclipped: Tensor  # the same at ratio 1


def _group_layout(spec: QuantSpec, n_in: int) -> tuple[int, int]:
    """(groups per row, columns per group) of ``spec`` for a weight with ``n_in`` columns."""
    if spec.granularity == "group":
        return spec.n_groups(n_in), spec.group_size
    return 1, n_in


@torch.no_grad()
def clip_search(weight: Tensor, x: Tensor, spec: QuantSpec, ratios=CLIP_RATIOS) -> ClipResult:
    """AWQ's clipping search for ``weight`` [out, in] on input rows ``x`` [n, in]: for each (row, group) of
    ``spec``'s grid the ratio of ``ratios`` (the first must be 1) whose clamped, rounded weight gives the group's
    share of the output the least mean squared error on ``x``. Rows are processed in chunks to bound memory."""
    if not ratios or ratios[0] != 1:
        raise ValueError("the clip ratios must start at 1 (no clipping)")
    w = weight.detach().float()
    x = x.detach().float().to(w.device)
    n_out, n_in = w.shape
    n_groups, size = _group_layout(spec, n_in)
    pad = n_groups * size - n_in  # a partial last group: zero columns change neither the grid nor the output
    wp = nn.functional.pad(w, (0, pad)).reshape(n_out, n_groups, size)
    xp = nn.functional.pad(x, (0, pad)).reshape(-1, n_groups, size)
    original_max = wp.abs().amax(dim=2)  # [out, groups]
    best_ratio = torch.ones_like(original_max)
    best_error = torch.empty_like(original_max)
    first_error = torch.empty_like(original_max)
    chunk = max(1, _CLIP_CHUNK // max(xp.shape[0] * n_groups, 1))
    for start in range(0, n_out, chunk):
        rows = slice(start, start + chunk)
        w_rows, max_rows = wp[rows], original_max[rows].unsqueeze(2)
        best = None
        for ratio in ratios:
            limit = max_rows * ratio
            clamped = torch.maximum(torch.minimum(w_rows, limit), -limit)
            rounded = on_grid(clamped.reshape(clamped.shape[0], -1), spec).reshape(clamped.shape)
            share = torch.einsum("rgk,ngk->rng", rounded - w_rows, xp)  # each group's share of the output error
            error = share.pow(2).mean(dim=1)  # [rows, groups]
            if best is None:
                best = error
                first_error[rows] = error
                continue
            better = error < best
            best = torch.where(better, error, best)
            best_ratio[rows] = torch.where(better, torch.full_like(error, ratio), best_ratio[rows])
        best_error[rows] = best
    return ClipResult(original_max * best_ratio, best_ratio, best_error, first_error)


def clamp_weight(weight: Tensor, max_val: Tensor, spec: QuantSpec) -> Tensor:
    """``weight`` [out, in] clamped to ±``max_val`` of its (row, group) (``max_val``: [out, groups] of ``spec``)."""
    limit = expand_to_columns(max_val, spec, weight.shape[1]).to(weight.device)
    return torch.maximum(torch.minimum(weight.float(), limit), -limit)


def loss_module_name(group: SmoothGroup) -> str | None:
    """The module whose output AWQ's scale search measures for ``group`` (names relative to the block): for a norm
    group the deepest module that holds all its Linears (``self_attn`` for q/k/v, ``mlp`` for gate/up); None for
    linear-to-linear folds and Linears sitting directly in the block (the group's own outputs are measured)."""
    if group.kind != "norm":
        return None
    common: list[str] = []
    for parts in zip(*(t.split(".")[:-1] for t in group.targets)):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common) or None


@dataclass
class _Search:
    """The scale search of one group: its candidate scales and the output error each gives."""

    group: SmoothGroup
    loss: str | None  # loss_module_name
    rounded: list[str]  # the targets rounded in the candidates (the rest are excluded: they stay in float)
    originals: dict[str, Tensor]  # the targets' weights, float32
    scales: list[tuple[Tensor, Tensor]]  # per α: (s on the producer's channels, s on the targets' columns)
    errors: list[float]
    reference: float = 0.0
    calls: int = 0  # mini-batches searched on
    best: int = 0  # the index of the chosen α
    candidates: dict[tuple[int, str], Tensor] | None = None  # (α index, target) -> Q(W·s)/s; None: not kept
    hessian: Tensor | None = None  # of the targets' input on the searched mini-batches, for GPTQ rounding


@register
@dataclass(frozen=True)
class AWQ(Method):
    """AWQ as a pipeline step: per block, an activation-aware scale per input channel of each foldable group of
    Linears (searched on ``n_grid`` exponents, folded exactly), then a search of per-(row, group) weight clipping.
    Weights stay in floating point; the recipe's next step (RTN, or GPTQ) quantizes them on ``spec``, the grid the
    searches rounded on.

    ``auto_clip``: the clipping search (the reference's ``auto_clip``), on ``clip_tokens`` input rows sampled (with
    ``seed``) per Linear. ``search_windows``: the scale search runs on the first calibration windows only (whole
    mini-batches; 4 by default), None: all. ``folds``: which producers scales are folded into (``FOLD_KINDS``);
    ``exclude``: Linears kept in float (not rounded by the searches, not clipped)."""

    spec: QuantSpec = DEFAULT_SPEC
    n_grid: int = setting(20, "Exponents the AWQ scale search tries (alpha = i / n_grid).", flag="--awq-grid")
    # not named ``clip``: that is the grid's own setting (QuantSpec.clip, --clip), written beside these ones
    auto_clip: bool | None = setting(
        None,
        "AWQ's search of weight clipping after the scales (default: on before rtn, off before gptq, whose own "
        "error compensation and --clip mse do better on unclipped weights).",
        flag="--awq-clip/--no-awq-clip",
    )
    clip_tokens: int = setting(512, "Calibration tokens per Linear in AWQ's clipping search.", flag="--awq-clip-tokens")
    search_windows: int | None = setting(
        4,
        "Calibration windows AWQ's scale search runs on (its cost: n_grid + 1 runs of each group's module on them; "
        "4 x 2048 tokens, an eighth of the paper's 128 x 512; null: all).",
        flag="--awq-search-windows",
    )
    folds: tuple[str, ...] = setting(
        FOLD_KINDS, "Where scales are folded, a comma list of norm, v-o, up-down.", flag="--smooth-folds"
    )
    search_rounding: str = setting(
        "auto",
        "How the scale search rounds each candidate: rtn (round-to-nearest, the paper), gptq (GPTQ's solver on the "
        "candidate's Hessian) or auto (as the step after AWQ rounds).",
        flag="--awq-search-rounding",
    )
    exclude: tuple[str, ...] = exclude_setting()
    seed: int = 0

    name = "awq"
    needs_calibration = True
    quantizes_weights = False
    # the command line's --method awq: the next step quantizes on AWQ's own default grid (the shared --bits,
    # --group-size and --sym/--asym then set both steps)
    next_step_defaults = {"bits": DEFAULT_SPEC.bits, "group_size": DEFAULT_SPEC.group_size, "symmetric": False}

    def __post_init__(self) -> None:
        if self.spec.granularity not in ("channel", "group"):
            raise InvalidSpecError(f"AWQ searches weights per channel or per group, not per {self.spec.granularity}")
        if isinstance(self.n_grid, bool) or not self.n_grid >= 1:
            raise InvalidSpecError(f"n_grid must be at least 1, got {self.n_grid}")
        if isinstance(self.clip_tokens, bool) or not self.clip_tokens >= 1:
            raise InvalidSpecError(f"clip_tokens must be at least 1, got {self.clip_tokens}")
        if self.search_windows is not None and not self.search_windows >= 1:
            raise InvalidSpecError(f"search_windows must be at least 1 (or null: all), got {self.search_windows}")
        object.__setattr__(self, "folds", parse_folds(self.folds))
        if self.search_rounding not in SEARCH_ROUNDINGS:
            raise InvalidSpecError(
                f"search_rounding must be one of {', '.join(SEARCH_ROUNDINGS)}, got {self.search_rounding!r}"
            )

    def followed_by(self, step) -> AWQ:
        """The settings left to the step after AWQ, resolved for it: before GPTQ the search rounds with that GPTQ's
        solver settings and there is no clipping search; before anything else (RTN), round-to-nearest and the
        clipping search. (The solver is kept beside the settings, not in them: a recipe read back resolves it again
        from its own GPTQ step.)"""
        gptq = isinstance(step, GPTQ)
        resolved = dataclasses.replace(
            self,
            search_rounding=("gptq" if gptq else "rtn") if self.search_rounding == "auto" else self.search_rounding,
            auto_clip=(not gptq) if self.auto_clip is None else self.auto_clip,
        )
        object.__setattr__(resolved, "_next_gptq", step if gptq else None)
        return resolved

    @classmethod
    def from_config(cls, config: dict) -> AWQ:
        """Recipes written before ``search_rounding`` existed searched with RTN: they read back as such."""
        if "auto_clip" in config and "search_rounding" not in config:
            config = {**config, "search_rounding": "rtn"}
        return super().from_config(config)

    @property
    def clips(self) -> bool:
        """Whether the clipping search runs (unresolved, with no step after AWQ: as the paper, yes)."""
        return self.auto_clip is not False

    @property
    def _search_solver(self) -> GPTQ | None:
        """The GPTQ solver the scale search rounds candidates with, or None: round-to-nearest. It has the settings
        of the GPTQ step after AWQ (the class's defaults without one) on the search grid, without the MSE clip."""
        if self.search_rounding != "gptq":
            return None
        following = getattr(self, "_next_gptq", None) or GPTQ()
        return dataclasses.replace(following, spec=self.search_spec, hessian_clip=False, act_bits=None, exclude=())

    def check_next_step(self, step) -> None:
        spec = getattr(step, "spec", None)
        if not isinstance(spec, QuantSpec):
            raise InvalidSpecError(
                f"awq needs a step after it that rounds on a weight grid (rtn, gptq), not {step.name}"
            )
        if getattr(step, "fits_own_grid", False):
            raise InvalidSpecError(
                f"{step.name} fits a grid of its own to the weights, not the one awq searched on: use --weights rtn "
                "or gptq after awq"
            )
        if dataclasses.replace(spec, clip="none") != self.search_spec:
            raise InvalidSpecError(
                f"awq searched on {self.search_spec.describe()} but {step.name} after it quantizes on "
                f"{spec.describe()}: give both steps the same bits, group_size, symmetric and codebook"
            )

    @property
    def search_spec(self) -> QuantSpec:
        """The grid the searches round on: the step's, without an MSE clip search (rounding on it is ~60x slower,
        and the searches run it thousands of times); the next step's ``--clip`` applies to the final rounding."""
        return dataclasses.replace(self.spec, clip="none")

    @property
    def alphas(self) -> tuple[float, ...]:
        return tuple(i / self.n_grid for i in range(self.n_grid))

    # -- the step -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def process_block(self, ctx: BlockContext) -> list[LayerRecord]:
        t0 = time.perf_counter()
        block = ctx.block
        modules = dict(block.named_modules())
        outputs: list[Tensor] = []
        groups = fold_groups(block, self.folds, lambda: outputs.append(ctx.probe()))
        groups = [g for g in groups if any(not self._excluded(ctx, t) for t in g.targets)]
        records = []
        if groups:
            reference = outputs[0] if outputs else ctx.probe()  # the block's output before any fold
            saved = {k: v.detach().clone() for k, v in block.state_dict().items()}
            searches = self._search(ctx, groups, modules)
            folds = [(s.group, *s.scales[s.best]) for s in searches]
            for fold in folds:
                apply_fold(*fold, modules)
            check_folds(ctx, reference, saved, folds, modules, method="AWQ", flag="--smooth-folds")
            seconds = (time.perf_counter() - t0) / len(groups)
            records += [self._group_record(ctx, s, seconds) for s in searches]
        if self.clips:
            records += self._clip(ctx)
        return records

    def _excluded(self, ctx: BlockContext, name: str) -> bool:
        return is_excluded(f"{ctx.name}.{name}", self.exclude)

    def _search(self, ctx: BlockContext, groups: list[SmoothGroup], modules: dict[str, nn.Module]) -> list[_Search]:
        """Every group's scale search on the block as it is: one pass for mean|x|, one for the losses (each group's
        loss module runs its candidates on each mini-batch when the block reaches it)."""
        limit = self._search_batches(ctx)
        means, hessians = self._input_stats(ctx, groups, modules, limit)
        config = getattr(ctx.model, "config", None)
        searches = []
        for group in groups:
            x_mean = means[group.targets[0]]
            head_map = fold_channel_map(group, modules, config, ctx.name)
            if head_map is not None:  # every query head that reads a KV head shares its scales
                head_map = head_map.to(x_mean.device)
                x_mean = torch.zeros(int(head_map.max()) + 1, device=x_mean.device).scatter_reduce(
                    0, head_map, x_mean, "mean", include_self=False
                )
            scales = []
            for alpha in self.alphas:
                s = awq_scales(x_mean, alpha)
                scales.append((s, s if head_map is None else s[head_map]))
            searches.append(
                _Search(
                    group=group,
                    loss=loss_module_name(group),
                    rounded=[t for t in group.targets if not self._excluded(ctx, t)],
                    originals={t: linear_weight(modules[t]).detach().float().clone() for t in group.targets},
                    scales=scales,
                    errors=[0.0] * len(scales),
                    hessian=hessians.get(group.targets[0]),
                )
            )
        budget = CANDIDATE_CACHE_BYTES
        for search in searches:
            size = len(search.scales) * sum(linear_weight(modules[t]).nbytes for t in search.rounded)
            if size <= budget:
                search.candidates, budget = {}, budget - size
        busy = False  # a loss module runs others' hooks' modules (o_proj inside the attention): those calls are ours

        def make_hook(search: _Search):
            def hook(module, args, kwargs):
                nonlocal busy
                if busy or search.calls >= limit:
                    return None
                search.calls += 1
                busy = True
                try:
                    self._evaluate(search, modules, module if search.loss else None, args, kwargs)
                finally:
                    busy = False
                return None

            return hook

        handles = [
            modules[s.loss or s.group.targets[0]].register_forward_pre_hook(make_hook(s), with_kwargs=True)
            for s in searches
        ]
        try:
            ctx.forward()
        finally:
            for h in handles:
                h.remove()
        for s in searches:
            s.candidates = None  # their memory is not needed past the search
            if not s.calls:
                raise QuantlmError(
                    f"AWQ: {ctx.name}.{s.loss or s.group.targets[0]} never ran on the calibration batch, so the "
                    f"scales of {s.group.describe(ctx.name)} cannot be searched; drop the '{s.group.kind}' fold "
                    "(--smooth-folds)"
                )
            s.best = min(range(len(s.errors)), key=s.errors.__getitem__)  # the first minimum: α = 0 on ties
        return searches

    def _input_stats(
        self, ctx: BlockContext, groups: list[SmoothGroup], modules: dict[str, nn.Module], limit: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """mean|x| per input channel of each group's input (by the group's first target, float32) on every
        mini-batch, and with GPTQ rounding the Hessian of that input on the first ``limit`` (the searched ones)."""
        firsts = {f"{ctx.name}.{g.targets[0]}": modules[g.targets[0]] for g in groups}
        sums: dict[str, Tensor] = {}
        counts = dict.fromkeys(firsts, 0)
        batches = dict.fromkeys(firsts, 0)
        solver = self._search_solver
        hessians = {
            n: HessianAccumulator(linear_weight(m).shape[1], linear_weight(m).device, solver.sink_weight)
            for n, m in (firsts.items() if solver is not None else ())
        }

        def on_input(name: str, x: Tensor) -> None:
            rows = x.detach().reshape(-1, x.shape[-1])
            total = rows.abs().sum(dim=0, dtype=torch.float32)
            sums[name] = total if name not in sums else sums[name] + total
            counts[name] += rows.shape[0]
            if name in hessians and batches[name] < limit:
                hessians[name].add(x)
            batches[name] += 1

        ctx.observe(firsts, on_input)
        prefix = f"{ctx.name}."
        means = {n.removeprefix(prefix): sums[n] / max(counts[n], 1) for n in firsts if n in sums}
        return means, {n.removeprefix(prefix): h.hessian() for n, h in hessians.items() if h.tokens}

    def _search_batches(self, ctx: BlockContext) -> int:
        """How many mini-batches the scale search runs on: all, or the fewest that hold ``search_windows``."""
        shapes = ctx.inputs.hidden.shapes
        if self.search_windows is None:
            return len(shapes)
        windows = 0
        for i, shape in enumerate(shapes):
            windows += shape[0]
            if windows >= self.search_windows:
                return i + 1
        return len(shapes)

    def _evaluate(self, search: _Search, modules: dict[str, nn.Module], loss_module, args, kwargs) -> None:
        """Run the group's loss module on one mini-batch's inputs (``args``, ``kwargs``) with the float weights and
        with each candidate, and add up the squared output errors."""

        def run() -> list[Tensor]:
            if loss_module is not None:
                out = loss_module.forward(*args, **kwargs)
                return [(out[0] if isinstance(out, (tuple, list)) else out).float()]
            x = args[0] if args else next(iter(kwargs.values()))
            return [modules[t].forward(x).float() for t in search.group.targets]

        reference = run()
        search.reference += sum(float(y.pow(2).sum()) for y in reference)
        try:
            for i in range(len(search.scales)):
                for t in search.rounded:
                    linear_weight(modules[t]).copy_(self._candidate(search, i, t, modules))
                search.errors[i] += sum(float((y - r).pow(2).sum()) for y, r in zip(run(), reference))
        finally:
            for t in search.rounded:  # exactly the weights as they were (float32 holds every half-precision value)
                linear_weight(modules[t]).copy_(search.originals[t])

    def _candidate(self, search: _Search, i: int, target: str, modules: dict[str, nn.Module]) -> Tensor:
        """Q(W·s)/s of ``target`` for the i-th α, in the weight's dtype (kept for the next mini-batch if there is
        room)."""
        cached = None if search.candidates is None else search.candidates.get((i, target))
        if cached is not None:
            return cached
        weight = search.originals[target]
        s = search.scales[i][1].to(weight.device)
        solver = self._search_solver
        if solver is None or search.hessian is None:
            candidate = scaled_on_grid(weight, s, self.search_spec)
        else:
            candidate = scaled_gptq(weight, s, search.hessian, solver)
        candidate = candidate.to(linear_weight(modules[target]).dtype)
        if search.candidates is not None:
            search.candidates[(i, target)] = candidate
        return candidate

    def _group_record(self, ctx: BlockContext, search: _Search, seconds: float) -> LayerRecord:
        best = search.best

        def relative(error: float) -> float:
            return math.sqrt(error / search.reference) if search.reference > 0 else 0.0

        s_producer = search.scales[best][0]
        return LayerRecord(
            module=f"{ctx.name}.{search.group.producer}",
            method=self.name,
            seconds=seconds,
            error=relative(search.errors[best]),
            details={
                "kind": search.group.kind,
                "targets": [f"{ctx.name}.{t}" for t in search.group.targets],
                "loss_module": f"{ctx.name}.{search.loss}" if search.loss else "targets",
                "alpha": self.alphas[best],
                "error_unscaled": relative(search.errors[0]),  # α = 0: the rounding alone
                "search": {f"{a:g}": relative(e) for a, e in zip(self.alphas, search.errors)},
                "scale_min": float(s_producer.min()),
                "scale_max": float(s_producer.max()),
                "windows": sum(shape[0] for shape in ctx.inputs.hidden.shapes[: search.calls]),
            },
        )

    def _clip(self, ctx: BlockContext) -> list[LayerRecord]:
        """The clipping search of every Linear but the query/key ones, on inputs sampled from the (scaled) block."""
        targets = {
            n: m
            for n, m in ctx.linears().items()
            if not is_excluded(n, self.exclude) and n.rsplit(".", 1)[-1] not in NO_CLIP
        }
        if not targets:
            return []
        stats = collect_input_stats(ctx, targets, sample_rows=self.clip_tokens, seed=self.seed)
        records = []
        for name, module in targets.items():
            t0 = time.perf_counter()
            weight = linear_weight(module)
            original = weight.detach().float().clone()  # the weight itself is clamped below
            x = stats[name].rows().to(original.device)
            result = clip_search(original, x, self.search_spec)
            clipped = clamp_weight(original, result.max_val, self.search_spec)
            weight.copy_(clipped)
            records.append(
                LayerRecord(
                    module=name,
                    method=self.name,
                    seconds=time.perf_counter() - t0,
                    error=self._output_error(x, original, clipped),
                    details={
                        "clip_ratio_mean": float(result.ratio.mean()),
                        "clip_ratio_min": float(result.ratio.min()),
                        "clipped_fraction": float((result.ratio < 1).float().mean()),
                        "error_unclipped": self._output_error(x, original, original),
                        "tokens": x.shape[0],
                    },
                )
            )
        return records

    def _output_error(self, x: Tensor, original: Tensor, weight: Tensor) -> float:
        """||x Q(weight)ᵀ - x originalᵀ|| / ||x originalᵀ||: the relative output error of ``weight`` once rounded."""
        y = x @ original.t()
        denom = float(y.norm())
        return float((x @ on_grid(weight, self.search_spec).t() - y).norm()) / denom if denom > 0 else 0.0

    def describe(self) -> str:
        extra = "" if self.clips else ", no clip search"
        extra += ", GPTQ-rounded scale search" if self.search_rounding == "gptq" else ""
        extra += "" if self.folds == FOLD_KINDS else f", folds {'+'.join(self.folds)}"
        return f"{self.name}({self.spec.describe()}{extra})"
