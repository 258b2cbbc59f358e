"""Quantized KV cache: keys and values stored as low-bit codes with one scale per token and head.

What is quantized is what a KV cache holds: the keys after the rotary embedding and the values, each
``[batch, kv_heads, tokens, head_dim]``, with one grid per (token, head) from ``quantlm.core.activation``'s
per-token grids (symmetric MinMax by default, as LLM-QAT). Two ways to apply it, with the same numbers:

- real (inference): :class:`QuantizedKVCache`, a transformers ``Cache`` that keeps the codes (packed two per
  byte at 4 bits) and fp32 scales, and hands attention the dequantized keys and values. Every token's keys are
  quantized before any query reads them, the current token's too, so a single forward over a whole sequence
  (perplexity) and token-by-token generation see the same keys. :func:`enable_kv_quantization` makes a model
  use it for every forward and ``generate`` call that does not bring a quantized cache of its own;
- fake (training, and evaluating a fake-quantized model): the attention function ``quantlm_fake_kv`` rounds the
  keys and values onto the same grids with a straight-through gradient, then runs SDPA. No cache is involved, so
  it works with gradient checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from quantlm.core.activation import (
    check_token_bits,
    dequantize_per_token,
    fake_quantize_per_token,
    quantize_per_token,
)
from quantlm.core.packing import pack, unpack
from quantlm.errors import InvalidSpecError, QuantlmError

FAKE_KV_ATTENTION = "quantlm_fake_kv"


@dataclass(frozen=True)
class KVQuantConfig:
    """How the KV cache is quantized: ``bits`` (2..8; 8 and 4 are the usual) and a symmetric or asymmetric grid."""

    bits: int = 8
    symmetric: bool = True

    def __post_init__(self) -> None:
        try:
            check_token_bits(self.bits)
        except ValueError:
            raise InvalidSpecError(
                f"KV-cache bits must be between 2 and 8 (e.g. --kv-bits 8 or 4), got {self.bits!r}"
            ) from None
        if not isinstance(self.symmetric, bool):
            raise InvalidSpecError(f"KV-cache symmetric must be True or False, got {self.symmetric!r}")

    def to_dict(self) -> dict:
        return {"bits": self.bits, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, d: dict) -> KVQuantConfig:
        if not isinstance(d, dict) or set(d) - {"bits", "symmetric"}:
            raise InvalidSpecError(f"a KV-cache setting is a dict with 'bits' and 'symmetric', got {d!r}")
        return cls(**d)

    def describe(self) -> str:
        return f"kv{self.bits} per-token {'sym' if self.symmetric else 'asym'}"


# ---------------------------------------------------------------------------------------------- the real cache
@dataclass
class _Codes:
    codes: Tensor  # uint8 [b, h, t, packed head_dim]
    scale: Tensor  # fp32 [b, h, t, 1]
    zero: Tensor | None  # fp32 [b, h, t, 1] (asymmetric grids only)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)


def _encode(x: Tensor, config: KVQuantConfig) -> _Codes:
    codes, scale, zero = quantize_per_token(x, config.bits, config.symmetric)
    if config.bits < 8:
        codes = pack(codes, config.bits)
    return _Codes(codes, scale, None if config.symmetric else zero)


def _decode(c: _Codes, config: KVQuantConfig, head_dim: int, dtype: torch.dtype) -> Tensor:
    codes = unpack(c.codes, config.bits, head_dim) if config.bits < 8 else c.codes
    zero = c.zero if c.zero is not None else torch.full_like(c.scale, float(1 << (config.bits - 1)))
    return dequantize_per_token(codes, c.scale, zero, dtype)


def _append(old: _Codes | None, new: _Codes) -> _Codes:
    if old is None:
        return new
    cat = partial(torch.cat, dim=-2)
    return _Codes(
        cat([old.codes, new.codes]),
        cat([old.scale, new.scale]),
        None if new.zero is None else cat([old.zero, new.zero]),
    )


def _layer_class():
    from transformers.cache_utils import DynamicLayer

    class QuantizedKVLayer(DynamicLayer):
        """One decoder layer's keys and values as codes; ``keys``/``values`` stay empty placeholders."""

        def __init__(self, config: KVQuantConfig) -> None:
            super().__init__()
            self.config = config
            self.qkeys: _Codes | None = None
            self.qvalues: _Codes | None = None
            self.head_dim = 0
            self.dtype = torch.float32

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.head_dim = key_states.shape[-1]
                self.dtype = key_states.dtype
            self.qkeys = _append(self.qkeys, _encode(key_states, self.config))
            self.qvalues = _append(self.qvalues, _encode(value_states, self.config))
            return self.dequantized()

        def dequantized(self) -> tuple[Tensor, Tensor]:
            keys = _decode(self.qkeys, self.config, self.head_dim, self.dtype)
            values = _decode(self.qvalues, self.config, self.head_dim, self.dtype)
            return keys, values

        def get_seq_length(self) -> int:
            return 0 if self.qkeys is None else self.qkeys.scale.shape[-2]

        def reset(self) -> None:
            self.qkeys = self.qvalues = None
            super().reset()

        def crop(self, max_length: int) -> None:
            raise QuantlmError("a quantized KV cache cannot be cropped (assisted decoding is not supported with it)")

        def reorder_cache(self, beam_idx: Tensor) -> None:
            for c in (self.qkeys, self.qvalues):
                if c is not None:
                    for name in ("codes", "scale", "zero"):
                        t = getattr(c, name)
                        if t is not None:
                            setattr(c, name, t.index_select(0, beam_idx.to(t.device)))

        def nbytes(self) -> int:
            return sum(c.nbytes() for c in (self.qkeys, self.qvalues) if c is not None)

    return QuantizedKVLayer


