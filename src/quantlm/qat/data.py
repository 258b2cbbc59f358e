"""Data-free training text: the full-precision model writes its own (LLM-QAT, section 2.1).

Each sample starts from one token drawn uniformly from the vocabulary (special tokens excluded). The next few
tokens (``greedy_tokens``, 3 to 5 in the paper; drawn per sample from a range when one is given) are the model's
top-1 choices, and the rest are sampled from its softmax, until end-of-sequence or ``max_length`` tokens. ``mode``
"greedy" or "sample" makes every step top-1 or sampled, for the paper's ablation.

Samples are generated in batches that all share one length (every sample starts with a single token, so there is
no padding); batch ``i`` draws from ``torch.Generator().manual_seed(seed + i)``, so a run's output does not depend
on how often it was interrupted. The output is a jsonl file, one ``{"id": n, "tokens": [...]}`` per line, with a
``.meta.json`` beside it holding the settings; a rerun with the same settings appends the batches still missing
(a half-written last batch is dropped first). A rerun with a larger ``n_samples`` and otherwise the same settings
extends the file to what a fresh run of that size writes; any other change of settings is an error.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantlm.errors import DataSourceError, InvalidSpecError
from quantlm.models.context import check_context
from quantlm.paths import atomic_write_text, output_lock

MODES = ("hybrid", "greedy", "sample")


@dataclass(frozen=True)
class GenerationSettings:
    n_samples: int = 512
    max_length: int = 512
    greedy_tokens: tuple[int, int] = (3, 5)
    mode: str = "hybrid"
    batch_size: int = 16
    seed: int = 0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        lo, hi = self.greedy_tokens
        if self.n_samples < 1 or self.batch_size < 1:
            raise InvalidSpecError(
                f"--samples and --batch-size must be at least 1, got {self.n_samples} and {self.batch_size}"
            )
        if self.max_length < 2:
            raise InvalidSpecError(f"--max-length must be at least 2 tokens, got {self.max_length}")
        if not 0 <= lo <= hi:
            raise InvalidSpecError(
                f"greedy tokens must be a range lo-hi with 0 <= lo <= hi (such as 3-5), got {lo}-{hi}"
            )
        if self.mode not in MODES:
            raise InvalidSpecError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.temperature > 0:
            raise InvalidSpecError(f"temperature must be positive, got {self.temperature}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["greedy_tokens"] = list(self.greedy_tokens)
        return d


def parse_greedy_tokens(text: str | int) -> tuple[int, int]:
    """'3-5' -> (3, 5); '4' -> (4, 4)."""
    parts = str(text).split("-")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise InvalidSpecError(f"greedy tokens are a count or a range such as 3-5, got {text!r}")
    return (values[0], values[-1])


def start_vocabulary(tokenizer, vocab_size: int) -> Tensor:
    """Token ids a sample may start with: the model's vocabulary less the tokenizer's special tokens."""
    special = set(tokenizer.all_special_ids)
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            special.add(int(i))
    ids = torch.tensor([i for i in range(min(vocab_size, len(tokenizer))) if i not in special], dtype=torch.long)
    if ids.numel() == 0:
        raise DataSourceError("the tokenizer has no ordinary tokens to start a sample with")
    return ids


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else source)
    return ids


def _vocab_size(model: nn.Module) -> int:
    return model.get_input_embeddings().weight.shape[0]


def sample_softmax(logits: Tensor, generator: torch.Generator) -> Tensor:
    """One token per row of ``logits [b, vocab]`` drawn from its softmax (inverse CDF: a cumulative sum and a
    binary search, several times faster than ``torch.multinomial`` over a large vocabulary on a CPU)."""
    cdf = torch.softmax(logits.float(), dim=-1).cumsum_(dim=-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp_(max=cdf.shape[1] - 1)


@torch.no_grad()
def generate_batch(
    model: nn.Module, starts: Tensor, settings: GenerationSettings, eos: set[int], generator: torch.Generator
) -> list[list[int]]:
    """One batch of samples from their first tokens ``starts [b]``; each ends at its first EOS (kept)."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    b = starts.numel()
    lo, hi = settings.greedy_tokens
    greedy_count = torch.randint(lo, hi + 1, (b,), generator=generator)
    tokens = [starts.clone()]
    done = torch.zeros(b, dtype=torch.bool)
    cache = StaticCache(config=model.config, max_cache_len=settings.max_length)  # no per-step copy of the keys
    nxt = starts
    eos_t = torch.tensor(sorted(eos), dtype=torch.long) if eos else None
    for step in range(1, settings.max_length):
        logits = model(input_ids=nxt.view(b, 1).to(device), cache=cache, use_cache=True).logits[:, -1].float().cpu()
        top1 = logits.argmax(dim=-1)
        sampled = sample_softmax(logits / settings.temperature, generator)
        if settings.mode == "greedy":
            nxt = top1
        elif settings.mode == "sample":
            nxt = sampled
        else:
            nxt = torch.where(step <= greedy_count, top1, sampled)
        tokens.append(nxt)
        if eos_t is not None:
            done |= torch.isin(nxt, eos_t)
            if bool(done.all()):
                break
    seqs = torch.stack(tokens, dim=1).tolist()
    out = []
    for row in seqs:
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:cut])
    return out


