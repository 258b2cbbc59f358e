"""Speed and memory of a model, the protocol of docs/benchmarks.md.

- Prefill: batch 1, a 2048-token prompt of enwiki eval text, one forward that returns only the last position's
  logits (as ``generate`` does); tokens/s.
- Decode: batch 1, a 128-token prompt, 128 new tokens, greedy, through ``model.generate``; tokens/s of the new
  tokens after the first (the first comes out of the prompt's prefill), timed token by token by a streamer.
- Each is repeated after one untimed warm-up run; the report gives the median and every run.
- Weight bytes as stored, the process's peak resident set size, and the memory bandwidth this machine reaches
  reading a large buffer, which bounds decode speed: every new token reads every weight once.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from quantlm.errors import QuantlmError
from quantlm.generation import generation_kwargs
from quantlm.models.context import check_context
from quantlm.nn.inference import bytes_read_per_token, weight_bytes
from quantlm.nn.qlinear import QuantLinear


@dataclass
class SpeedReport:
    prefill_tokens: int
    prefill_tok_s: float
    prefill_runs: list[float]
    decode_prompt: int
    decode_tokens: int
    decode_tok_s: float
    decode_runs: list[float]
    weight_bytes: dict[str, int]
    bytes_per_token: int  # weights read per decoded token (quantlm.nn.inference.bytes_read_per_token; no KV cache)
    bandwidth_gb_s: float
    decode_bound_tok_s: float  # bandwidth / bytes_per_token
    peak_rss_gb: float
    threads: int
    dtype: str
    compiled: bool
    prefill_dtype: str = ""  # the dtype prefill was timed in, where it differs from decoding's
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def peak_rss_gb() -> float:
    """This process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024**3 if sys.platform == "darwin" else 1024**2)


def memory_bandwidth_gb_s(megabytes: int = 512, repeats: int = 5) -> float:
    """Read bandwidth: the median rate of summing a ``megabytes`` fp32 buffer (larger than any cache)."""
    buf = torch.ones(megabytes * 2**20 // 4)
    buf.sum()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        rates.append(buf.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def prompt_ids(tokenizer, n_tokens: int, text: str = "enwiki") -> torch.Tensor:
    """[1, n_tokens] token ids from the start of ``text``'s eval split (the protocol's text by default)."""
    from quantlm.data import load_text, tokenize_text

    tokens = tokenize_text(tokenizer, load_text(text, "eval"))
    if tokens.numel() < n_tokens:
        raise QuantlmError(f"the text {text} has only {tokens.numel()} tokens, fewer than the {n_tokens} asked for")
    return tokens[:n_tokens].unsqueeze(0)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _last_logits_forward(model: nn.Module, ids: torch.Tensor) -> None:
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    except TypeError:  # families whose forward has no logits_to_keep
        model(input_ids=ids, use_cache=False)


def time_prefill(model: nn.Module, ids: torch.Tensor, repeats: int = 3) -> list[float]:
    """Prompt tokens/s of ``repeats`` timed forwards (after one warm-up), under ``torch.no_grad`` as ``generate``
    runs them (inference-mode tensors keep no version counter, which the int8 kernel needs to share one quantized
    input between the Linears it feeds)."""
    ids = ids.to(_device(model))
    rates = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            _last_logits_forward(model, ids)
            if i:
                rates.append(ids.shape[1] / (time.perf_counter() - t0))
    return rates


class _TokenClock:
    """A streamer for ``generate`` that notes the time each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_decode(
    model: nn.Module, ids: torch.Tensor, new_tokens: int = 128, repeats: int = 3, compile: bool = False
) -> list[float]:
    """New tokens/s (after the first) of ``repeats`` greedy generations of ``new_tokens`` (after one warm-up)."""
    if new_tokens < 2:
        raise QuantlmError(f"decode timing needs at least 2 new tokens, got {new_tokens}")
    ids = ids.to(_device(model))
    kwargs = generation_kwargs(model, compile)
    rates = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            clock = _TokenClock()
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                streamer=clock,
                **kwargs,
            )
            if i:
                rates.append((len(clock.times) - 1) / (clock.times[-1] - clock.times[0]))
    return rates


def _dtype_name(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


def measure_speed(
    model: nn.Module,
    tokenizer,
    *,
    prefill_tokens: int = 2048,
    decode_prompt: int = 128,
    decode_tokens: int = 128,
    repeats: int = 3,
    compile: bool = False,
    text: str = "enwiki",
    before_decode: Callable[[nn.Module], None] | None = None,
) -> SpeedReport:
    """Prefill and decode speed of ``model`` per the protocol, with its weight bytes and the bandwidth bound.
    ``before_decode`` runs between the two measurements (e.g. ``quantlm.api.recast`` to decode in another dtype)."""
    if repeats < 1:
        raise QuantlmError(f"repeats must be at least 1, got {repeats}")
    check_context(model.config, prefill_tokens, f"--prefill-tokens {prefill_tokens}")
    check_context(model.config, decode_prompt + decode_tokens, "--decode-prompt plus --decode-tokens")
    ids = prompt_ids(tokenizer, max(prefill_tokens, decode_prompt), text)
    prefill = time_prefill(model, ids[:, :prefill_tokens], repeats)
    prefill_dtype = _dtype_name(model)
    if before_decode is not None:
        before_decode(model)
    decode = time_decode(model, ids[:, :decode_prompt], decode_tokens, repeats, compile)
    sizes = weight_bytes(model)
    sizes["quantized_linear_bf16"] = sum(
        2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear)
    )
    peak = peak_rss_gb()  # before the bandwidth probe, whose 512 MB buffer is not the model's
    bandwidth = memory_bandwidth_gb_s()
    per_token = bytes_read_per_token(model)
    return SpeedReport(
        prefill_tokens=prefill_tokens,
        prefill_tok_s=statistics.median(prefill),
        prefill_runs=prefill,
        decode_prompt=decode_prompt,
        decode_tokens=decode_tokens,
        decode_tok_s=statistics.median(decode),
        decode_runs=decode,
        weight_bytes=sizes,
        bytes_per_token=per_token,
        bandwidth_gb_s=bandwidth,
        decode_bound_tok_s=bandwidth * 1e9 / per_token,
        peak_rss_gb=peak,
        threads=torch.get_num_threads(),
        dtype=_dtype_name(model),
        compiled=compile,
        prefill_dtype=prefill_dtype,
    )
