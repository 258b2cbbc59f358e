"""Tokenization and calibration sampling per the benchmark protocol."""

from __future__ import annotations

import torch

from quantlm.errors import DataSourceError


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokens: torch.Tensor, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` windows of ``seqlen`` tokens at uniformly random offsets, drawn with a seeded generator.

    Returns a LongTensor [n_samples, seqlen].
    """
    if n_samples < 1 or seqlen < 1:
        raise DataSourceError(
            f"calibration needs at least one sample of at least one token, got {n_samples} x {seqlen}"
        )
    if tokens.numel() < seqlen:
        raise DataSourceError(
            f"the calibration text has {tokens.numel()} tokens, fewer than one window of {seqlen}: "
            "use a smaller --calib-seqlen or more text"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen + 1, (n_samples,), generator=generator)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])
