"""The layer-wise pipeline (../shared/DESIGN.md): one decoder block at a time.

For each block: (1) its inputs for the calibration batch are at hand; (2)-(3) every recipe step gets a
``BlockContext`` through which it observes the block (``ctx.forward()`` runs the block on the calibration inputs,
with whatever hooks the step has registered) and transforms it (smooths, solves, swaps Linear for QuantLinear);
(4) the transformed block is run to produce the next block's inputs, so later blocks see the errors of earlier
ones. Steps never loop over the model themselves. Calibration-free recipes skip the capture entirely.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlm.models.blocks import DecoderBlocks, find_decoder_blocks, quantizable_linears
from quantlm.pipeline.capture import BlockInputs, capture_block_inputs

log = logging.getLogger(__name__)


@dataclass
class LayerRecord:
    """One entry of the quant log: what a step did to one module."""

    module: str
    method: str
    seconds: float
    error: float | None = None  # relative error, method-specific (see the method's docs)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Step(Protocol):
    name: str
    needs_calibration: bool

    def process_block(self, ctx: "BlockContext") -> list[LayerRecord]: ...

    def finalize(self, model: nn.Module) -> list[LayerRecord]: ...

    def to_config(self) -> dict[str, Any]: ...


@dataclass
class BlockContext:
    model: nn.Module
    blocks: DecoderBlocks
    index: int
    inputs: BlockInputs | None  # None for calibration-free runs

    @property
    def block(self) -> nn.Module:
        return self.blocks.blocks[self.index]

    @property
    def name(self) -> str:
        return self.blocks.name(self.index)

    def linears(self) -> dict[str, nn.Module]:
        """The block's linear layers by full module name."""
        return {f"{self.name}.{k}": m for k, m in quantizable_linears(self.block).items()}

    @torch.no_grad()
    def forward(self, keep_outputs: bool = False) -> list[torch.Tensor] | None:
        """Run the block on every calibration mini-batch (hooks registered by steps see each call)."""
        if self.inputs is None:
            raise RuntimeError(f"{self.name}: this step needs calibration data, but the run has none")
        outputs = []
        for hidden in self.inputs.hidden:
            args, kwargs = self.inputs.call_args(self.index, hidden.shape[0])
            out = self.block(hidden, *args, **kwargs)
            if isinstance(out, (tuple, list)):
                out = out[0]
            if keep_outputs:
                outputs.append(out)
        return outputs if keep_outputs else None


def run_pipeline(
    model: nn.Module,
    steps: Sequence[Step],
    calibration: torch.Tensor | None = None,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> list[LayerRecord]:
    """Apply ``steps`` block by block; returns the quant log. ``calibration`` is a LongTensor [n, seqlen]."""
    blocks = find_decoder_blocks(model)
    needs_data = any(s.needs_calibration for s in steps)
    inputs = None
    if needs_data:
        if calibration is None:
            raise ValueError(f"{', '.join(s.name for s in steps if s.needs_calibration)} needs calibration data")
        t0 = time.perf_counter()
        inputs = capture_block_inputs(model, blocks, calibration, batch_size)
        log.info("captured %d calibration samples in %.1fs", inputs.n_samples, time.perf_counter() - t0)
    records: list[LayerRecord] = []
    bar = tqdm(range(len(blocks)), desc="quantizing", unit="block", disable=not progress)
    for index in bar:
        ctx = BlockContext(model, blocks, index, inputs)
        for step in steps:
            records.extend(step.process_block(ctx))
        if inputs is not None and index + 1 < len(blocks):
            inputs.hidden = ctx.forward(keep_outputs=True)
    for step in steps:
        records.extend(step.finalize(model))
    return records
