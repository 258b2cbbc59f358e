"""quantlm_sdpa: decode-step attention of half-precision CPU models in fp32, everything else as transformers' SDPA."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import quantlm
import quantlm.nn.attention as attention
from conftest import tiny_model
from quantlm.errors import QuantlmError
from quantlm.nn.attention import FAST_ATTENTION, SHORT_QUERY, fp32_short_query_attention, use_attention


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def _qkv(q_len, kv_len, dtype):
    g = torch.Generator().manual_seed(q_len * 1000 + kv_len)
    q = torch.randn(1, 4, q_len, 16, generator=g).to(dtype)
    k = torch.randn(1, 2, kv_len, 16, generator=g).to(dtype)
    v = torch.randn(1, 2, kv_len, 16, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize(
    "q_len, dtype", [(1, torch.bfloat16), (3, torch.bfloat16), (SHORT_QUERY, torch.bfloat16), (1, torch.float16)]
)
def test_short_half_queries_are_exactly_fp32_sdpa(q_len, dtype):
    q, k, v = _qkv(q_len, 40, dtype)
    out, _ = fp32_short_query_attention(_Module(), q, k, v, None, scaling=0.25)
    ref, _ = sdpa_attention_forward(_Module(), q.float(), k.float(), v.float(), None, scaling=0.25)
    assert out.dtype == dtype
    assert torch.equal(out, ref.to(dtype))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.bfloat16])
def test_short_queries_take_bool_and_float_masks(mask_dtype):
    q, k, v = _qkv(2, 12, torch.bfloat16)
    keep = torch.ones(1, 1, 2, 12, dtype=torch.bool)
    keep[..., :4] = False  # the first 4 keys masked out
    if mask_dtype == torch.bool:
        mask, fp32_mask = keep, keep
    else:
        mask = torch.zeros(keep.shape, dtype=mask_dtype).masked_fill(~keep, torch.finfo(mask_dtype).min)
        fp32_mask = mask.float()
    out, _ = fp32_short_query_attention(_Module(), q, k, v, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(_Module(), q.float(), k.float(), v.float(), fp32_mask, scaling=0.25)
    assert torch.equal(out, ref.to(torch.bfloat16))
    unmasked, _ = sdpa_attention_forward(
        _Module(), q.float(), k[:, :, 4:].float(), v[:, :, 4:].float(), None, scaling=0.25, is_causal=False
    )
    torch.testing.assert_close(out.float(), unmasked.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)


def test_float_keyword_tensors_are_cast_with_the_query():
    seen = {}

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.update(query=query.dtype, bias=kwargs["position_bias"].dtype)
        return query, None

    q, k, v = _qkv(1, 8, torch.bfloat16)
    import transformers.integrations.sdpa_attention as sdpa

    original = sdpa.sdpa_attention_forward
    sdpa.sdpa_attention_forward = spy
    try:
        fp32_short_query_attention(
            _Module(), q, k, v, None, position_bias=torch.zeros(1, 4, 1, 8, dtype=torch.bfloat16)
        )
    finally:
        sdpa.sdpa_attention_forward = original
    assert seen == {"query": torch.float32, "bias": torch.float32}


@pytest.mark.parametrize(
    "q_len, dtype", [(SHORT_QUERY + 1, torch.bfloat16), (1, torch.float32), (64, torch.float32), (1, torch.float64)]
)
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


def test_bf16_decoding_actually_runs_the_fp32_path(tmp_path, monkeypatch):
    import quantlm.nn.attention as attention

    calls = []
    real = attention._takes_fp32_path
    monkeypatch.setattr(attention, "_takes_fp32_path", lambda q: calls.append(q.shape[-2]) or real(q))
    model = quantlm.load(_saved(tmp_path), dtype=torch.bfloat16)
    with torch.no_grad():
        model.generate(torch.tensor([[5, 80, 17, 200]]), max_new_tokens=3, do_sample=False, pad_token_id=258)
    layers = model.config.num_hidden_layers
    assert calls == [4] * layers + [1] * (2 * layers)  # the prompt, then two decode steps


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


def test_a_model_that_cannot_switch_is_left_alone_or_refused(monkeypatch):
    model = tiny_model("llama").to(torch.bfloat16)
    monkeypatch.setattr(model, "_can_set_attn_implementation", lambda: False)
    monkeypatch.setattr(model, "set_attn_implementation", lambda name: None)  # what transformers does: warn, keep
    assert use_attention(model, "auto") == "sdpa"
    with pytest.raises(QuantlmError, match="cannot use attention 'quantlm_sdpa'"):
        use_attention(model, FAST_ATTENTION)
    with pytest.raises(QuantlmError, match="needs a transformers model"):
        use_attention(torch.nn.Linear(2, 2).to(torch.bfloat16), FAST_ATTENTION)


class _BranchesOnTheName(LlamaForCausalLM):
    """A family whose code does more than look up the attention function: it changes its output for any name but
    "sdpa" (as Falcon's and Gemma 4's code did for some transformers releases)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if self.config._attn_implementation != "sdpa":
            out.logits = out.logits + 1
        return out


def _bf16_sdpa(model):
    model = model.to(torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    return model


def test_auto_leaves_a_family_alone_whose_output_changes_with_the_name():
    model = _bf16_sdpa(_BranchesOnTheName(tiny_model("llama").config))
    assert not attention.switches_cleanly(model)
    assert use_attention(model, "auto") == "sdpa"
    assert model.config._attn_implementation == "sdpa"


def test_auto_leaves_a_family_alone_that_never_calls_the_attention_function(monkeypatch):
    model = _bf16_sdpa(tiny_model("llama"))
    monkeypatch.setattr(attention, "_probe_attention", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    attention._PROBE_RESULTS.clear()
    assert use_attention(model, "auto") == "sdpa"  # the probe raised: leave it
    attention._PROBE_RESULTS.clear()


def test_the_probe_runs_once_per_model_class_and_config(monkeypatch):
    attention._PROBE_RESULTS.clear()
    runs = []
    real = attention._run_probe
    monkeypatch.setattr(attention, "_run_probe", lambda m: runs.append(1) or real(m))
    for _ in range(3):
        model = _bf16_sdpa(tiny_model("llama"))
        assert use_attention(model, "auto") == FAST_ATTENTION
    assert runs == [1]


@pytest.mark.parametrize("family", ["falcon", "gemma3_text", "qwen3", "gpt_neox", "opt"])
def test_auto_switches_a_family_only_where_the_output_stays_the_same(family):
    """Whatever the installed transformers does with a family, ``auto`` must never change what a prefill computes:
    a query longer than SHORT_QUERY runs plain SDPA under either name."""
    if family == "falcon":
        from transformers import FalconConfig, FalconForCausalLM

        model = FalconForCausalLM(
            FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
        )
    else:
        model = tiny_model(family)
    model = _bf16_sdpa(model)
    ids = torch.arange(SHORT_QUERY + 4).remainder(model.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        before = model(ids).logits
        chosen = use_attention(model, "auto")
        after = model(ids).logits
    assert chosen in (FAST_ATTENTION, "sdpa")
    assert (chosen == FAST_ATTENTION) == attention.switches_cleanly(model)
    assert torch.equal(before, after)
