"""A model's skeleton: every module of a Hugging Face causal LM built from its config, with its parameters on the
meta device (no memory, no values), ready for tensors to be assigned from a checkpoint or streamed in block by block.

Building the skeleton must not initialize weights. transformers still runs its ``init_weights`` on a model built
from a config, even when the parameters are meta; each ``normal_`` then goes through torch's Python reference
implementation, which made building SmolLM2-135M's skeleton take about 0.25 s, as long as loading the whole dense
model. Buffers stay real (``include_buffers=False``): the rotary frequencies and other values computed in the
modules' ``__init__`` are kept as computed there.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _no_init_weights():
    """transformers' context that turns weight initialization into a no-op (its home moved between releases)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def empty_model(config, dtype: torch.dtype | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_config(config)`` with meta parameters and no weight initialization."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": dtype}
    with init_empty_weights(include_buffers=False), _no_init_weights():
        return AutoModelForCausalLM.from_config(config, **kwargs)
