"""LLM.int8() (Dettmers et al., 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale").

Vector-wise int8: every row of the activations (token) and every output row of the weight gets its own absmax
scale, so X Wᵀ ≈ diag(s_x) (Q_x Q_wᵀ) diag(s_w). A few input features carry huge values (|x| of 6 and far more),
and one of them in a row spoils that row's scale; the mixed-precision decomposition takes every input column in
which some |x| >= ``threshold`` out of the int8 product and multiplies it in floating point, with the same columns
of the (dequantized int8) weight, then adds the two parts (paper, Section 3.2). Which columns are outliers is
decided on every call, from the input at hand.

The weights need no data. The calibration set is used only to report, per layer, how many input columns are
outliers (the fraction per calibration sequence, mean and max, and the fraction that are outliers in some
sequence) in the quant log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from quantlm.core import QuantSpec
from quantlm.errors import InvalidSpecError
from quantlm.methods.base import Method, register, setting
from quantlm.methods.common import exclude_setting, is_excluded, round_to_grid
from quantlm.models.blocks import linear_weight
from quantlm.nn.qlinear import check_outlier_threshold
from quantlm.pipeline.runner import BlockContext, LayerRecord

WEIGHT_SPEC = QuantSpec(bits=8, symmetric=True)  # int8, one scale per output row


class _OutlierCounter:
    """Per calibration sequence: the fraction of input columns with some |x| >= threshold; and the union."""

    def __init__(self, features: int, threshold: float) -> None:
        self.threshold = threshold
        self.fractions: list[float] = []
        self.any = torch.zeros(features, dtype=torch.bool)

    def add(self, x: Tensor) -> None:
        x3 = x.detach().reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() > 2 else x.detach().unsqueeze(0)
        per_sequence = (x3.abs() >= self.threshold).any(dim=1)  # [sequences, features]
        self.fractions.extend(per_sequence.float().mean(dim=1).tolist())
        self.any |= per_sequence.any(dim=0).cpu()

    def summary(self) -> dict[str, Any]:
        n = len(self.fractions)
        return {
            "outlier_fraction_mean": sum(self.fractions) / n if n else 0.0,
            "outlier_fraction_max": max(self.fractions) if n else 0.0,
            "outlier_fraction_any": float(self.any.float().mean()),
            "outlier_columns_any": int(self.any.sum()),
        }


@register
@dataclass(frozen=True)
class LLMInt8(Method):
    """LLM.int8() as a pipeline step: int8 weights per output channel, int8 activations per token with outlier
    columns (``|x| >= threshold``) in floating point. ``exclude``: fnmatch patterns of modules to leave alone."""

    threshold: float = setting(6.0, "|x| from which an input column is an outlier kept in floating point.")
    exclude: tuple[str, ...] = exclude_setting()

    name = "llm-int8"
    needs_calibration = True  # for the outlier report only

    def __post_init__(self) -> None:
        if self.threshold is None:
            raise InvalidSpecError("LLM.int8() needs an outlier threshold, e.g. 6.0")
        object.__setattr__(self, "threshold", check_outlier_threshold(self.threshold))

    def process_block(self, ctx: BlockContext) -> list[LayerRecord]:
        targets = {n: m for n, m in ctx.linears().items() if not is_excluded(n, self.exclude)}
        if not targets:
            return []
        groups = ctx.input_groups(targets)
        counters = {g[0]: _OutlierCounter(linear_weight(targets[g[0]]).shape[1], self.threshold) for g in groups}
        ctx.observe({g[0]: targets[g[0]] for g in groups}, lambda name, x: counters[name].add(x), stop_early=False)
        records = []
        for group in groups:
            report = counters[group[0]].summary()
            for name in group:
                records.append(self._quantize(ctx.model, name, targets[name], report))
        return records

    def _quantize(self, root: nn.Module, name: str, module: nn.Module, report: dict[str, Any]) -> LayerRecord:
        return round_to_grid(
            root, name, module, WEIGHT_SPEC, self.name, report, act_bits=8, outlier_threshold=self.threshold
        )

    def describe(self) -> str:
        return f"{self.name}(threshold {self.threshold:g})"
