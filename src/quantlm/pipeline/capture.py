"""Capture what each decoder block is called with, for a calibration batch.

Every block is swapped for a recorder that notes its keyword arguments (attention mask, position embeddings,
position ids, ...) and passes the hidden states through unchanged; the model's final stage is stopped by an
exception. One cheap forward (embeddings only, no block math) thus yields the first block's hidden states for the
whole batch and every block's own keyword arguments, which can differ between blocks (Gemma's sliding and global
layers get different masks and rotary tables). Keyword arguments depend only on the batch shape (the windows have
no padding), so they are recorded once per mini-batch size and shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantlm.models.blocks import DecoderBlocks
from quantlm.pipeline.activations import Batches


class _StopForward(Exception):
    pass


_DROPPED_KWARGS = ("past_key_values", "past_key_value", "layer_past", "use_cache", "output_attentions")


class _Recorder(nn.Module):
    def __init__(self, index: int, original: nn.Module, sink: BlockInputs, is_last: bool) -> None:
        super().__init__()
        self.index = index
        self.sink = sink
        self.is_last = is_last
        object.__setattr__(self, "_original", original)  # not registered: no parameters of its own

    def __getattr__(self, name: str):
        # Models may read attributes of their blocks (an attention type, a layer index): answer for the block.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, hidden_states=None, *args, **kwargs):
        if hidden_states is None:
            hidden_states = kwargs.pop("hidden_states")
        batch = hidden_states.shape[0]
        if self.index == 0:
            self.sink.hidden.append(hidden_states.detach())
        per_block = self.sink.kwargs.setdefault(batch, {})
        if self.index not in per_block:
            kept = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
            if args:
                kept["__args__"] = args
            per_block[self.index] = kept
        if self.is_last:
            raise _StopForward
        return hidden_states


@dataclass
class BlockInputs:
    """Hidden states entering the current block (a list of mini-batches) and each block's keyword arguments."""

    hidden: Batches = field(default_factory=Batches)
    kwargs: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)  # batch size -> block -> kwargs

    def call_args(self, block_index: int, batch: int) -> tuple[tuple, dict[str, Any]]:
        kw = dict(self.kwargs[batch][block_index])
        args = kw.pop("__args__", ())
        return args, kw

    @property
    def n_samples(self) -> int:
        return sum(shape[0] for shape in self.hidden.shapes)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: DecoderBlocks, input_ids: torch.Tensor, batch_size: int, offload_dir=None
) -> BlockInputs:
    """Run ``input_ids`` [n, seqlen] through the model's embedding stage, recording each block's inputs (kept in
    memory, or in files under ``offload_dir``)."""
    sink = BlockInputs(hidden=Batches(offload_dir))
    originals = list(blocks.blocks)
    device = next(model.parameters()).device
    try:
        for i in range(len(originals)):
            blocks.blocks[i] = _Recorder(i, originals[i], sink, is_last=i == len(originals) - 1)
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        for i, block in enumerate(originals):
            blocks.blocks[i] = block
    return sink