def quantized_kv_cache(config: KVQuantConfig):
    """A fresh, empty quantized KV cache (a transformers ``Cache``) that grows a layer per decoder layer."""
    from transformers.cache_utils import Cache

    class QuantizedKVCache(Cache):
        def __init__(self) -> None:
            super().__init__(layer_class_to_replicate=partial(_layer_class(), config))
            self.kv_config = config

        def nbytes(self) -> int:
            """Bytes held by the codes and scales of every layer."""
            return sum(layer.nbytes() for layer in self.layers)

    return QuantizedKVCache()


def is_quantized_kv_cache(cache) -> bool:
    return getattr(cache, "kv_config", None) is not None


def kv_cache_nbytes(cache) -> int:
    """Bytes held by a cache's keys and values: codes and scales for a quantized cache, the tensors otherwise."""
    if is_quantized_kv_cache(cache):
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------- wiring a model
def _decoder(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    if base is model and hasattr(model, "model"):
        base = model.model
    return base


def _inject_cache(module, args, kwargs):
    config: KVQuantConfig = module.quantlm_kv_config
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if is_quantized_kv_cache(cache):
        return args, kwargs
    if cache is not None and cache.get_seq_length() > 0:
        raise QuantlmError("this model quantizes its KV cache: start generation without a pre-filled float cache")
    if getattr(cache, "is_compileable", False):
        raise QuantlmError("a quantized KV cache is dynamic: drop --compile (static cache) for this model")
    kwargs.pop("past_key_values", None)
    kwargs["cache"] = quantized_kv_cache(config)
    kwargs["use_cache"] = True
    return args, kwargs


def enable_kv_quantization(model: nn.Module, config: KVQuantConfig | None) -> nn.Module:
    """Make every forward of ``model`` keep its KV cache quantized with ``config`` (None: undo). The setting is
    recorded as ``model.quantlm_kv_config`` (saved with quantlm checkpoints)."""
    decoder = _decoder(model)
    handle = getattr(decoder, "_quantlm_kv_hook", None)
    if handle is not None:
        handle.remove()
        decoder._quantlm_kv_hook = None
    model.quantlm_kv_config = config
    if config is None:
        return model
    decoder.quantlm_kv_config = config
    decoder._quantlm_kv_hook = decoder.register_forward_pre_hook(_inject_cache, with_kwargs=True)
    return model


# ---------------------------------------------------------------------------------------------- the fake path
def _fake_kv_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config: KVQuantConfig | None = getattr(module, "quantlm_kv_config", None)
    if config is not None:
        key = fake_quantize_per_token(key, config.bits, config.symmetric)
        value = fake_quantize_per_token(value, config.bits, config.symmetric)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_fake_kv_attention() -> str:
    """Register the ``quantlm_fake_kv`` attention function (SDPA on fake-quantized keys and values) with
    transformers; return its name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(FAKE_KV_ATTENTION, _fake_kv_attention)
    AttentionMaskInterface.register(FAKE_KV_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return FAKE_KV_ATTENTION


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that call the attention function: the ones with a ``layer_idx`` and a key projection."""
    return [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx")
        and any(hasattr(m, n) for n in ("k_proj", "key", "qkv_proj", "query_key_value", "c_attn"))
    ]


def enable_fake_kv_quantization(model: nn.Module, config: KVQuantConfig | None) -> nn.Module:
    """Fake-quantize keys and values in every attention module of ``model`` (None: undo)."""
    modules = attention_modules(model)
    if config is not None and not modules:
        raise QuantlmError(f"found no attention modules in {type(model).__name__} to quantize the KV cache of")
    for m in modules:
        m.quantlm_kv_config = config
    if config is not None:
        model.set_attn_implementation(register_fake_kv_attention())
    else:
        model.set_attn_implementation("sdpa")
    model.quantlm_fake_kv_config = config
    return model
