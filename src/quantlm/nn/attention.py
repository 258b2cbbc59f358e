"""Attention for inference on the CPU: short queries (decode) in fp32, everything else as transformers' SDPA.

PyTorch's CPU flash-attention kernel is several times slower in bf16/fp16 than in fp32 for the one-row queries of
decoding (measured here, torch 2.13, AVX-512 BF16: about 190 us against 40 us per call for SmolLM2's 9 query heads
over 160 cached tokens; docs/inference.md). So ``quantlm_sdpa`` casts a short query and its keys and values to
fp32, runs transformers' own SDPA attention on them and casts the result back. Longer queries (prefill, where the
bf16 kernel is as fast) and every non-CPU device go straight to transformers' SDPA attention. The numbers are the
same attention in a wider dtype: nothing is approximated.

``use_attention(model, name)`` switches a loaded model: ``auto`` takes ``quantlm_sdpa`` for a CPU model in bf16 or
fp16 and leaves any other model as it is; ``sdpa`` and ``eager`` are transformers' own.
"""

from __future__ import annotations

import torch
from torch import nn

from quantlm.errors import QuantlmError

FAST_ATTENTION = "quantlm_sdpa"
ATTENTION_CHOICES = ("auto", FAST_ATTENTION, "sdpa", "eager")
SHORT_QUERY = 16  # queries of at most this many tokens (decode steps) run in fp32 on the CPU


def fp32_short_query_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, with short half-precision CPU queries computed in fp32 (same signature and
    return as ``transformers.integrations.sdpa_attention.sdpa_attention_forward``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type != "cpu" or query.dtype == torch.float32 or query.shape[-2] > SHORT_QUERY:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def register_attention() -> None:
    """Make ``quantlm_sdpa`` known to transformers (idempotent): the attention function and, for its masks,
    transformers' SDPA mask builder."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FAST_ATTENTION, fp32_short_query_attention)
    AttentionMaskInterface.register(FAST_ATTENTION, sdpa_mask)


def use_attention(model: nn.Module, name: str = "auto") -> str:
    """Set the attention implementation of a loaded transformers model; returns the one it runs with."""
    if name not in ATTENTION_CHOICES:
        raise QuantlmError(f"unknown attention '{name}': choose one of {', '.join(ATTENTION_CHOICES)}")
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if name == "auto":
        params = next(model.parameters(), None)
        half_on_cpu = params is not None and params.device.type == "cpu" and any(
            p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()
        )
        if not half_on_cpu or current != "sdpa":
            return current or "sdpa"
        name = FAST_ATTENTION
    if name == current:
        return name
    if name == FAST_ATTENTION:
        register_attention()
    try:
        model.set_attn_implementation(name)
    except (ValueError, KeyError, AttributeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QuantlmError(f"this model cannot use attention '{name}': {first}") from None
    return name
