"""Perplexity, the GPTQ paper's protocol (docs/benchmarks.md).

The evaluation text is tokenized once without special tokens and cut into non-overlapping windows of ``seqlen``
tokens (a trailing partial window is dropped); the first ``max_windows`` are scored. Families that need it
(Gemma) get BOS prepended to every window; BOS itself is never scored. ppl = exp(total NLL / predicted tokens),
with the NLL from an fp32 log-softmax of the logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantlm.errors import DataSourceError
from quantlm.models.context import check_context

_BOS_FAMILIES = ("gemma",)


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # total negative log-likelihood, nats
    tokens: int  # predicted (scored) tokens
    windows: int
    seqlen: int

    def to_dict(self) -> dict:
        return asdict(self)


def needs_bos(model) -> bool:
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    return model_type.startswith(_BOS_FAMILIES)


def eval_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] from a 1-D token tensor, at most ``max_windows`` of them."""
    n = tokens.numel() // seqlen
    if max_windows is not None and max_windows > 0:
        n = min(n, max_windows)
    if n == 0:
        raise DataSourceError(f"the text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    return tokens[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity_of_windows(
    model, windows: torch.Tensor, *, bos_token_id: int | None = None, progress: bool = True
) -> PerplexityResult:
    """Score each row of ``windows`` as one sequence; with ``bos_token_id`` every row is prefixed by BOS."""
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    for row in tqdm(windows, desc="perplexity", unit="window", disable=not progress, leave=False):
        ids = row.unsqueeze(0)
        if bos_token_id is not None:
            ids = torch.cat([torch.tensor([[bos_token_id]]), ids], dim=1)
        ids = ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
        targets = ids[0, 1:]
        total_nll += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        total_tokens += targets.numel()
    return PerplexityResult(
        ppl=math.exp(total_nll / total_tokens),
        nll=total_nll,
        tokens=total_tokens,
        windows=windows.shape[0],
        seqlen=windows.shape[1],
    )


def perplexity(
    model,
    tokenizer,
    text: str,
    *,
    seqlen: int = 2048,
    max_windows: int | None = 32,
    add_bos: bool | None = None,
    progress: bool = True,
) -> PerplexityResult:
    from quantlm.data.calibration import tokenize_text

    windows = eval_windows(tokenize_text(tokenizer, text), seqlen, max_windows)
    if add_bos is None:
        add_bos = needs_bos(model)
    check_context(model.config, seqlen + int(bool(add_bos)), f"--seqlen {seqlen}" + (" plus BOS" if add_bos else ""))
    bos = None
    if add_bos:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise DataSourceError("this model needs a BOS token for evaluation but its tokenizer has none")
    return perplexity_of_windows(model, windows, bos_token_id=bos, progress=progress)
