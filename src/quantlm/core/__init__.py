"""Numerics core of quantlm: quantization grids (QuantSpec), quantize/dequantize, and bit packing.

Imports nothing from quantlm except ``quantlm.errors``.
"""

from quantlm.core.packing import pack, packed_length, unpack
from quantlm.core.quantizer import (
    QuantizedTensor,
    compute_qparams,
    dequantize,
    expand_to_columns,
    fake_quantize,
    quantize,
    quantize_tensor,
    round_ste,
)
from quantlm.core.spec import QuantSpec

__all__ = [
    "QuantSpec",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "round_ste",
    "quantize_tensor",
    "QuantizedTensor",
    "expand_to_columns",
    "pack",
    "unpack",
    "packed_length",
]
