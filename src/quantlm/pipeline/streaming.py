"""Keep memory near one decoder block: the model is built without weights, the parts outside the blocks
(embeddings, final norm, output projection) are read once, and each block's weights are read from the
safetensors files just before the block is processed and dropped right after.

Streaming needs the checkpoint's tensor names to be the model's own state-dict names (true of checkpoints saved by
transformers and of quantlm's cache). Where they differ (a layout transformers converts while loading),
``streamed_model`` returns None and the caller loads the whole model instead.
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

import torch
from torch import nn

from quantlm.allocator import trim_freed_memory
from quantlm.formats.safetensors_io import TensorIndex
from quantlm.models.blocks import DecoderBlocks, find_decoder_blocks, output_embedding_name
from quantlm.models.skeleton import empty_model
from quantlm.models.sources import load_model_config

log = logging.getLogger(__name__)


def _block_prefix(blocks: DecoderBlocks, index: int) -> str:
    return f"{blocks.name(index)}."


class StreamedWeights:
    """Reads and releases the weights of one decoder block at a time."""

    def __init__(self, model: nn.Module, index: TensorIndex, dtype: torch.dtype) -> None:
        self.model = model
        self.index = index
        self.dtype = dtype
        self.blocks = find_decoder_blocks(model)

    def materialize(self, i: int) -> None:
        block = self.blocks.blocks[i]
        prefix = _block_prefix(self.blocks, i)
        names = [prefix + k for k in block.state_dict()]
        tensors = self.index.load(names, self.dtype)
        block.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items()}, strict=True, assign=True)

    def release(self, i: int) -> None:
        self.blocks.blocks[i].to("meta")
        gc.collect()
        trim_freed_memory()


def streamed_model(
    model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, StreamedWeights] | None:
    """The model with every tensor outside the decoder blocks loaded and the blocks left empty (meta)."""
    model_dir = Path(model_dir)
    index = TensorIndex(model_dir)
    config = load_model_config(model_dir)
    model = empty_model(config, dtype)
    model.eval()
    blocks = find_decoder_blocks(model)
    block_prefix = f"{blocks.path}."
    state_names = set(model.state_dict())
    available = index.names()
    tied = {n for n in state_names - available if _is_tied(model, n)}
    if not (state_names - tied) <= available:
        missing = sorted((state_names - tied) - available)[:3]
        log.info(
            "streaming not possible for %s (e.g. %s not stored as named): loading the whole model", model_dir, missing
        )
        return None
    outside = [n for n in state_names - tied if not n.startswith(block_prefix)]
    tensors = index.load(outside, dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_empty = [n for n, t in model.state_dict().items() if t.is_meta and not n.startswith(block_prefix)]
    if still_empty:
        log.info("streaming not possible for %s (%s stays empty): loading the whole model", model_dir, still_empty[:3])
        return None
    return model, StreamedWeights(model, index, dtype)


def _is_tied(model: nn.Module, name: str) -> bool:
    """A state-dict entry that transformers fills by tying (the output projection sharing the input embeddings)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    out_name = output_embedding_name(model)
    return out_name is not None and name == f"{out_name}.weight"
