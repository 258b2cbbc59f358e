"""llama.cpp's quantized block types, both ways: a QuantLinear's codes and grid as GGML blocks, and back.

Each type is a quantlm grid (``GRIDS``), so a layer goes into the type whose grid is its own, with its codes and
scales as they are, nothing re-rounded:
- ``Q4_0`` / ``Q5_0`` / ``Q8_0``: symmetric 4/5/8-bit groups of 32 input columns, ``w = (q - 2**(bits-1)) * d``
  with fp16 ``d``; quantlm's symmetric grid is this one (zero point = the middle code);
- ``Q4_1`` / ``Q5_1``: asymmetric 4/5-bit groups of 32, ``w = q * d + m``; quantlm's ``(q - zero) * scale`` is this
  one with ``d = scale`` and ``m = -zero * scale``, written only where every ``m`` is an fp16 number (fp16 cannot
  hold ``-zero * scale`` for most scales);
- the K-quants, super-blocks of 256 columns whose group scales are codes times one fp16 factor
  (``quantlm.core.superblock``, ``QuantSpec.scale_bits``): ``Q2_K`` (2-bit, groups of 16, 4-bit scale and min
  codes), ``Q3_K`` (3-bit symmetric, groups of 16, 6-bit signed scales), ``Q4_K`` / ``Q5_K`` (4/5-bit, groups
  of 32, 6-bit scale and min codes), ``Q6_K`` (6-bit symmetric, groups of 16, int8 scales). quantlm's fp32 scales
  ``d * sc`` and fractional zeros ``dmin * m / scale`` are factored back into ``d``, ``sc``, ``dmin``, ``m``
  (``superblock.factor``); the weight llama.cpp computes, ``q * d * sc - dmin * m``, is quantlm's to fp32 rounding.
Byte layouts are ggml's (``ggml-common.h``); the ``gguf`` package's dequantization checks them in the tests.
"""

from __future__ import annotations

import numpy as np
import torch

from quantlm.core import QuantSpec
from quantlm.core.spec import SUPER_BLOCK
from quantlm.core.superblock import factor
from quantlm.nn.qlinear import QuantLinear

BLOCK = 32  # columns per block of the Q4_0 ... Q8_0 types
GRIDS = {  # llama.cpp type -> the quantlm grid it stores
    "Q4_0": QuantSpec(bits=4, symmetric=True, group_size=32),
    "Q5_0": QuantSpec(bits=5, symmetric=True, group_size=32),
    "Q8_0": QuantSpec(bits=8, symmetric=True, group_size=32),
    "Q4_1": QuantSpec(bits=4, symmetric=False, group_size=32),
    "Q5_1": QuantSpec(bits=5, symmetric=False, group_size=32),
    "Q2_K": QuantSpec(bits=2, symmetric=False, group_size=16, scale_bits=4),
    "Q3_K": QuantSpec(bits=3, symmetric=True, group_size=16, scale_bits=6),
    "Q4_K": QuantSpec(bits=4, symmetric=False, group_size=32, scale_bits=6),
    "Q5_K": QuantSpec(bits=5, symmetric=False, group_size=32, scale_bits=6),
    "Q6_K": QuantSpec(bits=6, symmetric=True, group_size=16, scale_bits=8),
}
BLOCK_BYTES = {"Q4_0": 18, "Q5_0": 22, "Q8_0": 34, "Q4_1": 20, "Q5_1": 24}  # per 32 columns
SUPER_BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}  # per 256 columns


def is_k_type(kind: str) -> bool:
    return kind in SUPER_BLOCK_BYTES


def block_type(module: QuantLinear) -> str | None:
    """The llama.cpp block type whose grid is this layer's grid (None: none is)."""
    spec = module.spec
    if spec.granularity != "group" or module.g_idx is not None or spec.codebook != "none":
        return None
    key = (spec.bits, spec.symmetric, spec.group_size, spec.scale_bits)
    return next((k for k, g in GRIDS.items() if (g.bits, g.symmetric, g.group_size, g.scale_bits) == key), None)


def _code_range(spec: QuantSpec) -> tuple[int, int]:
    """The scale codes a K type stores: signed for the symmetric ones (Q3_K, Q6_K), unsigned for the others."""
    if spec.symmetric:
        return -(1 << (spec.scale_bits - 1)), (1 << (spec.scale_bits - 1)) - 1
    return 0, (1 << spec.scale_bits) - 1


