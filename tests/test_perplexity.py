"""Perplexity: the protocol's windows, BOS handling, and agreement with transformers' own loss."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import SAMPLE_TEXT, tiny_model
from quantlm.data import tokenize_text
from quantlm.errors import DataSourceError
from quantlm.eval import needs_bos, perplexity


def _hf_reference(model, windows, bos=None):
    nll, count = 0.0, 0
    for row in windows:
        ids = row.unsqueeze(0) if bos is None else torch.cat([torch.tensor([[bos]]), row.unsqueeze(0)], 1)
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        nll += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(nll / count), count


def test_matches_transformers_loss_on_non_overlapping_windows(tokenizer):
    model = tiny_model("llama")
    tokens = tokenize_text(tokenizer, SAMPLE_TEXT)
    result = perplexity(model, tokenizer, SAMPLE_TEXT, seqlen=64, max_windows=5, progress=False)
    ref, count = _hf_reference(model, tokens[: 5 * 64].view(5, 64))
    assert result.windows == 5 and result.tokens == count == 5 * 63
    assert result.ppl == pytest.approx(ref, rel=1e-5)


def test_all_windows_and_trailing_partial_window_dropped(tokenizer):
    model = tiny_model("llama")
    n_tokens = tokenize_text(tokenizer, SAMPLE_TEXT).numel()
    result = perplexity(model, tokenizer, SAMPLE_TEXT, seqlen=100, max_windows=None, progress=False)
    assert result.windows == n_tokens // 100


def test_gemma_gets_bos_on_every_window_and_bos_is_not_scored(tokenizer):
    model = tiny_model("gemma3_text")
    assert needs_bos(model) and not needs_bos(tiny_model("llama"))
    tokens = tokenize_text(tokenizer, SAMPLE_TEXT)
    result = perplexity(model, tokenizer, SAMPLE_TEXT, seqlen=32, max_windows=3, progress=False)
    ref, count = _hf_reference(model, tokens[:96].view(3, 32), bos=tokenizer.bos_token_id)
    assert result.tokens == count == 3 * 32
    assert result.ppl == pytest.approx(ref, rel=1e-5)


def test_text_shorter_than_a_window_is_a_clear_error(tokenizer):
    with pytest.raises(DataSourceError, match="fewer than one window"):
        perplexity(tiny_model("llama"), tokenizer, "short", seqlen=64, progress=False)
