"""The reference math of a quantized linear layer, in plain torch: what every kernel is tested against.

y = x Wᵀ (the caller adds the bias), W = (q − zero) · scale as ``quantlm.core`` defines the grid. Weight-only
layers dequantize the weight and multiply densely. W8A8 layers quantize x (per token, or with the static per-tensor
scale); with row-scaled weights the integer product is summed first and scaled after, (Σ q_x q_w) · s_x · s_w, as
the int8 GEMM does (fp32 sums of these integer products are exact below 2^24), so both give the same numbers:
activation rounding is discontinuous, and a last-bit difference upstream would otherwise flip roundings
downstream. LLM.int8() layers first take the outlier columns out of x and add their product with the dequantized
weight columns in x's dtype.

This module imports neither ``quantlm.nn.qlinear`` nor ``quantlm.nn.kernels``: both import it. A ``layer`` here is
any object with QuantLinear's attributes and accessors (``out_features``, ``act_bits``, ``outlier_threshold``,
``dequantize_weight``, ``row_scaled``, ``integer_weight``, ``quantize_input``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from quantlm.core.activation import split_outlier_columns


def dense_matmul(layer, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """x Wᵀ with the weight dequantized in ``dtype`` (x's by default) and x cast to it; the result in x's dtype."""
    dtype = x.dtype if dtype is None else dtype
    return F.linear(x.to(dtype), layer.dequantize_weight(dtype)).to(x.dtype)


def integer_product(codes: Tensor, x_scale: Tensor, weight: Tensor, row_scale: Tensor) -> Tensor:
    """W8A8 with row-scaled weights: (Σ q_x q_w) · s_x · s_w in fp32, the integer sum in fp32 (exact below 2^24),
    scaled in the same order as the int8 GEMM's result, so both give the same numbers."""
    return F.linear(codes.float(), weight) * x_scale * row_scale


def quantized_rows(layer, x2: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """A W8A8 layer's input rows ``x2 [tokens, features]`` as int8 codes and scales, after LLM.int8() layers took
    their outlier columns out: (codes, scales, outlier columns [tokens, n] or None, their indices or None)."""
    inliers, outliers, cols = x2, None, None
    if layer.outlier_threshold is not None:
        inliers, outliers, cols = split_outlier_columns(x2, layer.outlier_threshold)
    codes, x_scale = layer.quantize_input(inliers)
    return codes, x_scale, outliers, cols


def w8a8_matmul(
    layer, x: Tensor, integer_weight: tuple[Tensor, Tensor] | None, dense_weight: Callable[[torch.dtype], Tensor]
) -> Tensor:
    """x Wᵀ of a W8A8 layer: x quantized as the layer says (per token or static per tensor), then the integer
    product with ``integer_weight`` ((codes − zero) and row scales, for row-scaled weights) or, for grouped weights,
    the fake-quantized x times ``dense_weight(dtype)``. LLM.int8() layers first take the outlier columns out of x and
    add their product with those columns of ``dense_weight`` in x's dtype."""
    lead = x.shape[:-1]
    codes, x_scale, outliers, cols = quantized_rows(layer, x.reshape(-1, x.shape[-1]))
    if integer_weight is not None:
        y = integer_product(codes, x_scale, *integer_weight).to(x.dtype)
    else:
        y = F.linear((codes.float() * x_scale).to(x.dtype), dense_weight(x.dtype))
    if cols is not None and cols.numel():
        y = y + F.linear(outliers, dense_weight(x.dtype).index_select(1, cols))
    return y.reshape(*lead, layer.out_features)


def reference_matmul(layer, x: Tensor) -> Tensor:
    """x Wᵀ of ``layer`` without the bias, the weight dequantized on every call: weight-only layers multiply
    densely in x's dtype, W8A8 and W4A4 layers as ``w8a8_matmul`` (the integer product for row-scaled weights)."""
    if layer.act_bits is None:
        return dense_matmul(layer, x)
    return w8a8_matmul(layer, x, layer.integer_weight() if layer.row_scaled() else None, layer.dequantize_weight)
