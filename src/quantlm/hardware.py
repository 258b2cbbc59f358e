"""What this machine computes fast: its CPU's instruction sets, and the dtype a command should compute in.

The machines quantlm runs on differ: without bf16 instructions (AVX2-only CPUs) a bf16 GEMM is several times (up
to ~40x) slower than fp32, because every element is converted; with AVX-512 BF16 or AMX it runs about twice as fast
as fp32. Decoding is different again: one token at a time, a matmul streams its weight from memory, and bf16 halves
the bytes, so it can pay even without bf16 instructions. So no command hard-codes a dtype: ``--dtype auto``
(``choose_dtype``) takes bf16 for work of a given number of rows per matmul only where a one-off micro-benchmark of
such a matmul finds it faster than fp32 (cached under ``$QUANTLM_HOME/hardware``, keyed by the shape, the CPU,
torch's version, the thread count and the ISA overrides ``ONEDNN_MAX_CPU_ISA`` / ``ATEN_CPU_CAPABILITY``); for
many rows on a CPU without native bf16 it takes fp32 without measuring. On CUDA, ``auto`` is bf16 where the GPU
supports it, else fp16 for inference and fp32 for training.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from quantlm.errors import InvalidSpecError
from quantlm.paths import atomic_write_text, quantlm_home

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
TRAIN_DTYPES = ("auto", "bfloat16", "float32")  # autocast dtypes of training (float32: no autocast)
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 (AVX-512 BF16, AMX); Arm ("bf16")
FAST_INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
MIN_BF16_SPEEDUP = 1.1  # auto takes bf16 only if the probe's bf16 GEMM is at least this much faster than fp32
MEMORY_BOUND_ROWS = 4  # up to this many rows a matmul streams its weight from memory (decoding)
MEMORY_BOUND_WEIGHT = (2048, 8192)  # in x out of the decode probe: 64 MB in fp32, beyond the caches
COMPUTE_BOUND_WEIGHT = (1024, 1024)  # in x out of the probe for more rows
PROBE_MAX_ROWS = 512
PROBE_FLOPS = 400_000_000  # work per timed round of the probe
PROBE_VERSION = 2


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (x86 ``flags``, Arm ``Features``); empty where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(
        word
        for line in text.splitlines()
        if line.split(":", 1)[0].strip() in ("flags", "Features")
        for word in line.split(":", 1)[1].split()
    )


def _onednn_bf16() -> bool:
    """Whether torch's oneDNN would run bf16 natively here (it honours ONEDNN_MAX_CPU_ISA); True if unknown."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch build without oneDNN
        return True


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16, AMX or Arm BF16) and torch is allowed to use them."""
    return bool(cpu_flags() & NATIVE_BF16_FLAGS) and _onednn_bf16()


def cpu_has_fast_int8() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI or AMX) that make ``torch._int_mm`` fast; without
    them it is slower than an fp32 GEMM (measured: docs/inference.md)."""
    return bool(cpu_flags() & FAST_INT8_FLAGS)


def describe_cpu() -> str:
    """One line for reports: the CPU's name and the flags that decide quantlm's choices."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    shown = sorted(f for f in cpu_flags() if f in {"avx2", "avx512f"} | NATIVE_BF16_FLAGS | FAST_INT8_FLAGS)
    return f"{name or platform.processor() or platform.machine()} [{' '.join(shown) or 'no AVX2/AVX-512/AMX'}]"


# ---------------------------------------------------------------------------------------------- the dtype choice
@dataclass(frozen=True)
class DTypeChoice:
    """A compute dtype and, in words, why it was taken."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def check_dtype_name(name: str) -> None:
    if name not in DTYPE_CHOICES:
        raise InvalidSpecError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPE_CHOICES)}")


def probe_shape(rows: int) -> tuple[int, int, int]:
    """The (rows, in, out) of the GEMM probed for work that multiplies ``rows`` tokens at a time. A few rows (decode)
    stream a weight larger than the caches, as a model's weights are: there bf16 pays by halving the bytes read,
    even on CPUs without bf16 instructions. Many rows (prefill, training, eval) are compute-bound: there only native
    bf16 arithmetic pays. Rows are capped at PROBE_MAX_ROWS (the cost of a GEMM grows linearly beyond)."""
    rows = max(1, min(int(rows), PROBE_MAX_ROWS))
    return (rows, *(MEMORY_BOUND_WEIGHT if rows <= MEMORY_BOUND_ROWS else COMPUTE_BOUND_WEIGHT))


