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
from typing import Any, Callable, Protocol, Sequence

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


_GROUP_CACHE: dict[tuple, list[list[str]]] = {}


class _StopBlock(Exception):
    """Raised by an observing hook once everything it needs from a mini-batch has been seen."""


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
    def observe(
        self,
        modules: dict[str, nn.Module],
        on_input: Callable[[str, torch.Tensor], None],
        *,
        stop_early: bool = True,
        first_batch_only: bool = False,
    ) -> None:
        """Run the block on every calibration mini-batch and call ``on_input(name, x)`` with the input of each of
        ``modules``. With ``stop_early`` a mini-batch stops as soon as all of them have been seen, so observing
        the first Linears of a block costs a fraction of a full forward."""
        pending: set[str] = set()

        def make_hook(name):
            def hook(module, args):
                on_input(name, args[0])
                pending.discard(name)
                if stop_early and not pending:
                    raise _StopBlock

            return hook

        handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
        try:
            batches = self._require_inputs().hidden
            for hidden in batches[:1] if first_batch_only else batches:
                pending.update(modules)
                try:
                    self._run(hidden)
                except _StopBlock:
                    pass
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def input_groups(self, modules: dict[str, nn.Module]) -> list[list[str]]:
        """``modules`` grouped by the input they share (q/k/v, gate/up), groups in the order the block runs them.

        Found by running the first calibration mini-batch (up to the last of ``modules``), so it needs no
        per-architecture table. Blocks of one model share their layout, so the answer is cached by the block's
        module names relative to the block."""
        prefix = f"{self.name}."
        key = (type(self.block), tuple(n.removeprefix(prefix) for n in modules))
        cached = _GROUP_CACHE.get(key)
        if cached is not None:
            return [[prefix + n for n in group] for group in cached]
        seen: dict[str, torch.Tensor] = {}  # the inputs are kept alive, so no two can share an address

        def on_input(name, x):
            seen.setdefault(name, x)

        self.observe(modules, on_input, first_batch_only=True)
        groups: dict[tuple, list[str]] = {}
        for name, x in seen.items():  # dicts keep insertion order: the order the block called them
            key_x = (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), tuple(x.stride()))
            groups.setdefault(key_x, []).append(name)
        never_called = [n for n in modules if n not in seen]
        result = list(groups.values()) + ([never_called] if never_called else [])
        _GROUP_CACHE[key] = [[n.removeprefix(prefix) for n in group] for group in result]
        return result

    def _require_inputs(self) -> BlockInputs:
        if self.inputs is None:
            raise RuntimeError(f"{self.name}: this step needs calibration data, but the run has none")
        return self.inputs

    def _run(self, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.inputs.call_args(self.index, hidden.shape[0])
        out = self.block(hidden, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def forward(self, keep_outputs: bool = False) -> list[torch.Tensor] | None:
        """Run the block on every calibration mini-batch (hooks registered by steps see each call)."""
        outputs = []
        for hidden in self._require_inputs().hidden:
            out = self._run(hidden)
            if keep_outputs:
                outputs.append(out)
        return outputs if keep_outputs else None


class WeightSource(Protocol):
    """Brings a block's weights into memory before it is processed and drops them after (streaming)."""

    def materialize(self, i: int) -> None: ...

    def release(self, i: int) -> None: ...


class FinishedBlocks(Protocol):
    """Keeps finished blocks on disk (resume) and puts them back on request."""

    def has(self, i: int) -> bool: ...

    def save(self, i: int, blocks: DecoderBlocks, records: list[LayerRecord]) -> None: ...

    def restore(self, i: int, blocks: DecoderBlocks) -> list[LayerRecord]: ...


def run_pipeline(
    model: nn.Module,
    steps: Sequence[Step],
    calibration: torch.Tensor | None = None,
    *,
    batch_size: int = 8,
    progress: bool = True,
    weights: WeightSource | None = None,
    store: FinishedBlocks | None = None,
) -> list[LayerRecord]:
    """Apply ``steps`` block by block; returns the quant log. ``calibration`` is a LongTensor [n, seqlen].

    With ``weights`` each block is read just before it is processed and released after; with ``store`` each
    finished block is written out, and blocks the store already holds are restored instead of processed again
    (their outputs are recomputed from the restored block, so a resumed run gives the same bytes).
    """
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
        if store is not None and store.has(index):
            records.extend(store.restore(index, blocks))
            bar.set_postfix_str("resumed")
        else:
            if weights is not None:
                weights.materialize(index)
            block_records = []
            for step in steps:
                block_records.extend(step.process_block(ctx))
            if store is not None:
                store.save(index, blocks, block_records)
            records.extend(block_records)
        if inputs is not None and index + 1 < len(blocks):
            inputs.hidden = ctx.forward(keep_outputs=True)
        if weights is not None:
            weights.release(index)
    for step in steps:
        records.extend(step.finalize(model))
    return records
