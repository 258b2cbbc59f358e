"""SmoothQuant (Xiao et al., 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models").

Activations of LLMs have a few input channels with huge values (outliers) and weights have none, so int8 per-token
activations lose most of their precision to those channels. SmoothQuant moves the difficulty: for each input
channel j of a group of Linears sharing an input X,

    s_j = max|X_j|^α / max|W_j|^(1-α)            (paper, Eq. 4; W_j: column j of all the group's weights)

X is divided by s (folded into the module that produces X) and W's column j multiplied by s_j, so X Wᵀ is
unchanged in floating point while X/s becomes easy to quantize. α = 0.5 splits the difficulty evenly.

This step only smooths; the quantization that follows is the next recipe step (RTN or GPTQ with ``act_bits=8``
or 4), or QAT's fake quantization (``quantlm qat --smooth-alpha``).
Beyond the paper and its reference code:
- folds exist where there is no norm in front (``quantlm.models.smoothing``): v_proj into o_proj and up_proj into
  down_proj (SmolLM2's down_proj inputs reach |x| ≈ 3000);
- ``alpha="auto"`` picks α per group from a grid, minimizing the group's quantized output error
  ‖Q(X/s) Q(W·s)ᵀ − X Wᵀ‖² / ‖X Wᵀ‖² on a fixed random sample of calibration tokens, with the weight grid and
  activation bits of the step that quantizes after it (W8A8 per channel when there is none): W4A4 wants another
  α than W8A8;
- channels that are all zero in the calibration set, or whose weights are all zero, keep s = 1;
- every block is run before and after smoothing, and a change of its output beyond float rounding is an error
  (a producer whose output feeds more than the Linears, e.g. a post-norm residual) instead of a silent change.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from quantlm.core import QuantSpec, fake_quantize
from quantlm.core.activation import (
    ACT_GRANULARITIES,
    fake_quantize_int8,
    fake_quantize_per_token,
    static_int8_scale,
)
from quantlm.errors import InvalidSpecError, QuantlmError
from quantlm.methods.base import Method, register, setting
from quantlm.models.blocks import linear_weight
from quantlm.models.smoothing import (
    FOLD_KINDS,
    SmoothGroup,
    apply_fold,
    fold_channel_map,
    fold_groups,
    parse_folds,
)
from quantlm.pipeline.runner import BlockContext, LayerRecord
from quantlm.pipeline.stats import InputStats, collect_input_stats

ALPHA_GRID = tuple(round(i * 0.05, 2) for i in range(21))
SEARCH_WEIGHT_SPEC = QuantSpec(bits=8, symmetric=True)  # int8 per output channel, as the W8A8 layers store it
MIN_SCALE = 1e-5
# largest relative change of a block's output that smoothing may cause (float rounding only), by compute dtype
FOLD_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
HALF_TOLERANCE = 2e-2


def smoothing_scales(act_absmax: Tensor, weight_absmax: Tensor, alpha: float) -> Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1-α) (fp32), and 1 where the channel is dead (no activation or no weight)."""
    a, w = act_absmax.float(), weight_absmax.float()
    s = a.pow(alpha) / w.pow(1 - alpha)
    live = (a > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(live, s.clamp(min=MIN_SCALE), torch.ones_like(s))


def quantized_output_error(
    x: Tensor,
    weights: list[Tensor],
    s: Tensor,
    granularity: str = "token",
    references=None,
    weight_spec: QuantSpec | None = SEARCH_WEIGHT_SPEC,
    act_bits: int = 8,
) -> float:
    """Relative error ‖Q(X/s) Q(W·s)ᵀ − X Wᵀ‖² / ‖X Wᵀ‖² summed over ``weights`` (each [out, in]): weights on
    ``weight_spec`` (int8 per channel by default; None: not rounded), activations symmetric per token at
    ``act_bits`` (or, with granularity "tensor", on the static int8 grid of the sample's max|x|)."""
    xs = x / s
    if granularity == "tensor":
        if act_bits != 8:
            raise InvalidSpecError(f"static per-tensor activation grids are 8-bit, not {act_bits}: search per token")
        xq = fake_quantize_int8(xs, granularity, static_int8_scale(xs.abs().max()))
    else:
        xq = fake_quantize_per_token(xs, act_bits)
    err = ref = 0.0
    for i, w in enumerate(weights):
        y = references[i] if references is not None else x @ w.t()
        wq = w * s if weight_spec is None else fake_quantize(w * s, weight_spec)
        err += float((xq @ wq.t() - y).pow(2).sum())
        ref += float(y.pow(2).sum())
    return err / ref if ref > 0 else 0.0


@register
@dataclass(frozen=True)
class SmoothQuant(Method):
    """SmoothQuant as a pipeline step: per block, gather max|x| per input channel of every smoothable group of
    Linears, compute s, fold 1/s into the producer and s into the Linears. Weights stay in floating point; put a
    quantizing step (``RTN``/``GPTQ`` with ``act_bits=8`` or 4) after it in the recipe.

    ``alpha``: a number in [0, 1], or ``"auto"`` for a per-group search over ``ALPHA_GRID`` (the error measured
    with activations per ``search_granularity``, on ``search_tokens`` calibration tokens drawn with ``seed``, on
    the grids of the step after it: :meth:`followed_by`, :meth:`searching_for`).
    ``folds``: which producers to fold into (``FOLD_KINDS``)."""

    alpha: float | str = setting(0.5, "Migration strength in [0, 1], or auto (searched per layer group).")
    folds: tuple[str, ...] = setting(
        FOLD_KINDS, "Where scales are folded, a comma list of norm, v-o, up-down.", flag="--smooth-folds"
    )
    search_granularity: str = setting(
        "token",
        "With --a-bits 8: token (dynamic per-token scales) or tensor (one static scale per layer).",
        flag="--a-granularity",
    )
    search_tokens: int = 2048
    seed: int = 0

    name = "smoothquant"
    needs_calibration = True
    quantizes_weights = False
    # the command line's --method smoothquant: W8A8 per-channel symmetric weights after the smoothing
    next_step_defaults = {"bits": 8, "group_size": -1, "symmetric": True, "act_bits": 8}

    def __post_init__(self) -> None:
        alpha = self.alpha
        if isinstance(alpha, str) and alpha != "auto":
            try:
                alpha = float(alpha)
            except ValueError:
                raise InvalidSpecError(f"alpha must be a number in [0, 1] or 'auto', got {self.alpha!r}") from None
        if alpha != "auto" and (isinstance(alpha, bool) or not 0 <= float(alpha) <= 1):
            raise InvalidSpecError(f"alpha must be a number in [0, 1] or 'auto', got {self.alpha!r}")
        object.__setattr__(self, "alpha", alpha if alpha == "auto" else float(alpha))
        object.__setattr__(self, "folds", parse_folds(self.folds))
        if self.search_granularity not in ACT_GRANULARITIES:
            raise InvalidSpecError(
                f"search_granularity must be one of {', '.join(ACT_GRANULARITIES)}, got {self.search_granularity!r}"
            )
        if self.search_tokens < 1:
            raise InvalidSpecError(f"search_tokens must be at least 1, got {self.search_tokens}")

    def followed_by(self, step) -> SmoothQuant:
        """This step searching α for the grids of ``step``, the one that quantizes after it: its weight grid (with
        no MSE clip), its activation bits (8 when it has none) and, where it quantizes activations, their
        granularity. (Kept beside the settings, not in them: a recipe read back resolves it again from its own
        next step.)"""
        spec = getattr(step, "spec", None)
        integer_grid = isinstance(spec, QuantSpec) and spec.codebook == "none"
        spec = dataclasses.replace(spec, clip="none") if integer_grid else None
        act_bits = getattr(step, "act_bits", None)
        granularity = getattr(step, "act_granularity", None) if act_bits is not None else None
        return self.searching_for(spec or SEARCH_WEIGHT_SPEC, act_bits or 8, granularity)

    def searching_for(
        self, weight_spec: QuantSpec | None, act_bits: int, granularity: str | None = None
    ) -> SmoothQuant:
        """A copy whose α search rounds weights on ``weight_spec`` (None: not at all) and activations at
        ``act_bits``, per ``granularity`` (None: as ``search_granularity`` says), e.g. for QAT's W-A bits."""
        resolved = dataclasses.replace(self, search_granularity=granularity or self.search_granularity)
        object.__setattr__(resolved, "_search_target", (weight_spec, act_bits))
        return resolved

    @property
    def search_target(self) -> tuple[QuantSpec | None, int]:
        """(weight grid, activation bits) of the α search."""
        return getattr(self, "_search_target", (SEARCH_WEIGHT_SPEC, 8))

    # -- the step -------------------------------------------------------------------------------------------------
    def process_block(self, ctx: BlockContext) -> list[LayerRecord]:
        t0 = time.perf_counter()
        block = ctx.block
        outputs: list[Tensor] = []
        groups = fold_groups(ctx.block, self.folds, lambda: outputs.append(ctx.probe()))
        if not groups:
            raise QuantlmError(
                f"SmoothQuant found nothing to smooth in {ctx.name}: no normalization layer feeds its Linears "
                f"directly and none of the known linear pairs is there; drop the smoothing (--method smoothquant, "
                "or qat's --smooth-alpha)"
            )
        linears = dict(block.named_modules())
        # one observation per distinct input: the first Linear of each group stands for the group
        firsts = {g.targets[0]: linears[g.targets[0]] for g in groups}
        sample = self.search_tokens if self.alpha == "auto" else 0
        stats = collect_input_stats(
            ctx, {f"{ctx.name}.{n}": m for n, m in firsts.items()}, sample_rows=sample, seed=self.seed
        )
        reference = outputs[0] if outputs else ctx.probe()  # the block's output before any fold
        saved = {k: v.detach().clone() for k, v in block.state_dict().items()}
        plans = []
        for group in groups:  # each plan sees the weights as the folds before it left them
            plans.append(self._plan(ctx, group, stats[f"{ctx.name}.{group.targets[0]}"], linears))
            apply_fold(group, plans[-1]["s_producer"], plans[-1]["s_consumer"], linears)
        check_folds(
            ctx, reference, saved, [(g, p["s_producer"], p["s_consumer"]) for g, p in zip(groups, plans)], linears
        )
        seconds = (time.perf_counter() - t0) / len(groups)
        return [
            LayerRecord(
                module=f"{ctx.name}.{group.producer}",
                method=self.name,
                seconds=seconds,
                error=plan["error"],
                details={k: v for k, v in plan.items() if k not in ("s_producer", "s_consumer", "error")}
                | {"kind": group.kind, "targets": [f"{ctx.name}.{t}" for t in group.targets]},
            )
            for group, plan in zip(groups, plans)
        ]

    def _plan(
        self, ctx: BlockContext, group: SmoothGroup, stats: InputStats, linears: dict[str, nn.Module]
    ) -> dict[str, Any]:
        """The scales of one group: s for the consumers' input channels and 1/s for the producer's outputs."""
        weights = [linear_weight(linears[t]).detach().float() for t in group.targets]
        device = weights[0].device  # the statistics live on the CPU; the plan is made where the weights are
        act = stats.absmax.to(device)
        wmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
        head_map = fold_channel_map(group, linears, getattr(ctx.model, "config", None), ctx.name)
        if head_map is not None:  # every query head that reads a KV head shares its scales
            head_map = head_map.to(device)
            n_out = int(head_map.max()) + 1
            act = torch.zeros(n_out, device=device).scatter_reduce(0, head_map, act, "amax")
            wmax = torch.zeros(n_out, device=device).scatter_reduce(0, head_map, wmax, "amax")

        def consumer_scales(alpha: float) -> tuple[Tensor, Tensor]:
            s = smoothing_scales(act, wmax, alpha)
            return s, (s if head_map is None else s[head_map])

        plan: dict[str, Any] = {"error": None}
        if self.alpha == "auto":
            x = stats.rows().to(device)
            references = [x @ w.t() for w in weights]
            weight_spec, act_bits = self.search_target

            def error(s: Tensor) -> float:
                return quantized_output_error(
                    x, weights, s, self.search_granularity, references, weight_spec=weight_spec, act_bits=act_bits
                )

            errors = {a: error(consumer_scales(a)[1]) for a in ALPHA_GRID}
            alpha = min(errors, key=errors.get)
            plan.update(
                error=errors[alpha],
                error_unsmoothed=error(torch.ones(x.shape[1], device=device)),
                search={str(a): e for a, e in errors.items()},
            )
        else:
            alpha = self.alpha
        s_producer, s_consumer = consumer_scales(alpha)
        plan.update(
            alpha=alpha,
            s_producer=s_producer,
            s_consumer=s_consumer,
            act_absmax_before=float(stats.absmax.max()),
            act_absmax_after=float((stats.absmax / s_consumer.cpu()).max()),
            scale_min=float(s_producer.min()),
            scale_max=float(s_producer.max()),
            dead_channels=int(((act == 0) | (wmax == 0)).sum()),
        )
        return plan

    def describe(self) -> str:
        alpha = self.alpha if self.alpha == "auto" else f"{self.alpha:g}"
        folds = "" if self.folds == FOLD_KINDS else f", folds {'+'.join(self.folds)}"
        return f"{self.name}(alpha {alpha}{folds})"


def check_folds(
    ctx: BlockContext,
    reference: Tensor,
    saved: dict,
    folds: list[tuple[SmoothGroup, Tensor, Tensor]],
    linears: dict[str, nn.Module],
    *,
    method: str = "SmoothQuant",
    flag: str = "--smooth-folds",
) -> None:
    """The block's output (``reference``: before any fold) must not change beyond float rounding after the
    ``folds`` (group, s_producer, s_consumer) applied to it; else the block is restored from ``saved`` (its state
    dict before the folds) and the fold that changed it is named in the error (``method``, ``flag``: how the
    message names the step and the setting that drops a fold)."""
    tolerance = FOLD_TOLERANCE.get(reference.dtype, HALF_TOLERANCE)
    together = relative_change(ctx.probe(), reference)
    if together <= tolerance:
        return
    for group, s_producer, s_consumer in folds:  # find the culprit: one fold at a time from the original weights
        ctx.block.load_state_dict(saved)
        apply_fold(group, s_producer, s_consumer, linears)
        change = relative_change(ctx.probe(), reference)
        if change > tolerance:
            ctx.block.load_state_dict(saved)
            raise QuantlmError(
                f"{method} cannot fold {group.describe(ctx.name)} exactly (the block's output changed by "
                f"{change:.1e}): its output feeds more than these Linears; drop the '{group.kind}' fold "
                f"({flag}) or use a method without smoothing"
            )
    ctx.block.load_state_dict(saved)
    raise QuantlmError(
        f"{method}'s folds in {ctx.name} are exact one by one but together change the block's output by "
        f"{together:.1e} (more than float rounding, {tolerance:g}): calibrate in float32 (--dtype float32)"
    )


def relative_change(y: Tensor, reference: Tensor) -> float:
    """||y - reference|| / ||reference|| in float32 (0 for a zero reference)."""
    denom = reference.float().norm().item()
    return (y.float() - reference.float()).norm().item() / denom if denom > 0 else 0.0
