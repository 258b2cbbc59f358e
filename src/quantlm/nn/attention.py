"""Attention for inference on the CPU: short queries (decode) in fp32, everything else as transformers' SDPA.

PyTorch's CPU flash-attention kernel is several times slower in bf16/fp16 than in fp32 for the one-row queries of
decoding (measured here, torch 2.13, AVX-512 BF16: about 190 us against 40 us per call for SmolLM2's 9 query heads
over 160 cached tokens; docs/inference.md). So ``quantlm_sdpa`` casts a short query and its keys and values to
fp32, runs transformers' own SDPA attention on them and casts the result back. Longer queries (prefill, where the
bf16 kernel is as fast) and every non-CPU device go straight to transformers' SDPA attention. The numbers are the
same attention in a wider dtype: nothing is approximated.

``use_attention(model, name)`` switches a loaded model: ``auto`` takes ``quantlm_sdpa`` for a CPU model in bf16 or
fp16 that runs transformers' SDPA, can switch, and passes a one-off probe: under a probe name whose function *is*
transformers' SDPA, a short forward must call that function and give bit-identical logits. A family whose
modeling code does more than look up the attention function by name (it branches on the name "sdpa", or refuses
an unknown one) fails the probe and is left as it is. The probe judges what the code does, not what its source
says, so it holds when a transformers release moves such a test. ``sdpa`` and ``eager`` are transformers' own.
Every decode step casts the cached keys and values to fp32; that was measured at a few hundred cached tokens, and
a very long context may gain less (``--attention sdpa`` turns it off).
"""

from __future__ import annotations

import torch
from torch import nn

from quantlm.errors import QuantlmError

FAST_ATTENTION = "quantlm_sdpa"
ATTENTION_CHOICES = ("auto", FAST_ATTENTION, "sdpa", "eager")
SHORT_QUERY = 16  # queries of at most this many tokens (decode steps) run in fp32 on the CPU


def _takes_fp32_path(query: torch.Tensor) -> bool:
    return (
        query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16) and query.shape[-2] <= SHORT_QUERY
    )


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


PROBE_ATTENTION = "quantlm_probe"  # transformers' SDPA under another name: what a family does with a new name
_PROBE_TOKENS = 5
_probe_calls = 0


def _probe_attention(module, query, key, value, attention_mask, **kwargs):
    global _probe_calls
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _probe_calls += 1
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _probe_key(model: nn.Module) -> tuple:
    config = model.config
    to_json = getattr(config, "to_json_string", None)
    return type(model), to_json(use_diff=False) if to_json else repr(config)


_PROBE_RESULTS: dict[tuple, bool] = {}


def switches_cleanly(model: nn.Module) -> bool:
    """Whether the model computes exactly the same logits when SDPA runs under another attention name, calling it
    in its attention layers (a one-off probe on a few tokens, remembered per model class and config). A model that
    raises, never calls the function, or changes its output, branches on the name and is not switched by ``auto``."""
    key = _probe_key(model)
    if key not in _PROBE_RESULTS:
        _PROBE_RESULTS[key] = _run_probe(model)
    return _PROBE_RESULTS[key]


def _run_probe(model: nn.Module) -> bool:
    global _probe_calls
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PROBE_ATTENTION, _probe_attention)
    AttentionMaskInterface.register(PROBE_ATTENTION, sdpa_mask)
    params = next(model.parameters())
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        return False
    ids = torch.arange(1, _PROBE_TOKENS + 1, device=params.device).remainder(vocab).unsqueeze(0)
    original = model.config._attn_implementation
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = model(ids, use_cache=False).logits
            model.set_attn_implementation(PROBE_ATTENTION)
            if model.config._attn_implementation != PROBE_ATTENTION:
                return False
            _probe_calls = 0
            probed = model(ids, use_cache=False).logits
            return _probe_calls > 0 and torch.equal(reference, probed)
    except Exception:  # noqa: BLE001 - any failure under another name means: leave the model as it is
        return False
    finally:
        try:
            model.set_attn_implementation(original)
        finally:
            model.train(was_training)


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
        half_on_cpu = (
            params is not None
            and params.device.type == "cpu"
            and any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())
        )
        can_switch = getattr(model, "_can_set_attn_implementation", lambda: True)()
        if not half_on_cpu or current != "sdpa" or not can_switch or not switches_cleanly(model):
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