def _k_factors(module: QuantLinear):
    """A K-quant layer's grid as llama.cpp stores it: (d, scale codes, dmin, min codes), each per super-block
    ``[out, n_super]`` / per group ``[out, n_super, per]`` (dmin and min codes None for symmetric types); None when
    the scales (or offsets) are not such products. A constant group read from another tool's file (scale code 0,
    offset m: held as codes 0 on the grid ``(0 - 1) * offset``) goes back to scale code 0."""
    spec = module.spec
    per = SUPER_BLOCK // spec.group_size
    low, high = _code_range(spec)
    s = module.scales.float().view(module.out_features, -1, per)
    if spec.symmetric:
        scales = factor(s, low, high)
        return None if scales is None else (*scales, None, None)
    z = module.zeros.float().view_as(s)
    codes = module.codes().view(*s.shape, spec.group_size)
    flat = (z == 1) & (codes == 0).all(-1)
    offset = torch.where(flat, s, (z.double() * s.double()).float())  # dmin * m, to the rounding of the zero
    s = torch.where(flat, torch.zeros_like(s), s)
    scales = factor(s, low, high)

    def stands_for(dmin, m):  # the zero point this offset gives is the layer's, bit for bit
        got = m * dmin
        return torch.where(flat, got == offset, torch.where(s == 0, z == 0, got / s == z))

    offsets = factor(offset, 0, high, stands_for)
    return None if scales is None or offsets is None else (*scales, *offsets)


def block_problem(module: QuantLinear, kind: str) -> str | None:
    """Why the layer's numbers do not fit ``kind``'s storage (None: they do)."""
    if module.in_features % (SUPER_BLOCK if is_k_type(kind) else BLOCK):
        return f"{kind} needs rows of whole {SUPER_BLOCK if is_k_type(kind) else BLOCK}-column blocks"
    if is_k_type(kind):
        if _k_factors(module) is None:
            return (
                f"its scales (or offsets) are not {kind}'s codes times one fp16 factor per 256 columns (a grid "
                "changed after quantization, e.g. by a merge): quantize it with --target-format "
                f"gguf-{kind.lower()}"
            )
        return None
    scales = module.scales.float()
    if not torch.equal(scales.half().float(), scales):
        return (
            "its scales are not fp16 numbers, as llama.cpp's blocks store them: quantlm keeps a layer's scales in "
            "fp32 when one is below fp16's normal range (a group of very small weights) or beyond it, or "
            "double-quantizes them (--double-quant)"
        )
    if kind in ("Q4_1", "Q5_1"):  # q * d and m are exact in fp32, so llama.cpp's q * d + m is quantlm's weight
        offset = -module.zeros.double() * scales.double()
        if not torch.equal(offset.half().double(), offset):
            return (
                f"{kind} stores the offset -zero * scale in fp16, which cannot hold this layer's offsets exactly: "
                "quantize with --sym for Q4_0/Q5_0"
            )
    return None


# ----------------------------------------------------------------------------------------------- bit fields
def pack_fields(values: torch.Tensor, width: int, run: int) -> torch.Tensor:
    """Values of ``width`` bits (1, 2 or 4; ``[..., n]``) into bytes ``[..., n * width / 8]``: ggml's pattern, in
    which byte ``b`` of a chunk holds, at bits ``width * k``, the chunk's element ``k * run + b``."""
    per_byte = 8 // width
    v = values.to(torch.int32).reshape(*values.shape[:-1], -1, per_byte, run)
    shifts = (torch.arange(per_byte, dtype=torch.int32) * width).view(per_byte, 1)
    return (v << shifts).sum(-2).to(torch.uint8).reshape(*values.shape[:-1], -1)


def unpack_fields(data: torch.Tensor, width: int, run: int) -> torch.Tensor:
    """The inverse of ``pack_fields``: bytes ``[..., m]`` to values ``[..., m * 8 / width]`` (uint8)."""
    per_byte = 8 // width
    d = data.to(torch.int32).reshape(*data.shape[:-1], -1, 1, run)
    shifts = (torch.arange(per_byte, dtype=torch.int32) * width).view(per_byte, 1)
    return ((d >> shifts) & ((1 << width) - 1)).to(torch.uint8).reshape(*data.shape[:-1], -1)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).unsqueeze(-1).view(torch.uint8)


