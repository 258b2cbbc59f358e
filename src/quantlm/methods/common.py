"""Pieces shared by weight-quantization methods: which modules they touch, how a Linear becomes a QuantLinear."""

from __future__ import annotations

import fnmatch
from typing import Sequence

import torch
from torch import nn

from quantlm.models.blocks import linear_weight, set_submodule
from quantlm.nn.qlinear import QuantLinear


def is_excluded(name: str, patterns: Sequence[str]) -> bool:
    """True when the module name matches one of the fnmatch patterns (``*`` matches dots too)."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p) for p in patterns)


def relative_weight_error(reference: torch.Tensor, quantized: torch.Tensor) -> float:
    """||W_q - W||_F / ||W||_F."""
    ref = reference.detach().float()
    denom = ref.norm().item()
    return (quantized.float() - ref).norm().item() / denom if denom > 0 else 0.0


def swap_in(root: nn.Module, name: str, qlinear: QuantLinear, original: nn.Module) -> QuantLinear:
    """Put ``qlinear`` where ``original`` was, on its device, running on its weight dequantized once (the pipeline
    still runs it on the calibration batch; ``quantlm.pipeline.runner`` drops that copy when the block is done)."""
    weight = linear_weight(original)
    qlinear = qlinear.to(weight.device)
    qlinear.use_kernel("dequantized", weight.dtype)
    set_submodule(root, name, qlinear)
    return qlinear