def choose_dtype(
    requested: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    *,
    rows: int = PROBE_MAX_ROWS,
    training: bool = False,
) -> DTypeChoice:
    """The dtype to compute in on ``device`` (default: the CPU, where quantlm's commands run): ``requested`` itself, or
    for ``"auto"`` the one this machine runs faster for work that multiplies ``rows`` tokens at a time (1: decoding
    one sequence; a batch size; a window length for prefill, eval and training). ``training``: the dtype is an
    autocast dtype, so on a GPU without bf16 it is fp32 (fp16 autocast would need loss scaling)."""
    if isinstance(requested, torch.dtype):
        return DTypeChoice(requested, "as asked")
    check_dtype_name(requested)
    if requested != "auto":
        return DTypeChoice(DTYPES[requested], "as asked")
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DTypeChoice(torch.bfloat16, "auto: this GPU runs bf16 natively")
        if training:
            return DTypeChoice(torch.float32, "auto: this GPU has no bf16, and fp16 training would need loss scaling")
        return DTypeChoice(torch.float16, "auto: this GPU has no bf16")
    if device.type != "cpu":
        return DTypeChoice(torch.float32, f"auto: fp32 on {device.type}")
    shape = probe_shape(rows)
    work = f"{shape[0]}-row matmuls"
    if not cpu_has_native_bf16() and shape[0] > MEMORY_BOUND_ROWS:
        held = cpu_flags() & NATIVE_BF16_FLAGS
        why = "torch's oneDNN is held to an ISA without it" if held else "no bf16 instructions"
        return DTypeChoice(
            torch.float32, f"auto: this CPU has no native bf16 ({why}), where bf16 {work} are several times slower"
        )
    speedup, cached = bf16_speedup(shape)
    where = "cached probe" if cached else "probe"
    if speedup >= MIN_BF16_SPEEDUP:
        return DTypeChoice(torch.bfloat16, f"auto: bf16 {work} ran {speedup:.2f}x as fast as fp32 here ({where})")
    return DTypeChoice(torch.float32, f"auto: bf16 {work} ran only {speedup:.2f}x as fast as fp32 here ({where})")


def _probe_key(shape: tuple[int, int, int]) -> str:
    parts = {
        "version": PROBE_VERSION,
        "shape": list(shape),
        "cpu": describe_cpu(),
        "flags": sorted(cpu_flags()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "isa": [os.environ.get("ONEDNN_MAX_CPU_ISA", ""), os.environ.get("ATEN_CPU_CAPABILITY", "")],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _probe_file(shape: tuple[int, int, int]) -> Path:
    return quantlm_home() / "hardware" / f"bf16-probe-{_probe_key(shape)}.json"


def _gemm_seconds(dtype: torch.dtype, shape: tuple[int, int, int]) -> float:
    """Best time of one ``x @ w.T`` of ``shape`` in ``dtype`` (each timed round long enough to measure)."""
    rows, k, n = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    w = torch.randn(n, k, generator=generator).to(dtype)
    repeats = max(2, PROBE_FLOPS // (2 * rows * k * n))
    F.linear(x, w)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            F.linear(x, w)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def bf16_speedup(shape: tuple[int, int, int] = (PROBE_MAX_ROWS, *COMPUTE_BOUND_WEIGHT)) -> tuple[float, bool]:
    """fp32 time over bf16 time of one GEMM of ``shape`` on this CPU (>1: bf16 is faster), and whether it came from
    the cache. Measured once (well under a second) per shape, CPU, torch version and thread count; a cache that
    cannot be read or written only costs a new measurement."""
    path = _probe_file(shape)
    try:
        return float(json.loads(path.read_text())["speedup"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    fp32, bf16 = _gemm_seconds(torch.float32, shape), _gemm_seconds(torch.bfloat16, shape)
    speedup = fp32 / bf16
    try:
        record = {"speedup": speedup, "fp32_s": fp32, "bf16_s": bf16, "shape": shape, "cpu": describe_cpu()}
        atomic_write_text(path, json.dumps(record, indent=1))
    except OSError:
        pass
    return speedup, False
