"""Bit packing: layout against a big-integer reference, inverse property, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlm.core import pack, packed_length, unpack
from quantlm.errors import QuantlmError


def reference_pack_row(values, bits):
    """Little-endian bit stream via Python big integers: value i at bits [i*bits, (i+1)*bits)."""
    stream = 0
    for i, v in enumerate(values):
        stream |= int(v) << (i * bits)
    n_bytes = (len(values) * bits + 7) // 8
    return list(stream.to_bytes(n_bytes, "little"))


@st.composite
def code_tensors(draw):
    bits = draw(st.integers(1, 8))
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    n = draw(st.integers(0, 70))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    mode = draw(st.sampled_from(["random", "max", "zero"]))
    shape = (*lead, n)
    if mode == "random":
        codes = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.int64).to(torch.uint8)
    elif mode == "max":
        codes = torch.full(shape, 2**bits - 1, dtype=torch.uint8)
    else:
        codes = torch.zeros(shape, dtype=torch.uint8)
    return codes, bits


@given(code_tensors())
@settings(max_examples=100, deadline=None)
def test_pack_matches_reference_and_unpack_inverts(args):
    codes, bits = args
    n = codes.shape[-1]
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*codes.shape[:-1], packed_length(n, bits))
    rows = math.prod(codes.shape[:-1])
    rows_in = codes.reshape(rows, n).tolist()
    rows_out = packed.reshape(rows, packed.shape[-1]).tolist()
    assert len(rows_in) == len(rows_out) == rows
    for r_in, r_out in zip(rows_in, rows_out):
        assert r_out == reference_pack_row(r_in, bits)
    back = unpack(packed, bits, n)
    assert back.dtype == torch.uint8
    assert back.shape == codes.shape
    assert torch.equal(back, codes)


@pytest.mark.parametrize(
    "bits, values, expected",
    [
        (4, [1, 2, 3], [0x21, 0x03]),
        (2, [1, 2, 3, 0], [0b00111001]),
        (3, [7, 0, 5], [0b01000111, 0b00000001]),  # 111 | 000 << 3 | 101 << 6 spills one bit into byte 1
        (1, [1, 0, 1, 1, 0, 0, 0, 0, 1], [0b00001101, 0b00000001]),
        (8, [0, 255, 7], [0, 255, 7]),
        (5, [31, 1], [0b00111111, 0b00000000]),  # 11111 | 00001 << 5 = 0b0000111111
    ],
)
def test_known_layouts(bits, values, expected):
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.tolist() == expected
    assert unpack(packed, bits, len(values)).tolist() == values


@pytest.mark.parametrize(
    "n, bits, length", [(0, 4, 0), (1, 4, 1), (2, 4, 1), (3, 4, 2), (8, 3, 3), (9, 3, 4), (10, 2, 3), (7, 8, 7)]
)
def test_packed_length(n, bits, length):
    assert packed_length(n, bits) == length


def test_wide_integer_codes_accepted():
    codes = torch.tensor([[3, 0, 2, 1, 3]], dtype=torch.int64)
    packed = pack(codes, 2)
    assert torch.equal(unpack(packed, 2, 5), codes.to(torch.uint8))


def test_bits8_result_does_not_alias_input():
    codes = torch.tensor([1, 2, 3], dtype=torch.uint8)
    packed = pack(codes, 8)
    packed[0] = 9
    assert codes.tolist() == [1, 2, 3]


def test_errors():
    with pytest.raises(QuantlmError, match="code 16 does not fit in 4 bits"):
        pack(torch.tensor([1, 16, 2], dtype=torch.uint8), 4)
    with pytest.raises(QuantlmError, match="code -1 does not fit in 2 bits"):
        pack(torch.tensor([1, -1], dtype=torch.int32), 2)
    with pytest.raises(QuantlmError, match="between 1 and 8, got 0"):
        pack(torch.tensor([0], dtype=torch.uint8), 0)
    with pytest.raises(QuantlmError, match="between 1 and 8, got 9"):
        unpack(torch.tensor([0], dtype=torch.uint8), 9, 1)
    with pytest.raises(QuantlmError, match="integer codes"):
        pack(torch.tensor([0.0, 1.0]), 4)
    with pytest.raises(QuantlmError, match="has 2 bytes per row but 5 codes of 4 bits need 3"):
        unpack(torch.zeros(2, dtype=torch.uint8), 4, 5)
    with pytest.raises(QuantlmError, match="torch.uint8"):
        unpack(torch.zeros(2, dtype=torch.int32), 4, 4)
