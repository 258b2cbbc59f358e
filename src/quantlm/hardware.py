"""What this machine computes fast: its CPU's instruction sets, and the dtype a command should compute in.

The machines quantlm runs on differ: an AVX2-only CPU multiplies bf16 matrices several times (up to ~40x) slower
than fp32, because it has no bf16 instructions and converts every element; a CPU with AVX-512 BF16 or AMX runs
them about twice as fast as fp32. So no command hard-codes bf16: ``--dtype auto`` (``choose_dtype``) takes bf16
only where the CPU has native bf16 *and* a one-off micro-benchmark of a bf16 GEMM beats fp32 on it (the result is
cached under ``$QUANTLM_HOME/hardware``, keyed by the CPU, torch's version, the thread count and the ISA
overrides ``ONEDNN_MAX_CPU_ISA`` / ``ATEN_CPU_CAPABILITY``), and fp32 everywhere else. On CUDA, ``auto`` is bf16
where the GPU supports it, else fp16 for inference and fp32 for training.
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
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 (AVX-512 BF16, AMX); Arm ("bf16")
FAST_INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
MIN_BF16_SPEEDUP = 1.1  # auto takes bf16 only if the probe's bf16 GEMM is at least this much faster than fp32
PROBE_SHAPE = (32, 1024, 1024)  # rows x in x out: between a decode batch and a prefill, at a small model's width
PROBE_VERSION = 1


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


def choose_dtype(
    requested: str | torch.dtype = "auto", device: str | torch.device | None = None, *, training: bool = False
) -> DTypeChoice:
    """The dtype to compute in on ``device`` (default: CUDA if available, else the CPU): ``requested`` itself, or
    for ``"auto"`` the fastest this machine runs natively. ``training``: the dtype is an autocast dtype, so on a GPU
    without bf16 it is fp32 (fp16 autocast would need loss scaling)."""
    if isinstance(requested, torch.dtype):
        return DTypeChoice(requested, "as asked")
    check_dtype_name(requested)
    if requested != "auto":
        return DTypeChoice(DTYPES[requested], "as asked")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DTypeChoice(torch.bfloat16, "auto: this GPU runs bf16 natively")
        if training:
            return DTypeChoice(torch.float32, "auto: this GPU has no bf16, and fp16 training would need loss scaling")
        return DTypeChoice(torch.float16, "auto: this GPU has no bf16")
    if device.type != "cpu":
        return DTypeChoice(torch.float32, f"auto: fp32 on {device.type}")
    if not cpu_has_native_bf16():
        why = "torch's oneDNN is held to an ISA without it" if cpu_flags() & NATIVE_BF16_FLAGS else "no AVX-512 BF16"
        return DTypeChoice(torch.float32, f"auto: this CPU has no native bf16 ({why}); bf16 is several times slower")
    speedup, cached = bf16_speedup()
    where = "cached probe" if cached else "probe"
    if speedup >= MIN_BF16_SPEEDUP:
        return DTypeChoice(torch.bfloat16, f"auto: native bf16, and a bf16 GEMM ran {speedup:.2f}x fp32 ({where})")
    return DTypeChoice(
        torch.float32, f"auto: a bf16 GEMM ran only {speedup:.2f}x fp32 on this CPU despite its bf16 flags ({where})"
    )


def _probe_key() -> str:
    parts = {
        "version": PROBE_VERSION,
        "cpu": describe_cpu(),
        "flags": sorted(cpu_flags()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "isa": [os.environ.get("ONEDNN_MAX_CPU_ISA", ""), os.environ.get("ATEN_CPU_CAPABILITY", "")],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _probe_file() -> Path:
    return quantlm_home() / "hardware" / f"bf16-probe-{_probe_key()}.json"


def _gemm_seconds(dtype: torch.dtype, repeats: int = 10) -> float:
    rows, k, n = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    w = torch.randn(n, k, generator=generator).to(dtype)
    for _ in range(2):
        F.linear(x, w)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            F.linear(x, w)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def bf16_speedup() -> tuple[float, bool]:
    """fp32 time over bf16 time of one GEMM on this CPU (>1: bf16 is faster), and whether it came from the cache.
    Measured once (about 0.1 s) per CPU, torch version and thread count; a cache that cannot be read or written
    only costs a new measurement."""
    path = _probe_file()
    try:
        return float(json.loads(path.read_text())["speedup"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    fp32, bf16 = _gemm_seconds(torch.float32), _gemm_seconds(torch.bfloat16)
    speedup = fp32 / bf16
    try:
        record = {"speedup": speedup, "fp32_s": fp32, "bf16_s": bf16, "shape": PROBE_SHAPE, "cpu": describe_cpu()}
        atomic_write_text(path, json.dumps(record, indent=1))
    except OSError:
        pass
    return speedup, False
