"""Replay: the pipeline's way of not recomputing the parts of a block that can no longer change.

A step that is done with some Linears marks them final (``BlockContext.mark_final``). A direct child of the block
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

A replayed child has its ``forward`` patched for the length of one pass (``Replay.replaying``) and given back after.

What a run learns about its blocks' layout (the tails here, and which Linears share an input for
``BlockContext.input_groups``) is found on one mini-batch and kept in a ``LayoutCache``. ``run_pipeline`` creates
one per run and hands it to every block's context, so the blocks of a model find their layout once, and nothing is
kept after the run. Entries are keyed by the block's type, its module names relative to the block and the model's
config, so two models of one family with different shapes never share one.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quantlm.models.blocks import is_linear, linear_weight, quantizable_linears
from quantlm.nn.qlinear import QuantLinear
from quantlm.pipeline.activations import Batches

if TYPE_CHECKING:
    from quantlm.pipeline.runner import BlockContext

# a child's tail: (the tail Linear's full name, the child's output arity, the Linears called before the tail)
Tail = tuple[str, int, tuple[str, ...]]


@dataclass
class LayoutCache:
    """What one run has found about its blocks' layouts, kept for the run's later blocks (module names relative to
    the block). Owned by one run: ``run_pipeline`` creates it, a ``BlockContext`` built alone gets its own."""

    groups: dict[tuple, list[list[str]]] = field(default_factory=dict)  # BlockContext.input_groups
    tails: dict[tuple, dict[str, Tail]] = field(default_factory=dict)  # Replay.find_tails

    @staticmethod
    def key(model: nn.Module, block: nn.Module, names: Iterable[str], *details) -> tuple:
        """The key of a layout: the block's type, ``names`` (relative to the block), ``details`` and the model's
        config (its JSON and attention implementation), so that another shape of the same family is another key."""
        config = getattr(model, "config", None)
        return (
            type(block),
            tuple(names),
            *details,
            config.to_json_string() if hasattr(config, "to_json_string") else None,
            getattr(config, "_attn_implementation", None),
        )


class Replay:
    """The record/replay state of one block, owned by its ``BlockContext`` (which says which Linears are final and
    runs the block): the recorded outputs of settled children, the tails and their recorded inputs."""

    def __init__(self, ctx: BlockContext) -> None:
        self.ctx = ctx
        self.tails: dict[str, Tail] = {}  # find_tails(); {}: no tail replay
        self.recorded: dict[str, tuple[Batches, int]] = {}  # child -> (outputs, _output_arity)
        self.tail_inputs: dict[str, Batches] = {}  # tail Linear -> its (final) inputs
        self.child_linears: dict[str, list[str]] = {}  # child -> its Linears (full names), children with Linears
        # taken before any step swaps a Linear for a quantized module
        for child_name, child in ctx.block.named_children():
            names = [".".join(filter(None, (ctx.name, child_name, n))) for n in quantizable_linears(child)]
            if names:
                self.child_linears[child_name] = names

    def clear(self) -> None:
        """Drop everything recorded (the Linears it was recorded with may change again)."""
        for batches, _ in self.recorded.values():
            batches.clear()
        self.recorded.clear()
        for batches in self.tail_inputs.values():
            batches.clear()
        self.tail_inputs.clear()

    def settled_children(self) -> list[tuple[str, nn.Module]]:
        """Direct children of the block with Linears, all final. Children run in registration order in every
        supported block, and a child is only settled when every Linear registered before it is final too."""
        settled = []
        for child_name, linears in self.child_linears.items():
            if not all(n in self.ctx.final for n in linears):
                break
            settled.append((child_name, getattr(self.ctx.block, child_name)))
        return settled

    def find_tails(self) -> dict[str, Tail]:
        """Children whose output is their last Linear's output: child -> (that Linear's full name, output arity,
        the Linears called before it).

        Found by running the first mini-batch and comparing tensor identities (no table per architecture); cached
        by the block's layout like ``BlockContext.input_groups``. Call it before any step registers hooks on the
        block."""
        ctx, block = self.ctx, self.ctx.block
        prefix = f"{ctx.name}."
        key = LayoutCache.key(
            ctx.model,
            block,
            (n.removeprefix(prefix) for n in ctx.linears()),
            tuple((c, type(getattr(block, c))) for c in self.child_linears),
        )
        cached = ctx.layout_cache.tails.get(key)
        if cached is None:
            cached = ctx.layout_cache.tails[key] = self._tails_of_first_batch(prefix)
        return {
            child: (prefix + linear, arity, tuple(prefix + b for b in before))
            for child, (linear, arity, before) in cached.items()
        }

    def _tails_of_first_batch(self, prefix: str) -> dict[str, Tail]:
        """``find_tails``, names relative to the block, from a run of the first mini-batch."""
        ctx, block = self.ctx, self.ctx.block
        linear_out: dict[str, Any] = {}  # name -> (output, a copy of it taken when it was made)
        child_out: dict[str, Any] = {}

        def keep(name, out) -> None:  # a forward hook must return None, or it replaces the output
            if name not in linear_out:
                linear_out[name] = (out, out.clone())

        handles = [m.register_forward_hook(lambda mod, args, out, n=n: keep(n, out)) for n, m in ctx.linears().items()]
        handles += [
            getattr(block, c).register_forward_hook(lambda mod, args, out, c=c: child_out.__setitem__(c, out))
            for c in self.child_linears
        ]
        try:
            ctx.probe()
        finally:
            for h in handles:
                h.remove()
        tails = {}
        run_order = [n.removeprefix(prefix) for n in linear_out]  # dicts keep insertion order: call order
        for child_name, linears in self.child_linears.items():
            if is_linear(getattr(block, child_name)):
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
                tails[child_name] = (relative, arity, tuple(run_order[: run_order.index(relative)]))
        return tails

    @contextlib.contextmanager
    def replaying(self, hidden: Batches, full_pass: bool, observed: tuple[nn.Module, ...] = ()):
        """For a pass over the mini-batches ``hidden``: replay the settled children recorded earlier (from their
        tail's input where there is one); record the others, and the final inputs of tails, when this pass sees every
        batch. A child holding an ``observed`` module always runs, so the module's hooks fire."""
        ctx = self.ctx
        n_batches = len(hidden)
        tails = self.tails
        prefix = f"{ctx.name}."
        linears = {linear: ctx.block.get_submodule(linear.removeprefix(prefix)) for linear, _, _ in tails.values()}
        patched, handles, recording, tail_recording = [], [], {}, {}
        if full_pass:
            width = hidden.shapes[0][-1] if hidden.shapes else 0
            for linear, _, before in tails.values():
                if linear in self.tail_inputs or not all(n in ctx.final for n in before):
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
        for name, child in self.settled_children():
            if any(m is o for m in child.modules() for o in observed):
                continue
            tail = tails.get(name)
            if tail is not None and tail[0] in self.tail_inputs:
                tail_linear, tail_inputs = linears[tail[0]], self.tail_inputs[tail[0]]
                _replay_as(child, lambda i, _f=tail_linear, _x=tail_inputs: _f(_x[i]), tail[1])
                patched.append(child)
            elif name in self.recorded:
                batches, arity = self.recorded[name]
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
                self.recorded[name] = (batches, arities.pop())
            else:
                batches.clear()
        for linear, batches in tail_recording.items():
            if len(batches) == n_batches:
                self.tail_inputs[linear] = batches
            else:
                batches.clear()


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
    if (
        isinstance(output, tuple)
        and output
        and isinstance(output[0], torch.Tensor)
        and all(o is None for o in output[1:])
    ):
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
