"""The layer-wise pipeline (../shared/DESIGN.md): one decoder block at a time.

For each block: (1) its inputs for the calibration batch are at hand; (2)-(3) every recipe step gets a
``BlockContext`` through which it observes the block (``ctx.forward()`` runs the block on the calibration inputs,
with whatever hooks the step has registered) and transforms it (smooths, solves, swaps Linear for QuantLinear);
(4) the transformed block is run to produce the next block's inputs, so later blocks see the errors of earlier
ones. Steps never loop over the model themselves. Calibration-free recipes skip the capture entirely.

Replay: a step that is done with some Linears marks them final (``ctx.mark_final``). A direct child of the block
(an attention or MLP module) whose Linears are all final, and which runs after nothing that can still change, gives
the same output on every later pass; its output is recorded on the first full pass after that and replayed on the
later ones instead of recomputed.

Tail replay goes further. When a child's output is the output of its last Linear (its *tail*: o_proj of a Llama
attention, down_proj of its MLP; found once per block layout by running one mini-batch), the tail's input is
recorded on a pass where every Linear before it is final. Once the tail is final too, the child replays as the tail
applied to that recorded input: one matmul instead of the child's math, and nothing more kept than the input. With
true-sequential GPTQ on a Llama block the attention then runs in two passes of five (the q/k/v pass stops inside
it) and the MLP in three, or two when the activations are offloaded: an input wider than the block's hidden states
(the MLP's) is only recorded on disk, never in memory.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlm.models.blocks import DecoderBlocks, find_decoder_blocks, is_linear, linear_weight, quantizable_linears, tensor_key
from quantlm.nn.qlinear import QuantLinear
from quantlm.pipeline.activations import Batches
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
_TAIL_CACHE: dict[tuple, dict[str, tuple]] = {}


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
    final: set[str] = field(default_factory=set)  # Linears (full names) that no step will change again
    _recorded: dict[str, tuple[Batches, int]] = field(default_factory=dict)  # child -> (outputs, _output_arity)
    tails: dict[str, tuple[str, int, tuple[str, ...]]] = field(default_factory=dict)  # find_tails(); {}: no tail replay
    _tail_inputs: dict[str, Batches] = field(default_factory=dict)  # tail Linear -> its (final) inputs
    _child_linears: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # taken before any step swaps a Linear for a quantized module
        for child_name, child in self.block.named_children():
            names = [".".join(filter(None, (self.name, child_name, n))) for n in quantizable_linears(child)]
            if names:
                self._child_linears[child_name] = names

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
        for batches, _ in self._recorded.values():
            batches.clear()
        self._recorded.clear()
        for batches in self._tail_inputs.values():
            batches.clear()
        self._tail_inputs.clear()

    def _settled_children(self) -> list[tuple[str, nn.Module]]:
        """Direct children of the block with Linears, all final. Children run in registration order in every
        supported block, and a child is only settled when every Linear registered before it is final too."""
        settled = []
        for child_name, linears in self._child_linears.items():
            if not all(n in self.final for n in linears):
                break
            settled.append((child_name, getattr(self.block, child_name)))
        return settled

    def find_tails(self) -> dict[str, tuple[str, int, tuple[str, ...]]]:
        """Children whose output is their last Linear's output: child -> (that Linear's full name, output arity,
        the Linears called before it).

        Found by running the first mini-batch and comparing tensor identities (no table per architecture); cached
        by the block's layout like ``input_groups``. Call it before any step registers hooks on the block."""
        prefix = f"{self.name}."
        config = getattr(self.model, "config", None)
        key = (
            type(self.block),
            tuple(n.removeprefix(prefix) for n in self.linears()),
            tuple((c, type(getattr(self.block, c))) for c in self._child_linears),
            config.to_json_string() if hasattr(config, "to_json_string") else None,
            getattr(config, "_attn_implementation", None),
        )
        cached = _TAIL_CACHE.get(key)
        if cached is None:
            linear_out: dict[str, Any] = {}  # name -> (output, a copy of it taken when it was made)
            child_out: dict[str, Any] = {}
            def keep(name, out) -> None:  # a forward hook must return None, or it replaces the output
                if name not in linear_out:
                    linear_out[name] = (out, out.clone())

            handles = [
                m.register_forward_hook(lambda mod, args, out, n=n: keep(n, out)) for n, m in self.linears().items()
            ]
            handles += [
                getattr(self.block, c).register_forward_hook(lambda mod, args, out, c=c: child_out.__setitem__(c, out))
                for c in self._child_linears
            ]
            try:
                with torch.no_grad():
                    self._run(next(iter(self._require_inputs().hidden)))
            finally:
                for h in handles:
                    h.remove()
            cached = {}
            run_order = [n.removeprefix(prefix) for n in linear_out]  # dicts keep insertion order: call order
            for child_name, linears in self._child_linears.items():
                if is_linear(getattr(self.block, child_name)):
                    continue  # a Linear child (OPT's fc1): replaying it by itself would save nothing
                out = child_out.get(child_name)
                arity = _output_arity(out)
                if arity is None:
                    continue
                tensor = out if arity == 0 else out[0]
                last = linears[-1]
                made, copy = linear_out.get(last, (None, None))
                # the very tensor, and not changed in place after the Linear made it
                relative = last.removeprefix(prefix)
                if made is tensor and torch.equal(copy, tensor) and relative in run_order:
                    # the Linears called before it: its input is final once they are (calls, not registration, order)
                    cached[child_name] = (relative, arity, tuple(run_order[: run_order.index(relative)]))
            _TAIL_CACHE[key] = cached
        return {child: (prefix + linear, arity, tuple(prefix + b for b in before)) for child, (linear, arity, before) in cached.items()}

    @contextlib.contextmanager
    def _replaying(self, full_pass: bool, observed: tuple[nn.Module, ...] = ()):
        """Replay the settled children recorded earlier (from their tail's input where there is one); record the
        others, and the final inputs of tails, when this pass sees every batch. A child holding an ``observed``
        module always runs, so the module's hooks fire."""
        hidden = self._require_inputs().hidden
        n_batches = len(hidden)
        tails = self.tails
        prefix = f"{self.name}."
        linears = {linear: self.block.get_submodule(linear.removeprefix(prefix)) for linear, _, _ in tails.values()}
        patched, handles, recording, tail_recording = [], [], {}, {}
        if full_pass:
            width = hidden.shapes[0][-1] if hidden.shapes else 0
            for child_name, (linear, _, before) in tails.items():
                if linear in self._tail_inputs or not all(n in self.final for n in before):
                    continue
                if not hidden.offloaded and linear_in_features(linears[linear]) > width:
                    continue
                batches = hidden.empty_like()
                tail_recording[linear] = batches
                # prepended: an observing hook on the same Linear may stop the block right after it
                handles.append(
                    linears[linear].register_forward_pre_hook(
                        lambda module, args, _batches=batches: _batches.append(args[0]), prepend=True
                    )
                )
        for name, child in self._settled_children():
            if any(m is o for m in child.modules() for o in observed):
                continue
            tail = tails.get(name)
            if tail is not None and tail[0] in self._tail_inputs:
                tail_linear, tail_inputs = linears[tail[0]], self._tail_inputs[tail[0]]
                _replay_as(child, lambda i, _f=tail_linear, _x=tail_inputs: _f(_x[i]), tail[1])
                patched.append(child)
            elif name in self._recorded:
                batches, arity = self._recorded[name]
                _replay_as(child, batches.__getitem__, arity)
                patched.append(child)
            elif full_pass and (tail is None or tail[0] not in tail_recording):  # else the tail replays it next time
                batches = hidden.empty_like()
                arities: set = set()
                recording[name] = (batches, arities)

                def record(module, args, output, _batches=batches, _arities=arities):
                    _arities.add(_output_arity(output))
                    if None not in _arities:
                        _batches.append(output if isinstance(output, torch.Tensor) else output[0])

                handles.append(child.register_forward_hook(record))
        try:
            yield
        finally:
            for child in patched:
                del child.forward
            for h in handles:
                h.remove()
        for name, (batches, arities) in recording.items():
            if len(batches) == n_batches and len(arities) == 1:
                self._recorded[name] = (batches, arities.pop())
            else:
                batches.clear()
        for linear, batches in tail_recording.items():
            if len(batches) == n_batches:
                self._tail_inputs[linear] = batches
            else:
                batches.clear()

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
            with self._replaying(full_pass=not first_batch_only, observed=tuple(modules.values())):
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
            groups.setdefault(tensor_key(x), []).append(name)
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
        with self._replaying(full_pass=not consume_inputs):
            for x in hidden.consume() if consume_inputs else hidden:
                out = self._run(x)
                if keep_outputs:
                    outputs.append(out)
        return outputs if keep_outputs else None


