"""Attention for inference on the CPU: short queries (decode) in fp32, everything else as transformers' SDPA.

PyTorch's CPU flash-attention kernel is several times slower in bf16/fp16 than in fp32 for the one-row queries of
decoding (measured here, torch 2.13, AVX-512 BF16: about 190 us against 40 us per call for SmolLM2's 9 query heads
over 160 cached tokens; docs/inference.md). So ``quantlm_sdpa`` casts a short query and its keys and values to
fp32, runs transformers' own SDPA attention on them and casts the result back. Longer queries (prefill, where the
bf16 kernel is as fast) and every non-CPU device go straight to transformers' SDPA attention. The numbers are the
same attention in a wider dtype: nothing is approximated.

``use_attention(model, name)`` switches a loaded model: ``auto`` takes ``quantlm_sdpa`` for a CPU model in bf16 or
fp16 that runs transformers' SDPA and can switch, unless its modeling code tests for the name "sdpa" (Falcon,
Gemma 4), and leaves any other model as it is; ``sdpa`` and ``eager`` are
transformers' own. Every decode step casts the cached keys and values to fp32; that was measured at a few hundred
cached tokens, and a very long context may gain less (``--attention sdpa`` turns it off).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
from torch import nn

from quantlm.errors import QuantlmError

FAST_ATTENTION = "quantlm_sdpa"
ATTENTION_CHOICES = ("auto", FAST_ATTENTION, "sdpa", "eager")
SHORT_QUERY = 16  # queries of at most this many tokens (decode steps) run in fp32 on the CPU


def _takes_fp32_path(query: torch.Tensor) -> bool:
    return query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16) and query.shape[-2] <= SHORT_QUERY


def fp32_short_query_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, with short half-precision CPU queries computed in fp32 (same signature and
    return as ``transformers.integrations.sdpa_attention.sdpa_attention_forward``). Float masks and any float
    tensor among the keyword arguments (e.g. a position bias) are cast along; boolean masks are kept."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _takes_fp32_path(query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    kwargs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def register_attention() -> None:
    """Make ``quantlm_sdpa`` known to transformers (idempotent): the attention function and, for its masks,
    transformers' SDPA mask builder."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FAST_ATTENTION, fp32_short_query_attention)
    AttentionMaskInterface.register(FAST_ATTENTION, sdpa_mask)


@functools.lru_cache(maxsize=None)
def _source_tests_for_sdpa(path: str) -> bool:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return False
    return '_attn_implementation == "sdpa"' in text or '_attn_implementation != "sdpa"' in text


def _modeling_code_tests_for_sdpa(model: nn.Module) -> bool:
    """Whether the model's own transformers code compares its attention name with "sdpa" (Falcon, Gemma 4, ...):
    there another name changes more than the attention function, so ``auto`` leaves such models alone. Each
    modeling file is read once per process."""
    for cls in type(model).__mro__:
        path = getattr(sys.modules.get(cls.__module__), "__file__", None)
        if path and ".models." in cls.__module__ and _source_tests_for_sdpa(path):
            return True
    return False


def check_attention_name(name: str) -> None:
    if name not in ATTENTION_CHOICES:
        raise QuantlmError(f"unknown attention '{name}': choose one of {', '.join(ATTENTION_CHOICES)}")


def use_attention(model: nn.Module, name: str = "auto") -> str:
    """Set the attention implementation of a loaded transformers model; returns the one it runs with (which, for a
    model that cannot switch, stays what it was)."""
    check_attention_name(name)
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if name == "auto":
        params = next(model.parameters(), None)
        half_on_cpu = params is not None and params.device.type == "cpu" and any(
            p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()
        )
        can_switch = getattr(model, "_can_set_attn_implementation", lambda: True)()
        if not half_on_cpu or current != "sdpa" or not can_switch or _modeling_code_tests_for_sdpa(model):
            return current
        name = FAST_ATTENTION
    if name == current:
        return name
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise QuantlmError(f"attention '{name}' needs a transformers model, got {type(model).__name__}")
    if name == FAST_ATTENTION:
        register_attention()
    try:
        model.set_attn_implementation(name)
    except (ValueError, KeyError, AttributeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QuantlmError(f"this model cannot use attention '{name}': {first}") from None
    chosen = model.config._attn_implementation
    if chosen != name:
        raise QuantlmError(f"this model cannot use attention '{name}' (it stays on '{chosen}'): drop --attention")
    return chosen
