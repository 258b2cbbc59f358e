"""Dense bit packing of small unsigned codes along the last dim.

Layout (little-endian bit stream): code ``i`` of a row occupies bits ``[i * bits, (i + 1) * bits)`` of the
row's stream, where bit ``j`` of the stream is bit ``j % 8`` of byte ``j // 8``. A row of ``n`` codes packs to
``ceil(n * bits / 8)`` bytes; unused high bits of the last byte are zero. Leading dims are kept.

Vectorized: for 1, 2 and 4 bits the codes of each byte are shifted into place and or-ed in uint8; for the other
widths rows are padded to a multiple of 8 codes, each 8 codes form one ``8 * bits``-bit word (int64) that is split
into ``bits`` bytes; unpacking is the reverse.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from quantlm.errors import QuantlmError

__all__ = ["packed_length", "pack", "unpack", "to_int32_words", "from_int32_words"]


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise QuantlmError(f"bits for packing must be an integer between 1 and 8, got {bits!r}")
    return bits


def packed_length(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits: ``ceil(n * bits / 8)``."""
    _check_bits(bits)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise QuantlmError(f"number of codes must be an integer >= 0, got {n!r}")
    return (n * bits + 7) // 8


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes ``[..., n]`` (each in ``[0, 2**bits)``) into uint8 ``[..., packed_length(n, bits)]``."""
    _check_bits(bits)
    if not isinstance(codes, Tensor):
        raise QuantlmError(f"pack expects a torch.Tensor of codes, got {type(codes).__name__}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise QuantlmError(f"pack expects integer codes (e.g. torch.uint8), got dtype {codes.dtype}")
    if codes.dim() == 0:
        raise QuantlmError("pack expects at least one dimension, got a 0-dim tensor")
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= (1 << bits):
            bad = hi if hi >= (1 << bits) else lo
            raise QuantlmError(f"code {bad} does not fit in {bits} bits (codes must be in [0, {(1 << bits) - 1}])")
    *lead, n = codes.shape
    out_len = packed_length(n, bits)
    if bits == 8:
        return codes.to(torch.uint8, copy=True).contiguous()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, lowest bits first, or-ed together in uint8
        per_byte = 8 // bits
        v = codes.to(torch.uint8)
        if n % per_byte:
            v = torch.nn.functional.pad(v, (0, per_byte - n % per_byte))
        out = v[..., 0::per_byte].clone(memory_format=torch.contiguous_format)
        for i in range(1, per_byte):
            out |= v[..., i::per_byte] << (i * bits)
        return out
    k = (n + 7) // 8
    v = codes.to(torch.int64)
    if k * 8 != n:
        v = torch.nn.functional.pad(v, (0, k * 8 - n))
    v = v.reshape(*lead, k, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (v << shifts).sum(dim=-1, keepdim=True)  # disjoint bit fields: sum == bitwise or; < 2**56
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = ((word >> byte_shifts) & 0xFF).to(torch.uint8)  # [..., k, bits]
    return out.reshape(*lead, k * bits)[..., :out_len].contiguous()


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack`: uint8 ``[..., packed_length(n, bits)]`` -> uint8 codes ``[..., n]``."""
    _check_bits(bits)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, Tensor) else type(packed).__name__
        raise QuantlmError(f"unpack expects a torch.uint8 tensor, got {got}")
    if packed.dim() == 0:
        raise QuantlmError("unpack expects at least one dimension, got a 0-dim tensor")
    *lead, m = packed.shape
    want = packed_length(n, bits)
    if m != want:
        raise QuantlmError(
            f"packed data has {m} bytes per row but {n} codes of {bits} bits need {want}; "
            "check bits and the number of codes"
        )
    if bits == 8:
        return packed.clone(memory_format=torch.contiguous_format)
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, lowest bits first; uint8 shifts, no widening
        per_byte, mask = 8 // bits, (1 << bits) - 1
        # one shift-and-mask per code slot, then interleaved (3x faster than a broadcast shift at 4 bits)
        v = torch.stack([(packed >> (i * bits)) & mask for i in range(per_byte)], dim=-1)
        return v.reshape(*lead, m * per_byte)[..., :n].contiguous()
    k = (n + 7) // 8
    b = packed.to(torch.int64)
    if k * bits != m:
        b = torch.nn.functional.pad(b, (0, k * bits - m))
    b = b.reshape(*lead, k, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    v = ((word >> shifts) & ((1 << bits) - 1)).to(torch.uint8)  # [..., k, 8]
    return v.reshape(*lead, k * 8)[..., :n].contiguous()


# -------------------------------------------------------------------------------------- 32-bit words of a stream
# Other formats (GPTQ, compressed-tensors) keep the same little-endian bit stream in int32 words: code i of a row
# at bits [i * bits, (i + 1) * bits) of the row's stream, bit j in bit j % 32 of word j // 32. So a row's stream is
# the same bytes in both, padded to whole words.


def to_int32_words(packed: Tensor) -> Tensor:
    """uint8 bit streams ``[..., m]`` (from :func:`pack`) as int32 words ``[..., ceil(m / 4)]``, zero-padded."""
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        raise QuantlmError("to_int32_words expects the uint8 rows of pack()")
    m = packed.shape[-1]
    if m % 4:
        packed = torch.nn.functional.pad(packed, (0, 4 - m % 4))
    return _le_bytes_as(packed.contiguous(), torch.int32)


def from_int32_words(words: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`to_int32_words` for rows of ``n`` codes of ``bits`` bits: the uint8 rows of :func:`pack`
    (whatever a writer left in the bits past the ``n`` codes is dropped)."""
    if not isinstance(words, Tensor) or words.dtype != torch.int32:
        raise QuantlmError("from_int32_words expects int32 words")
    m = packed_length(n, bits)
    if words.shape[-1] * 4 < m:
        raise QuantlmError(f"{words.shape[-1]} words per row cannot hold {n} codes of {bits} bits")
    stream = _le_bytes_as(words.contiguous(), torch.uint8)
    out = stream[..., :m].clone(memory_format=torch.contiguous_format)  # never the caller's words
    if n * bits % 8:  # zero the unused high bits of the last byte, as pack leaves them
        out[..., -1] &= (1 << (n * bits % 8)) - 1
    return out


def _le_bytes_as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` reinterpreted as ``dtype`` along its last dim, in little-endian byte order on any host."""
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
        raise QuantlmError("packing to 32-bit words needs a little-endian host")
    flat = t.contiguous().reshape(-1)  # through 1-D: a [1, n] row may carry a stride view() refuses
    return flat.view(dtype).reshape(*t.shape[:-1], -1)