def linear_in_features(module: nn.Module) -> int:
    """in_features of a Linear (any layout) or of the QuantLinear that replaced it."""
    if isinstance(module, QuantLinear):
        return module.in_features
    return linear_weight(module).shape[1]


def _output_arity(output) -> int | None:
    """How a child's output can be recorded: 0 for a tensor, n for a tuple of a tensor and n-1 Nones (attention
    modules that return no weights), None for anything else (never replayed)."""
    if isinstance(output, torch.Tensor):
        return 0
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) and all(o is None for o in output[1:]):
        return len(output)
    return None


def _replay_as(child: nn.Module, output_of: Callable[[int], torch.Tensor], arity: int) -> None:
    """Patch ``child.forward`` so that its i-th call (mini-batch i) returns ``output_of(i)`` in the child's own output
    shape, ignoring its arguments; ``del child.forward`` undoes it."""
    counter = itertools.count()

    def replay(*args, **kwargs):
        return _rebuild_output(output_of(next(counter)), arity)

    child.forward = replay


def _rebuild_output(tensor: torch.Tensor, arity: int):
    return tensor if arity == 0 else (tensor,) + (None,) * (arity - 1)


class WeightSource(Protocol):
    """Brings a block's weights into memory before it is processed and drops them after (streaming)."""

    def materialize(self, i: int) -> None: ...

    def release(self, i: int) -> None: ...


