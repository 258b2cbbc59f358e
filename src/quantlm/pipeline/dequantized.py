"""The pipeline's dequantized copies: finished QuantLinears run on their weight dequantized once while their block is
still being calibrated (dense-GEMM speed, the reference's numbers), and the copies go when the block is done.

This is a pipeline helper, not an inference kernel: it is no choice of ``quantlm.nn.kernels.choose_kernel`` or
``--kernel``. The copy is attached as the layer's ``kernel`` (so ``QuantLinear.forward`` runs it and adds the bias)
and is forgotten by setting that back to None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantlm.nn.kernels import Kernel
from quantlm.nn.qlinear import QuantLinear
from quantlm.nn.reference import w8a8_matmul


class DequantizedCopy(Kernel):
    """The weight dequantized once (on the first call) and kept in the compute dtype: dense-GEMM speed at a dense
    layer's memory, the same numbers as ``quantlm.nn.reference``."""

    name = "dequantized"

    def __init__(self, layer: QuantLinear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(layer, dtype)
        self.act_bits = layer.act_bits
        self.integer = layer.act_bits is not None and layer.row_scaled()
        if self.integer:  # W8A8: the same integer product as the reference (QuantLinear.reference_forward)
            weight, scale = layer.integer_weight()
            self.register_buffer("int_weight", weight, persistent=False)
            self.register_buffer("int_scale", scale, persistent=False)
        # one [out, in] copy per layer, made when the layer first runs (a step without calibration never runs it):
        # the integer form is enough for W8A8 layers without outlier columns
        self.keeps_dense = not self.integer or layer.outlier_threshold is not None
        self.dtype = dtype
        self.register_buffer("weight", None, persistent=False)

    def _dense(self, dtype: torch.dtype) -> Tensor:
        if not self.keeps_dense:
            return self.layer[0].dequantize_weight(dtype)
        if self.weight is None:
            self.weight = self.layer[0].dequantize_weight(self.dtype)
        return self.weight if dtype == self.weight.dtype else self.weight.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.act_bits is not None:
            integer = (self.int_weight, self.int_scale) if self.integer else None
            return w8a8_matmul(self.layer[0], x, integer, self._dense)
        return F.linear(x, self._dense(x.dtype))


def run_dequantized(qlinear: QuantLinear, dtype: torch.dtype) -> QuantLinear:
    """Run ``qlinear`` on its weight dequantized once in ``dtype`` (the compute dtype of the model being
    quantized); return it."""
    qlinear.kernel = DequantizedCopy(qlinear, dtype)
    return qlinear


def _quantized_layers(block: nn.Module) -> list[QuantLinear]:
    return [m for m in block.modules() if isinstance(m, QuantLinear)]


def dequantize_block(block: nn.Module, dtype: torch.dtype) -> None:
    """The QuantLinears of ``block`` without a kernel (restored from a store) run on their weight dequantized once."""
    for m in _quantized_layers(block):
        if m.kernel is None:
            run_dequantized(m, dtype)


def drop_dequantized(block: nn.Module) -> None:
    """Forget the dequantized copies of a finished block's weights (their memory must not outlive the block): every
    QuantLinear of ``block`` goes back to the reference path (kernel None)."""
    for m in _quantized_layers(block):
        m.kernel = None
