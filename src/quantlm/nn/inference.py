"""Make a loaded model ready to run: float parts in the compute dtype, every QuantLinear on its matmul kernel."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from quantlm.nn import kernel_cache
from quantlm.nn.kernels import choose_kernel
from quantlm.nn.qlinear import QuantLinear


def cast_float_parts(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the float parameters and buffers of every module except QuantLinears (whose scales keep their storage
    dtype, e.g. fp16, which bf16 would round) to ``dtype``."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            continue
        for tensors in (module._parameters, module._buffers):
            for name, t in tensors.items():
                if t is not None and t.is_floating_point() and t.dtype != dtype:
                    if isinstance(t, nn.Parameter):
                        tensors[name] = nn.Parameter(t.data.to(dtype), requires_grad=t.requires_grad)
                    else:
                        tensors[name] = t.to(dtype)
    if hasattr(model, "config"):
        model.config.dtype = dtype
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def prepare_kernels(
    model: nn.Module, kernel: str = "auto", dtype: torch.dtype = torch.float32, cache_for: Path | None = None
) -> dict[str, str]:
    """Give every QuantLinear its kernel (``auto``: the fastest that can run it) for activations of ``dtype``;
    return {module name: kernel}. ``cache_for``: the checkpoint weights file the model was loaded from, whose
    prepared kernels are then read from (or written to) the kernel cache (``quantlm.nn.kernel_cache``)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    chosen = {name: choose_kernel(m, kernel, m.qweight.device) for name, m in layers.items()}
    entry = None
    if cache_for is not None and kernel_cache.cache_enabled() and any(k.cacheable for k in chosen.values()):
        entry = kernel_cache.entry_path(cache_for, dtype, {name: k.name for name, k in chosen.items()})
    stored = kernel_cache.read_entry(entry) if entry is not None else {}
    for name, m in layers.items():
        m.use_kernel(chosen[name].name, dtype, stored.get(name))
    if entry is not None and any(m.kernel.cacheable and not m.kernel.from_cache for m in layers.values()):
        kernel_cache.write_entry(entry, {name: m.kernel.prepared() for name, m in layers.items() if m.kernel.cacheable})
    return {name: k.name for name, k in chosen.items()}


def kernel_summary(kernels: dict[str, str]) -> str:
    """e.g. 'int4pack x210' or 'int4pack x200, torch x10'."""
    counts = Counter(kernels.values())
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common()) or "no quantized layers"


def _unique_bytes(tensors) -> int:
    """Bytes of ``tensors``, each storage region counted once (tied weights)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes as stored (what a checkpoint holds): the quantized Linears (codes, scales, zeros, g_idx), the dense
    Linear weights, and everything."""
    quantized = sum(m.weight_bytes for m in model.modules() if isinstance(m, QuantLinear))
    dense_linear = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))
    return {
        "quantized_linear": quantized,
        "dense_linear": dense_linear,
        "total": _unique_bytes(model.state_dict().values()),
    }


def bytes_read_per_token(model: nn.Module) -> int:
    """Bytes one decoded token reads: every weight once, in the form its kernel uses (a kernel's own tensors instead
    of the stored codes it was prepared from). The input embedding is counted whole: an upper bound unless it is
    tied to the output projection, which reads all of it."""
    replaced: set[int] = set()
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.kernel is not None and any(True for _ in m.kernel.buffers()):
            grid = (*m.stored_tensors(), m.scales) if m.kernel.replaces_grid else (m.qweight,)
            replaced.update(id(t) for t in grid)
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in replaced]
    return _unique_bytes(tensors)