class FinishedBlocks(Protocol):
    """Keeps finished blocks on disk (resume) and puts them back on request."""

    def has(self, i: int) -> bool: ...

    def save(self, i: int, blocks: DecoderBlocks, records: list[LayerRecord]) -> None: ...

    def restore(self, i: int, blocks: DecoderBlocks) -> list[LayerRecord]: ...


def _quantized_layers(block: nn.Module) -> list[QuantLinear]:
    return [m for m in block.modules() if isinstance(m, QuantLinear)]


def _block_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _dequantize_once(block: nn.Module, dtype: torch.dtype) -> None:
    """Layers of ``block`` without a kernel (restored from a store) run on their weight dequantized once."""
    for m in _quantized_layers(block):
        if m.kernel is None:
            m.use_kernel("dequantized", dtype)


def _drop_kernels(block: nn.Module) -> None:
    """Forget the dequantized copies of a finished block's weights (its memory must not outlive the block)."""
    for m in _quantized_layers(block):
        m.kernel = None


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
    bar = tqdm(range(len(blocks)), desc="quantizing", unit="block", disable=not progress)
    for index in bar:
        ctx = BlockContext(model, blocks, index, inputs)
        if store is not None and store.has(index):
            records.extend(store.restore(index, blocks))
            bar.set_postfix_str("resumed")
        else:
            if weights is not None:
                weights.materialize(index)
            if inputs is not None:
                ctx.tails = ctx.find_tails()
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
