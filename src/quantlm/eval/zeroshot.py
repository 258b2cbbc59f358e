"""Zero-shot multiple-choice accuracy by log-likelihood, scored the way the lm-evaluation-harness scores it.

For every choice of a question the model reads ``context + continuation`` once; the choice's score is the summed
log-probability of the continuation's tokens. Tokenization follows lm-eval's causal models: spaces at the end of
the context move to the continuation, the whole text is encoded and the context's own encoding is cut off its
front (the tokenizer's default special tokens, as lm-eval's ``add_bos_token`` default leaves them). ``acc`` is the
fraction of questions whose best choice is the right one; ``acc_norm`` picks by score per character of the choice.
Ties go to the first choice (``argmax``), as in lm-eval.

Speed on CPUs: requests are sorted by length and batched by a token budget; padding goes on the right (causal
attention never looks at it, so no mask is needed), and the output head runs only at the positions that predict
continuation tokens (the head of a 49k-token vocabulary is a fifth of a small model's work per position).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantlm.errors import DataSourceError
from quantlm.eval.tasks import Question, load_questions, resolve_task
from quantlm.models.context import context_length

DEFAULT_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class TaskResult:
    task: str
    n: int
    acc: float
    acc_stderr: float
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    seconds: float = 0.0
    requests: int = 0  # (context, continuation) pairs scored
    tokens: int = 0  # tokens the model read (choices that feed it the same ids are read once)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "task"}


@dataclass(frozen=True)
class Request:
    """One (context, continuation) pair as token ids."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.context + self.continuation


def encode_pair(tokenizer, context: str, continuation: str) -> Request:
    """lm-eval's split of ``context + continuation`` into token ids (trailing context spaces move right)."""
    if not continuation.strip() and not context.strip():
        raise DataSourceError("a question has an empty context and an empty choice: there is nothing to score")
    if not context:  # condition on the BOS (or end-of-text) token, as lm-eval does
        ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return Request((prefix,), tuple(ids)) if ids[0] != prefix else Request(tuple(ids[:1]), tuple(ids[1:]))
    stripped = context.rstrip()
    if stripped != context:
        continuation = context[len(stripped) :] + continuation
        context = stripped
    whole = tokenizer(context + continuation)["input_ids"]
    head = tokenizer(context)["input_ids"]
    if not whole[len(head) :]:
        raise DataSourceError(f"a continuation encodes to no tokens after its context: {continuation!r}")
    return Request(tuple(head), tuple(whole[len(head) :]))


def _fit(request: Request, max_tokens: int | None) -> tuple[list[int], int]:
    """The ids the model reads (all but the last token, cut from the left to the model's context) and how many of
    the last positions predict the continuation."""
    if max_tokens is not None and len(request.continuation) > max_tokens:
        raise DataSourceError(
            f"a choice is {len(request.continuation)} tokens long, more than the model's {max_tokens} positions"
        )
    ids = list(request.tokens)[:-1]
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[-max_tokens:]
    return ids, len(request.continuation)


def _head_and_body(model, device):
    """(decoder, output head) when the model's logits are head(decoder(ids)); else None. Checked on a few tokens,
    since some families scale, soft-cap or otherwise change the logits after the head (Cohere, Granite, Gemma)."""
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or head is None or decoder is model:
        return None
    probe = torch.arange(1, 9, device=device).unsqueeze(0)
    expected = model(input_ids=probe, use_cache=False).logits.float()
    got = head(decoder(input_ids=probe, use_cache=False).last_hidden_state).float()
    if got.shape != expected.shape or not torch.allclose(
        got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item()
    ):
        return None
    return decoder, head


def _batches(order: list[int], lengths: list[int], batch_tokens: int):
    """Consecutive runs of ``order`` (longest first) whose padded size stays within ``batch_tokens``."""
    batch: list[int] = []
    for i in order:
        width = lengths[batch[0]] if batch else lengths[i]
        if batch and (len(batch) + 1) * width > batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.no_grad()
