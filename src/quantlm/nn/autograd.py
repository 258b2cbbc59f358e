"""Gradients through a QuantLinear's input, for training adapters on a frozen quantized model (QLoRA's way).

The weight is frozen, so backward needs only dL/dx = dL/dy · W. Plain autograd through the reference path would
keep every layer's dequantized weight alive from forward to backward (a float copy of the whole model). Here the
forward runs the layer as inference does (its kernel, under no_grad) and saves nothing but the layer; backward
dequantizes the weight again, uses it, and drops it: one dense weight at a time. Activation quantization (W8A8
layers) passes the gradient straight through, as if the input had not been rounded (also where a static per-tensor
scale clipped it). Backward runs outside autocast, in the dtype of the incoming gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _QuantLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, layer) -> Tensor:
        ctx.layer = layer
        with torch.no_grad():
            y = layer.matmul(x)
        return y.clone() if y._base is not None else y  # a custom Function may not return a view of its work

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight = ctx.layer.dequantize_weight(grad.dtype)
        return grad @ weight, None


def matmul_with_input_grad(layer, x: Tensor) -> Tensor:
    """x Wᵀ (no bias) of QuantLinear ``layer``, differentiable in x; the weight gets no gradient."""
    return _QuantLinearFunction.apply(x, layer)