def _fp16_of(data: torch.Tensor) -> torch.Tensor:
    return data.contiguous().view(torch.float16)[..., 0].float()


def _pack_scales_12(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scale codes and eight 6-bit min codes."""
    lo = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    mid = (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6)
    hi = (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)
    return torch.cat([lo, mid, hi], -1).to(torch.uint8)


def _unpack_scales_12(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = data.to(torch.int32)
    lo, mid, hi = b[..., :4], b[..., 4:8], b[..., 8:]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 6) << 4)], -1)
    m = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], -1)
    return sc, m


def _pack_q3_scales(u: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 bytes of sixteen 6-bit codes (``u = scale code + 32``): low nibbles, then the top 2 bits."""
    low = (u[..., :8] & 15) | ((u[..., 8:] & 15) << 4)
    return torch.cat([low.to(torch.uint8), pack_fields(u >> 4, 2, 4)], -1)


def _unpack_q3_scales(data: torch.Tensor) -> torch.Tensor:
    b = data.to(torch.int32)
    low = torch.cat([b[..., :8] & 15, b[..., :8] >> 4], -1)
    return low | (unpack_fields(data[..., 8:], 2, 4).to(torch.int32) << 4)


# ----------------------------------------------------------------------------------------------- writing
def block_bytes(module: QuantLinear) -> tuple[np.ndarray, str]:
    """The layer's weight as llama.cpp blocks: uint8 ``[out, in / block * block bytes]`` and the type's name."""
    kind = block_type(module)
    if is_k_type(kind):
        return _k_block_bytes(module, kind).reshape(module.out_features, -1).numpy(), kind
    out_f, in_f = module.out_features, module.in_features
    codes = module.codes().view(out_f, in_f // BLOCK, BLOCK)
    parts = [_fp16_bytes(module.scales.float().view(out_f, -1))]
    if kind in ("Q4_1", "Q5_1"):
        parts.append(_fp16_bytes((-module.zeros.double() * module.scales.double()).view(out_f, -1)))
    if kind == "Q8_0":
        parts.append((codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8))
    else:
        if kind in ("Q5_0", "Q5_1"):  # the fifth bit of element j in bit j of a 32-bit word
            parts.append(pack_fields(codes >> 4, 1, 1))
        parts.append(pack_fields(codes & 0xF, 4, 16))
    return torch.cat(parts, dim=-1).reshape(out_f, -1).numpy(), kind


def _k_block_bytes(module: QuantLinear, kind: str) -> torch.Tensor:
    d, sc, dmin, m = _k_factors(module)
    out_f = module.out_features
    q = module.codes().view(out_f, -1, SUPER_BLOCK)
    if kind == "Q6_K":
        ql = pack_fields(q & 15, 4, 64)
        qh = pack_fields(q >> 4, 2, 32)
        parts = [ql, qh, sc.to(torch.int8).view(torch.uint8), _fp16_bytes(d)]
    elif kind == "Q3_K":
        parts = [pack_fields(q >> 2, 1, 32), pack_fields(q & 3, 2, 32), _pack_q3_scales(sc + 32), _fp16_bytes(d)]
    elif kind == "Q2_K":
        scales = (sc | (m << 4)).to(torch.uint8)
        parts = [scales, pack_fields(q, 2, 32), _fp16_bytes(d), _fp16_bytes(dmin)]
    else:  # Q4_K, Q5_K
        parts = [_fp16_bytes(d), _fp16_bytes(dmin), _pack_scales_12(sc, m)]
        if kind == "Q5_K":
            parts.append(pack_fields(q >> 4, 1, 32))
        parts.append(pack_fields(q & 15, 4, 32))
    return torch.cat(parts, -1)


# ----------------------------------------------------------------------------------------------- reading
def layer_from_blocks(
    data: np.ndarray, kind: str, out_features: int, in_features: int, bias: torch.Tensor | None = None
) -> QuantLinear:
    """A QuantLinear holding the weight of llama.cpp blocks ``data`` (uint8 ``[out, blocks * size]``, rows in the
    model's own order). Q4_0/Q5_0/Q8_0 and the symmetric K types (Q3_K, Q6_K) are read exactly; an offset (Q4_1,
    Q5_1, Q2_K, Q4_K, Q5_K) becomes a float zero point, which gives llama.cpp's weight to fp32 rounding."""
    if is_k_type(kind):
        return _layer_from_k_blocks(data, kind, out_features, in_features, bias)
    spec = GRIDS[kind]
    size = BLOCK_BYTES[kind]
    blocks = torch.from_numpy(np.array(data, dtype=np.uint8)).view(out_features, in_features // BLOCK, size)
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]
    at = 2 if spec.symmetric else 4
    if kind == "Q8_0":
        codes = (blocks[..., at:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    else:
        high = torch.zeros(out_features, in_features // BLOCK, BLOCK, dtype=torch.uint8)
        if spec.bits == 5:
            high = unpack_fields(blocks[..., at : at + 4], 1, 1) << 4
            at += 4
        codes = unpack_fields(blocks[..., at : at + 16], 4, 16) | high
    codes = codes.reshape(out_features, in_features)
    if spec.symmetric:
        zeros = torch.full(d.shape, 1 << (spec.bits - 1), dtype=torch.uint8)
        return QuantLinear.from_codes(codes, d, zeros, spec, bias)
    offset = -_fp16_of(blocks[..., 2:4])  # Q4_1/Q5_1 store m = -offset
    return _asymmetric_layer(codes, d.float(), offset, spec, bias, torch.float16)


def _asymmetric_layer(codes, scale, offset, spec, bias, scale_dtype=torch.float32) -> QuantLinear:
    """A layer of ``q * scale - offset`` (per group), its scales stored in ``scale_dtype``. A group with scale 0 is
    the constant ``-offset``: its codes become 0 and its grid ``(0 - 1) * offset`` (zero point 0 where the offset
    is 0 too)."""
    flat = (scale == 0) & (offset != 0)  # scale 0 and offset 0: every weight 0, zero point 0
    group = spec.group_size
    if bool(flat.any()):
        codes = codes.masked_fill(flat.repeat_interleave(group, dim=1), 0)
    zeros = torch.where(scale == 0, flat.float(), offset / torch.where(scale == 0, torch.ones_like(scale), scale))
    scale = torch.where(flat, offset, scale).to(scale_dtype)
    return QuantLinear.from_codes(codes, scale, zeros, spec, bias, zero_dtype=torch.float32)


def _layer_from_k_blocks(data, kind, out_features, in_features, bias) -> QuantLinear:
    spec = GRIDS[kind]
    blocks = torch.from_numpy(np.array(data, dtype=np.uint8)).view(out_features, -1, SUPER_BLOCK_BYTES[kind])
    dmin = m = None
    if kind == "Q6_K":
        q = unpack_fields(blocks[..., :128], 4, 64) | (unpack_fields(blocks[..., 128:192], 2, 32) << 4)
        sc = blocks[..., 192:208].contiguous().view(torch.int8).to(torch.int32)
        d = _fp16_of(blocks[..., 208:210])
    elif kind == "Q3_K":
        q = (unpack_fields(blocks[..., :32], 1, 32) << 2) | unpack_fields(blocks[..., 32:96], 2, 32)
        sc = _unpack_q3_scales(blocks[..., 96:108]) - 32
        d = _fp16_of(blocks[..., 108:110])
    elif kind == "Q2_K":
        sc, m = blocks[..., :16].to(torch.int32) & 15, blocks[..., :16].to(torch.int32) >> 4
        q = unpack_fields(blocks[..., 16:80], 2, 32)
        d, dmin = _fp16_of(blocks[..., 80:82]), _fp16_of(blocks[..., 82:84])
    else:  # Q4_K, Q5_K
        d, dmin = _fp16_of(blocks[..., 0:2]), _fp16_of(blocks[..., 2:4])
        sc, m = _unpack_scales_12(blocks[..., 4:16])
        q = unpack_fields(blocks[..., -128:], 4, 32)
        if kind == "Q5_K":
            q = q | (unpack_fields(blocks[..., 16:48], 1, 32) << 4)
    codes = q.reshape(out_features, in_features)
    scale = (d.unsqueeze(-1) * sc.float()).reshape(out_features, -1)
    if spec.symmetric:
        zeros = torch.full(scale.shape, 1 << (spec.bits - 1), dtype=torch.uint8)
        return QuantLinear.from_codes(codes, scale, zeros, spec, bias)
    offset = (dmin.unsqueeze(-1) * m.float()).reshape(out_features, -1)
    return _asymmetric_layer(codes, scale, offset, spec, bias)
