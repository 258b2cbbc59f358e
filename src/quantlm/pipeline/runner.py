"""The layer-wise pipeline (docs/architecture.md): one decoder block at a time.

For each block: (1) its inputs for the calibration batch are at hand; (2)-(3) every recipe step gets a
``BlockContext`` through which it observes the block (``ctx.forward()`` runs the block on the calibration inputs,
with whatever hooks the step has registered) and transforms it (smooths, solves, swaps Linear for QuantLinear);
(4) the transformed block is run to produce the next block's inputs, so later blocks see the errors of earlier
ones. Steps never loop over the model themselves. Calibration-free recipes skip the capture entirely.

Replay (``quantlm.pipeline.replay``): passes over a block skip the parts of it that no step can change any more,
and replay their recorded outputs instead. What a run finds about its blocks' layout (input groups, tails) is kept
in a ``LayoutCache`` of that run.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlm.models.blocks import DecoderBlocks, find_decoder_blocks, quantizable_linears, tensor_key
from quantlm.pipeline.activations import Batches
from quantlm.pipeline.capture import BlockInputs, capture_block_inputs
from quantlm.pipeline.dequantized import dequantize_block, drop_dequantized
from quantlm.pipeline.replay import LayoutCache, Replay

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


class _StopBlock(Exception):
    """Raised by an observing hook once everything it needs from a mini-batch has been seen."""


class Step(Protocol):
    name: str
    needs_calibration: bool

    def process_block(self, ctx: BlockContext) -> list[LayerRecord]: ...

    def finalize(self, model: nn.Module) -> list[LayerRecord]: ...

    def to_config(self) -> dict[str, Any]: ...


@dataclass
class BlockContext:
    model: nn.Module
    blocks: DecoderBlocks
    index: int
    inputs: BlockInputs | None  # None for calibration-free runs
    final: set[str] = field(default_factory=set)  # Linears (full names) that no step will change again
    # the run's layouts (input groups, tails); a context built by itself gets one of its own
    layout_cache: LayoutCache = field(default_factory=LayoutCache, repr=False, compare=False)
    replay: Replay = field(init=False, repr=False, compare=False)  # recorded outputs of the block's children

    def __post_init__(self) -> None:
        self.replay = Replay(self)

    @property
    def block(self) -> nn.Module:
        return self.blocks.blocks[self.index]

    @property
    def name(self) -> str:
        return self.blocks.name(self.index)

    def linears(self) -> dict[str, nn.Module]:
        """The block's linear layers by full module name."""
        return {f"{self.name}.{k}": m for k, m in quantizable_linears(self.block).items()}

    def mark_final(self, names) -> None:
        """Promise that the Linears ``names`` will not change again in this block (lets later passes replay)."""
        self.final.update(names)

    def reset_final(self) -> None:
        """Forget the promises and recorded outputs (a new step may change anything)."""
        self.final.clear()
        self.replay.clear()

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
            with self.replay.replaying(batches, full_pass=not first_batch_only, observed=tuple(modules.values())):
                for hidden in itertools.islice(batches, 1) if first_batch_only else batches:
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
        per-architecture table. Blocks of one model share their layout, so the answer is kept for the run
        (``LayoutCache``), by the block's module names relative to the block and the model's config."""
        prefix = f"{self.name}."
        key = LayoutCache.key(self.model, self.block, (n.removeprefix(prefix) for n in modules))
        cached = self.layout_cache.groups.get(key)
        if cached is not None:
            return [[prefix + n for n in group] for group in cached]
        seen: dict[str, torch.Tensor] = {}  # the inputs are kept alive, so no two can share an address

        def on_input(name, x):
            seen.setdefault(name, x)

        self.observe(modules, on_input, first_batch_only=True)
        groups: dict[tuple, list[str]] = {}
        for name, x in seen.items():  # dicts keep insertion order: the order the block called them
            groups.setdefault(tensor_key(x), []).append(name)
        never_called = [n for n in modules if n not in seen]
        result = list(groups.values()) + ([never_called] if never_called else [])
        self.layout_cache.groups[key] = [[n.removeprefix(prefix) for n in group] for group in result]
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
    def probe(self) -> torch.Tensor:
        """The block's output on the first calibration mini-batch, computed now (no replay): for checks that a
        transformation left the block's function unchanged."""
        return self._run(next(iter(self._require_inputs().hidden)))

    @torch.no_grad()
    def forward(self, keep_outputs: bool = False, consume_inputs: bool = False) -> Batches | None:
        """Run the block on every calibration mini-batch (hooks registered by steps see each call, except calls of
        modules inside a replayed child).

        ``consume_inputs``: drop each input mini-batch once it has been run (the last pass over a block: its
        outputs then replace its inputs without both sets being held at once)."""
        hidden = self._require_inputs().hidden
        outputs = hidden.empty_like()
        with self.replay.replaying(hidden, full_pass=not consume_inputs):
            for x in hidden.consume() if consume_inputs else hidden:
                out = self._run(x)
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


