"""Statistics of the inputs of a block's Linears over the calibration set, gathered block by block.

What SmoothQuant, static activation scales and LLM.int8()'s outlier report need: per input channel max|x| (and
min and max), the largest |x| overall, and, on request, a fixed random sample of input rows (tokens) for searches
that must try settings on real activations. Only running reductions and the sample are kept, never the whole set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from quantlm.pipeline.replay import linear_in_features
from quantlm.pipeline.runner import BlockContext


@dataclass
class InputStats:
    """Running statistics of one Linear's inputs ``[..., features]``."""

    features: int
    absmax: Tensor = None  # fp32 [features]
    min: Tensor = None
    max: Tensor = None
    tokens: int = 0
    sample: list[Tensor] = field(default_factory=list)  # fp32 [k, features] pieces, in calibration order

    def __post_init__(self) -> None:
        if self.absmax is None:
            self.absmax = torch.zeros(self.features)
            self.min = torch.full((self.features,), math.inf)
            self.max = torch.full((self.features,), -math.inf)

    def add(self, x: Tensor, sample_rows: int = 0, generator: torch.Generator | None = None) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        lo, hi = torch.aminmax(rows, dim=0)
        lo, hi = lo.float().cpu(), hi.float().cpu()
        torch.minimum(self.min, lo, out=self.min)
        torch.maximum(self.max, hi, out=self.max)
        torch.maximum(self.absmax, torch.maximum(lo.abs(), hi.abs()), out=self.absmax)
        self.tokens += rows.shape[0]
        if sample_rows > 0:
            k = min(sample_rows, rows.shape[0])
            index = torch.randperm(rows.shape[0], generator=generator)[:k].sort().values
            self.sample.append(rows[index.to(rows.device)].float().cpu())

    @property
    def tensor_absmax(self) -> float:
        """The largest |x| seen in any channel (what a static per-tensor int8 scale is made from)."""
        return float(self.absmax.max()) if self.tokens else 0.0

    def rows(self) -> Tensor:
        """The sampled input rows [k, features] (empty if none were asked for)."""
        return torch.cat(self.sample) if self.sample else torch.zeros(0, self.features)


def collect_input_stats(
    ctx: BlockContext,
    modules: dict[str, nn.Module],
    *,
    sample_rows: int = 0,
    seed: int = 0,
) -> dict[str, InputStats]:
    """Run the block on the calibration set and gather ``InputStats`` of each of ``modules``' inputs.

    ``sample_rows``: keep about that many input rows per module, drawn uniformly at random (seeded) and spread
    evenly over the mini-batches."""
    n_batches = max(len(ctx.inputs.hidden), 1) if ctx.inputs is not None else 1
    per_batch = math.ceil(sample_rows / n_batches) if sample_rows > 0 else 0
    stats = {name: InputStats(linear_in_features(m)) for name, m in modules.items()}
    generator = torch.Generator().manual_seed(seed)

    def record(name: str, x: Tensor) -> None:
        stats[name].add(x, per_batch, generator)

    ctx.observe(modules, record, stop_early=False)
    return stats