def _meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def _sample_lines(out: Path) -> tuple[list[str], int]:
    """The well-formed sample lines at the start of ``out`` (ids 0, 1, ...), and how many lines it has in all."""
    if not out.exists():
        return [], 0
    lines = out.read_text(encoding="utf-8").splitlines()
    good = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            break
        if not isinstance(row, dict) or row.get("id") != len(good):
            break
        good.append(line)
    return good, len(lines)


def _complete_lines(out: Path, good: list[str], total: int, settings: GenerationSettings) -> int:
    """Of the sample lines ``good`` in ``out`` (``total`` lines in all, :func:`_sample_lines`), how many a run of
    ``settings`` keeps: all when they are its whole output, else the whole batches; a partial tail is cut off
    (rewritten atomically)."""
    keep = len(good)
    if keep != settings.n_samples:
        keep = (keep // settings.batch_size) * settings.batch_size
    if keep != total:
        atomic_write_text(out, "".join(line + "\n" for line in good[:keep]))
    return keep


def _same_generator(old: dict, new: dict) -> bool:
    """Whether settings ``old`` and ``new`` write the same samples, ``new`` perhaps more of them."""
    return {**old, "n_samples": None} == {**new, "n_samples": None}


def generate_training_data(
    model: nn.Module, tokenizer, out: str | os.PathLike, settings: GenerationSettings, *, progress: bool = True
) -> Path:
    """Write (or complete) ``settings.n_samples`` generated samples to the jsonl file ``out``; return its path.
    The output lock is held throughout: a second run into the same file is refused instead of appending to it."""
    out = Path(out)
    with output_lock(out):
        return _generate_training_data(model, tokenizer, out, settings, progress)


def _generate_training_data(model: nn.Module, tokenizer, out: Path, settings: GenerationSettings, progress: bool):
    check_context(model.config, settings.max_length, f"--max-length {settings.max_length}")
    meta = {
        "settings": settings.to_dict(),
        "model": getattr(model.config, "_name_or_path", ""),
        "vocab_size": _vocab_size(model),
    }
    meta_file = _meta_path(out)
    if out.exists():
        if not meta_file.exists():
            raise DataSourceError(f"{out} exists but was not written by quantlm generate-data: choose another --out")
        try:
            old = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataSourceError(
                f"{meta_file} is unreadable ({e}): delete {out} and it, or choose another --out"
            ) from None
        if not isinstance(old, dict):
            old = {}
        old_settings = old.get("settings")
        if (
            not isinstance(old_settings, dict)
            or not _same_generator(old_settings, meta["settings"])
            or old.get("vocab_size") != meta["vocab_size"]
        ):
            raise DataSourceError(
                f"{out} was generated with other settings ({old_settings}): choose another --out or delete it"
            )
    good, total = _sample_lines(out)
    if len(good) > settings.n_samples:
        raise DataSourceError(
            f"{out} already holds {len(good)} samples, more than --samples {settings.n_samples}: use it as it is, "
            "or choose another --out"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta_file, json.dumps(meta, indent=1) + "\n")
    done = _complete_lines(out, good, total, settings)
    vocab = start_vocabulary(tokenizer, _vocab_size(model))
    eos = eos_ids(model, tokenizer)
    n_batches = -(-settings.n_samples // settings.batch_size)
    was_training = model.training
    model.eval()
    try:
        with (
            open(out, "a", encoding="utf-8") as f,
            tqdm(
                total=settings.n_samples,
                initial=min(done, settings.n_samples),
                desc="generate-data",
                unit="sample",
                disable=not progress,
            ) as bar,
        ):
            for i in range(n_batches if done == settings.n_samples else done // settings.batch_size, n_batches):
                g = torch.Generator().manual_seed(settings.seed + i)
                b = min(settings.batch_size, settings.n_samples - i * settings.batch_size)
                starts = vocab[torch.randint(0, vocab.numel(), (settings.batch_size,), generator=g)][:b]
                rows = generate_batch(model, starts, settings, eos, g)
                first = i * settings.batch_size
                f.write("".join(json.dumps({"id": first + j, "tokens": r}) + "\n" for j, r in enumerate(rows)))
                f.flush()
                os.fsync(f.fileno())
                bar.update(b)
    finally:
        model.train(was_training)
    return out


def read_samples(path: str | os.PathLike) -> list[list[int]]:
    """The token lists of a generated jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"training data file {path} does not exist: write one with quantlm generate-data")
    samples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            tokens = row["tokens"]
        except (ValueError, KeyError, TypeError):
            raise DataSourceError(
                f'{path} line {n} is not a generated sample ({{"id": ..., "tokens": [...]}})'
            ) from None
        samples.append([int(t) for t in tokens])
    if not samples:
        raise DataSourceError(f"{path} holds no samples")
    return samples


def pack_samples(samples: list[list[int]], seqlen: int) -> Tensor:
    """Samples joined end to end and cut into training windows ``[n, seqlen]`` (a partial tail is dropped)."""
    flat = torch.tensor([t for s in samples for t in s], dtype=torch.long)
    n = flat.numel() // seqlen
    if n == 0:
        raise DataSourceError(f"the training data has {flat.numel()} tokens, fewer than one window of {seqlen}")
    return flat[: n * seqlen].view(n, seqlen)
