"""quantlm_sdpa: decode-step attention of half-precision CPU models in fp32, everything else as transformers' SDPA."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import quantlm
from quantlm.errors import QuantlmError
from quantlm.nn.attention import FAST_ATTENTION, SHORT_QUERY, fp32_short_query_attention, use_attention

from conftest import tiny_model


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def _qkv(q_len, kv_len, dtype):
    g = torch.Generator().manual_seed(q_len * 1000 + kv_len)
    q = torch.randn(1, 4, q_len, 16, generator=g).to(dtype)
    k = torch.randn(1, 2, kv_len, 16, generator=g).to(dtype)
    v = torch.randn(1, 2, kv_len, 16, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("q_len", [1, 3, SHORT_QUERY])
def test_short_half_queries_are_exactly_fp32_sdpa(q_len):
    q, k, v = _qkv(q_len, 40, torch.bfloat16)
    out, _ = fp32_short_query_attention(_Module(), q, k, v, None, scaling=0.25)
    ref, _ = sdpa_attention_forward(_Module(), q.float(), k.float(), v.float(), None, scaling=0.25)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref.to(torch.bfloat16))


def test_short_queries_take_a_float_mask_in_fp32():
    q, k, v = _qkv(1, 12, torch.bfloat16)
    mask = torch.zeros(1, 1, 1, 12, dtype=torch.bfloat16)
    mask[..., :4] = torch.finfo(torch.bfloat16).min  # the first 4 keys masked out
    out, _ = fp32_short_query_attention(_Module(), q, k, v, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(_Module(), q.float(), k[:, :, 4:].float(), v[:, :, 4:].float(), None, scaling=0.25)
    torch.testing.assert_close(out.float(), ref.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("q_len, dtype", [(SHORT_QUERY + 1, torch.bfloat16), (1, torch.float32), (64, torch.float32)])
def test_long_or_fp32_queries_are_transformers_sdpa_unchanged(q_len, dtype):
    q, k, v = _qkv(q_len, max(q_len, 40), dtype)
    out, _ = fp32_short_query_attention(_Module(), q, k, v, None, scaling=0.25)
    ref, _ = sdpa_attention_forward(_Module(), q, k, v, None, scaling=0.25)
    assert torch.equal(out, ref)


def _saved(tmp_path):
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    return path


def test_load_picks_the_attention_by_device_and_dtype(tmp_path):
    path = _saved(tmp_path)
    assert quantlm.load(path, dtype=torch.bfloat16).config._attn_implementation == FAST_ATTENTION
    assert quantlm.load(path, dtype=torch.float32).config._attn_implementation == "sdpa"
    assert quantlm.load(path, dtype=torch.bfloat16, attention="sdpa").config._attn_implementation == "sdpa"
    assert quantlm.load(path, dtype=torch.float32, attention="eager").config._attn_implementation == "eager"
    with pytest.raises(QuantlmError, match="unknown attention 'flash'"):
        quantlm.load(path, attention="flash")


def test_decoding_with_fp32_attention_stays_as_close_to_fp32_as_bf16_sdpa(tmp_path):
    """Same greedy text as transformers' bf16 SDPA on a tiny model, and decode-step logits as close to the fp32
    model's as bf16 rounding allows (both about 1% here; which one is closer is up to that rounding)."""
    path = _saved(tmp_path)
    ids = torch.tensor([[5, 80, 17, 200, 33, 9, 41, 120]])
    fp32 = quantlm.load(path, dtype=torch.float32)
    fast = quantlm.load(path, dtype=torch.bfloat16)
    plain = quantlm.load(path, dtype=torch.bfloat16, attention="sdpa")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=258)
    with torch.no_grad():
        assert torch.equal(fast.generate(ids, **kwargs), plain.generate(ids, **kwargs))
    errors = {}
    for name, model in (("fast", fast), ("plain", plain)):
        with torch.no_grad():
            out = model(ids[:, :-1], use_cache=True)
            step = model(ids[:, -1:], past_key_values=out.past_key_values).logits.float()
            ref_out = fp32(ids[:, :-1], use_cache=True)
            ref = fp32(ids[:, -1:], past_key_values=ref_out.past_key_values).logits
        errors[name] = float((step - ref).norm() / ref.norm())
    assert errors["fast"] < 3e-2 and errors["fast"] < 1.5 * errors["plain"], errors


def test_use_attention_leaves_a_non_sdpa_model_alone_under_auto():
    model = tiny_model("llama").to(torch.bfloat16)
    model.set_attn_implementation("eager")
    assert use_attention(model, "auto") == "eager"
    assert use_attention(model, FAST_ATTENTION) == FAST_ATTENTION
