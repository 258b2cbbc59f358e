"""QuantLinear: packed storage, dequantization and forward against the core reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantlm.core import QuantSpec, compute_qparams, dequantize, quantize
from quantlm.nn import QuantLinear


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, group_size=64),
        QuantSpec(bits=4, group_size=64, symmetric=True),
        QuantSpec(bits=3, group_size=32),
        QuantSpec(bits=2, group_size=16),
        QuantSpec(bits=8),
        QuantSpec(bits=4, granularity="tensor"),
        QuantSpec(bits=4, group_size=64, clip="mse"),
    ],
)
@pytest.mark.parametrize("in_features", [128, 100])  # 100: the last group is partial
def test_from_weight_matches_core_and_forward_is_linear_on_the_dequantized_weight(spec, in_features):
    torch.manual_seed(0)
    w = torch.randn(24, in_features)
    bias = torch.randn(24)
    q = QuantLinear.from_weight(w, spec, bias)
    scale, zero = compute_qparams(w, spec)
    scale = scale.half().float()
    expected = dequantize(quantize(w, scale, zero, spec), scale, zero, spec)
    torch.testing.assert_close(q.dequantize_weight(), expected, rtol=0, atol=0)
    x = torch.randn(3, 5, in_features)
    torch.testing.assert_close(q(x), F.linear(x, expected, bias))
    # stored packed: bits/8 bytes per weight (rounded up per row)
    assert q.qweight.dtype == torch.uint8
    assert q.qweight.shape == (24, -(-in_features * spec.bits // 8))
    assert q.scales.dtype == torch.float16


def test_error_shrinks_with_bits():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    errors = [
        (QuantLinear.from_weight(w, QuantSpec(bits=b, group_size=32)).dequantize_weight() - w).norm()
        for b in (2, 3, 4, 8)
    ]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] / w.norm() < 0.01


def test_scales_that_overflow_fp16_are_stored_in_fp32():
    w = torch.randn(4, 32) * 1e9
    q = QuantLinear.from_weight(w, QuantSpec(bits=8))
    assert q.scales.dtype == torch.float32
    torch.testing.assert_close(q.dequantize_weight(), w, rtol=0.02, atol=w.abs().max().item() / 100)


def test_forward_follows_the_input_dtype():
    w = torch.randn(16, 64)
    q = QuantLinear.from_weight(w, QuantSpec(bits=4, group_size=32))
    out = q(torch.randn(2, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
