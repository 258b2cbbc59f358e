"""Inference modules holding quantized weights."""

from quantlm.nn.qlinear import QuantLinear

__all__ = ["QuantLinear"]