def continuation_logprobs(
    model, requests: list[Request], *, batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True, desc=""
) -> tuple[list[float], int]:
    """The summed log-probability of each request's continuation given its context, and the tokens the model read.

    Requests that feed the model the same ids (the choices of a yes/no question: one-token continuations after
    one context) share one row of the batch."""
    device = next(model.parameters()).device
    max_tokens = context_length(model.config) if getattr(model, "config", None) is not None else None
    rows_of: dict[tuple[int, ...], list[int]] = {}  # model input -> the requests it serves
    n_cont = []
    for i, request in enumerate(requests):
        ids, n = _fit(request, max_tokens)
        rows_of.setdefault(tuple(ids), []).append(i)
        n_cont.append(n)
    inputs = list(rows_of)
    lengths = [len(ids) for ids in inputs]
    order = sorted(range(len(inputs)), key=lambda u: -lengths[u])
    split = _head_and_body(model, device)
    scores = [0.0] * len(requests)
    bar = tqdm(total=len(requests), desc=desc or "scoring", unit="choice", disable=not progress, leave=False)
    for batch in _batches(order, lengths, batch_tokens):
        ids = torch.zeros(len(batch), lengths[batch[0]], dtype=torch.long)
        rows, positions, targets, served = [], [], [], []
        for row, u in enumerate(batch):
            ids[row, : lengths[u]] = torch.tensor(inputs[u])
            for i in rows_of[inputs[u]]:
                rows += [row] * n_cont[i]
                positions += range(lengths[u] - n_cont[i], lengths[u])
                targets += requests[i].continuation
                served.append(i)
        ids = ids.to(device)
        rows_t, pos_t = torch.tensor(rows, device=device), torch.tensor(positions, device=device)
        if split is not None:
            decoder, head = split
            logits = head(decoder(input_ids=ids, use_cache=False).last_hidden_state[rows_t, pos_t])
        else:
            logits = model(input_ids=ids, use_cache=False).logits[rows_t, pos_t]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        picked = logprobs.gather(1, torch.tensor(targets, device=device).unsqueeze(1)).squeeze(1).cpu()
        start = 0
        for i in served:
            scores[i] = picked[start : start + n_cont[i]].sum().item()
            start += n_cont[i]
        bar.update(len(served))
    bar.close()
    return scores, sum(lengths)


def _mean_and_stderr(hits: list[bool]) -> tuple[float, float]:
    n = len(hits)
    mean = sum(hits) / n
    # lm-eval's stderr of a mean: the sample standard deviation over sqrt(n)
    stderr = math.sqrt(sum((h - mean) ** 2 for h in hits) / (n - 1) / n) if n > 1 else 0.0
    return mean, stderr


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


@dataclass
class _Tally:
    acc: list[bool] = field(default_factory=list)
    acc_norm: list[bool] = field(default_factory=list)


def score_questions(
    model,
    tokenizer,
    questions: list[Question],
    *,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = True,
    desc: str = "",
) -> tuple[_Tally, list[float], int]:
    """Right/wrong per question by raw and by length-normalised log-likelihood; also every choice's log-likelihood
    (questions in order, choices in order) and the tokens the model read."""
    requests: list[Request] = []
    for q in questions:
        requests += [encode_pair(tokenizer, c, k) for c, k in zip(q.contexts, q.continuations)]
    scores, tokens = continuation_logprobs(model, requests, batch_tokens=batch_tokens, progress=progress, desc=desc)
    tally = _Tally()
    start = 0
    for q in questions:
        lls = scores[start : start + len(q.contexts)]
        start += len(q.contexts)
        tally.acc.append(_argmax(lls) == q.gold)
        tally.acc_norm.append(_argmax([ll / max(len(t), 1) for ll, t in zip(lls, q.choice_texts)]) == q.gold)
    return tally, scores, tokens


def evaluate_task(
    model,
    tokenizer,
    name: str,
    *,
    limit: int | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = True,
) -> TaskResult:
    """Zero-shot accuracy of ``model`` on the first ``limit`` validation documents of task ``name`` (all when
    ``limit`` is None or 0)."""
    task = resolve_task(name)
    questions = load_questions(task.name, limit or None)
    if not questions:
        raise DataSourceError(f"task {task.name} has no documents to score")
    t0 = time.perf_counter()
    tally, scores, n_tokens = score_questions(
        model, tokenizer, questions, batch_tokens=batch_tokens, progress=progress, desc=name
    )
    acc, acc_se = _mean_and_stderr(tally.acc)
    norm, norm_se = _mean_and_stderr(tally.acc_norm) if "acc_norm" in task.metrics else (None, None)
    return TaskResult(
        task=task.name,
        n=len(questions),
        acc=acc,
        acc_stderr=acc_se,
        acc_norm=norm,
        acc_norm_stderr=norm_se,
        seconds=time.perf_counter() - t0,
        requests=len(scores),
        tokens=n_tokens,
    )


def evaluate_tasks(
    model,
    tokenizer,
    names: list[str],
    *,
    limit: int | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = True,
) -> dict[str, TaskResult]:
    """:func:`evaluate_task` for each name, in order."""
    return {
        name: evaluate_task(model, tokenizer, name, limit=limit, batch_tokens=batch_tokens, progress=progress)
        for name in names
    }


def format_task_table(results: dict[str, TaskResult]) -> str:
    """A Markdown table of task results (accuracy in %, with lm-eval's standard error) and their mean acc."""
    lines = ["| task | n | acc | acc_norm |", "|---|---|---|---|"]
    for name, r in results.items():
        norm = f"{100 * r.acc_norm:.2f} ± {100 * r.acc_norm_stderr:.2f}" if r.acc_norm is not None else "-"
        lines.append(f"| {name} | {r.n} | {100 * r.acc:.2f} ± {100 * r.acc_stderr:.2f} | {norm} |")
    if len(results) > 1:
        mean = sum(r.acc for r in results.values()) / len(results)
        lines.append(f"| mean | | {100 * mean:.2f} | |")
    return "\n".join(lines)
