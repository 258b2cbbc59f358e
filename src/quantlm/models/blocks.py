"""Generic discovery of a decoder-only model's blocks and of the linear layers inside them.

No per-architecture table is needed for this: the decoder blocks are the longest ``nn.ModuleList`` whose
children are all of one class (and, where the config says, ``num_hidden_layers`` long). Linear layers are
``nn.Linear`` and transformers' GPT-2 style ``Conv1D`` (whose weight is stored transposed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantlm.errors import ModelSourceError


@dataclass
class DecoderBlocks:
    path: str  # e.g. "model.layers"
    blocks: nn.ModuleList

    def __len__(self) -> int:
        return len(self.blocks)

    def name(self, index: int) -> str:
        return f"{self.path}.{index}"


def find_decoder_blocks(model: nn.Module) -> DecoderBlocks:
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            classes = {type(child) for child in module}
            if len(classes) == 1 and any(_is_linear_like(m) for m in module[0].modules()):
                candidates.append((name, module))
    if expected is not None:
        exact = [c for c in candidates if len(c[1]) == expected]
        if exact:
            candidates = exact
    if not candidates:
        raise ModelSourceError(
            f"cannot find the decoder blocks of {type(model).__name__}: no list of identical blocks with linear layers"
        )
    name, blocks = max(candidates, key=lambda c: len(c[1]))
    return DecoderBlocks(path=name, blocks=blocks)


def _is_linear_like(module: nn.Module) -> bool:
    """A float linear layer, one already quantized (anything holding packed weights), or one being trained
    fake-quantized (marked ``quantlm_linear``)."""
    return is_linear(module) or hasattr(module, "qweight") or getattr(module, "quantlm_linear", False)


def _conv1d_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it today
        return ()
    return (Conv1D,)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, *_conv1d_types()))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight in ``nn.Linear`` layout [out_features, in_features], whatever the module's own layout."""
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, _conv1d_types()):
        return module.weight.t()
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def quantizable_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The linear layers inside one block, by name relative to the block, in module order."""
    return {name: m for name, m in block.named_modules() if is_linear(m)}


def tensor_key(x: torch.Tensor) -> tuple:
    """What makes two tensors the very same view of the same memory (while both are alive)."""
    return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), tuple(x.stride()))


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def output_embedding_name(model: nn.Module) -> str | None:
    """The module name of the output projection (lm_head), if the model has one."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        return None
    for name, m in model.named_modules():
        if m is out:
            return name
    return None