def _block_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _dequantize_once(block: nn.Module, dtype: torch.dtype) -> None:
    """Layers of ``block`` without a kernel (restored from a store) run on their weight dequantized once."""
    dequantize_block(block, dtype)


def _drop_kernels(block: nn.Module) -> None:
    """Forget the dequantized copies of a finished block's weights (its memory must not outlive the block)."""
    drop_dequantized(block)


def run_pipeline(
    model: nn.Module,
    steps: Sequence[Step],
    calibration: torch.Tensor | None = None,
    *,
    batch_size: int = 8,
    progress: bool = True,
    weights: WeightSource | None = None,
    store: FinishedBlocks | None = None,
    offload_dir=None,
) -> list[LayerRecord]:
    """Apply ``steps`` block by block; returns the quant log. ``calibration`` is a LongTensor [n, seqlen].

    With ``weights`` each block is read just before it is processed and released after; with ``store`` each
    finished block is written out, and blocks the store already holds are restored instead of processed again
    (their outputs are recomputed from the restored block, so a resumed run gives the same bytes). With
    ``offload_dir`` the calibration activations are kept in files there instead of in memory.
    """
    blocks = find_decoder_blocks(model)
    needs_data = any(s.needs_calibration for s in steps)
    inputs = None
    if needs_data:
        if calibration is None:
            raise ValueError(f"{', '.join(s.name for s in steps if s.needs_calibration)} needs calibration data")
        t0 = time.perf_counter()
        inputs = capture_block_inputs(model, blocks, calibration, batch_size, offload_dir)
        log.info("captured %d calibration samples in %.1fs", inputs.n_samples, time.perf_counter() - t0)
    records: list[LayerRecord] = []
    layout_cache = LayoutCache()  # this run's: nothing found about one model's layout outlives its run
    bar = tqdm(range(len(blocks)), desc="quantizing", unit="block", disable=not progress)
    for index in bar:
        ctx = BlockContext(model, blocks, index, inputs, layout_cache=layout_cache)
        if store is not None and store.has(index):
            records.extend(store.restore(index, blocks))
            bar.set_postfix_str("resumed")
        else:
            if weights is not None:
                weights.materialize(index)
            if inputs is not None:
                ctx.replay.tails = ctx.replay.find_tails()
            block_records = []
            for step in steps:
                ctx.reset_final()
                block_records.extend(step.process_block(ctx))
            if store is not None:
                store.save(index, blocks, block_records)
            records.extend(block_records)
        if inputs is not None and index + 1 < len(blocks):
            _dequantize_once(blocks.blocks[index], _block_dtype(model))
            outputs = ctx.forward(keep_outputs=True, consume_inputs=True)
            inputs.hidden.clear()
            inputs.hidden = outputs
        _drop_kernels(blocks.blocks[index])
        ctx.reset_final()
        if weights is not None:
            weights.release(index)
    for step in steps:
        records.extend(step.finalize(model))
    return records
