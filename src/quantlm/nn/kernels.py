"""Matmul kernels for QuantLinear: each turns the packed storage into what one fast op wants, once, at load time.

A kernel is a small ``nn.Module`` attached to its QuantLinear as ``layer.kernel``; its tensors are non-persistent
buffers (never saved, moved by ``.to(device)``). ``why_not(layer, device)`` says in words why a kernel cannot run a
layer (``None`` when it can), so ``auto`` picks the first kernel that can and ``--kernel NAME`` fails with a reason.

Kernels (y = x Wᵀ + b, W = (q − zero) · scale, as ``quantlm.core`` defines the grid):
- ``int4pack``: weight-only 2-4 bit with groups (or per channel), CPU: ``aten._weight_int4pack_mm_for_cpu``. That
  op computes (q − 8) · s + m per group, so the zero point goes in as m = (8 − zero) · s; 2- and 3-bit codes are
  valid 4-bit codes and run on it unchanged. Act-order layers (non-trivial ``g_idx``) have their columns sorted by
  group once here, and the input is gathered into that order on every call. The op wants group sizes 32-256 that
  divide K and N divisible by 16: rows are padded with zeros to a multiple of 16; larger groups (and per-channel
  grids) are cut into the largest such groups with repeated scales.
- ``int8pack``: weight-only 8 bit per output channel (W8A16), CPU: ``aten._weight_int8pack_mm`` on signed codes
  q − 128; an asymmetric zero point adds the rank-one term (Σx) · (128 − zero) · s.
- ``int8`` (formerly ``int8-dynamic``, still accepted): W8A8, int8 weights per channel (symmetric) times int8
  activations, quantized per token on the fly or with the layer's static per-tensor scale: ``torch._int_mm`` with
  int32 accumulation, then both scales. LLM.int8() layers add their outlier columns in floating point. Layers
  fed the same input tensor (q, k, v; gate, up) quantize it once (``SHARED_INPUT``).
- ``codebook``: NF4/FP4 layers (``spec.codebook``), any device: the packed codes are looked up two per byte in a
  256-entry table of level pairs, multiplied by the group scales and fed to the dense GEMM in the activations'
  dtype (fp32 for bf16 activations on CPUs without native bf16). No CPU op multiplies by a nonlinear 4-bit
  codebook, so this reads the packed weight and writes a dense one on every call: it saves memory, not time.
- ``torch``: the reference math of ``quantlm.nn.reference`` (dequantize, then ``F.linear``; W8A8 as the integer
  product); any device, any layer. It is what the others are tested against.
(The quantization pipeline runs finished layers on a weight dequantized once: ``quantlm.pipeline.dequantized``, not
a kernel of this registry.)

The two weight-only ops take bf16 activations (W4A16, W8A16): their fp32 paths are about 8x slower on an AVX2 CPU,
so a few rows (decode) are rounded to bf16 for the op. From DEQUANT_MIN_ROWS rows on (prefill) they dequantize the
layer once and use the dense GEMM in the activations' dtype (fp32 for bf16 activations on CPUs without native bf16),
which gives the reference's numbers. ``int8`` is taken by ``auto`` only on CPUs with VNNI or AMX: without
them ``torch._int_mm`` is slower than the fp32 GEMM.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantlm.core.codebook import codebook_levels
from quantlm.errors import QuantlmError
from quantlm.hardware import cpu_has_fast_int8, cpu_has_native_bf16
from quantlm.nn.reference import dense_matmul, quantized_rows, reference_matmul

if TYPE_CHECKING:
    from quantlm.nn.qlinear import QuantLinear

DEQUANT_MIN_ROWS = 32  # from this many tokens on, dequantize once and use the dense GEMM (prefill)
OP_DTYPE = torch.bfloat16  # the weight-only CPU ops: their fp32-activation paths are ~8x slower than bf16 (AVX2)
INT4PACK_GROUP_SIZES = (256, 128, 64, 32)
INT4PACK_ROW_MULTIPLE = 16
INT8PACK_K_MULTIPLE = 4  # _weight_int8pack_mm crashes on bf16 inputs when K is not a multiple of 4 (torch 2.13)


def _dense_dtype(x: Tensor) -> torch.dtype:
    """The dtype to run a dense GEMM on ``x`` in: x's, except fp32 for half-precision inputs on CPUs without fast
    bf16."""
    if x.dtype != torch.float32 and x.device.type == "cpu" and not cpu_has_native_bf16():
        return torch.float32
    return x.dtype


def _prefill_matmul(layer: QuantLinear, x2: Tensor) -> Tensor:
    """x2 Wᵀ with the weight dequantized once: for many rows (prefill) the dense GEMM beats the weight-only ops,
    and the dequantization costs little next to it. bf16 inputs are multiplied in fp32 on CPUs without fast bf16."""
    return dense_matmul(layer, x2, _dense_dtype(x2))


def _op_input(x2: Tensor) -> Tensor:
    return x2 if x2.dtype == OP_DTYPE else x2.to(OP_DTYPE)


def _rows(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """x as a contiguous 2-D [tokens, features] tensor, and the leading shape to restore."""
    return x.reshape(-1, x.shape[-1]).contiguous(), tuple(x.shape[:-1])


class Kernel(nn.Module):
    """Base: subclasses set ``name``, implement ``why_not`` (a classmethod) and ``forward`` (x Wᵀ; the layer adds
    its bias)."""

    name = "?"
    cacheable = False  # whether what it prepares is worth keeping on disk (quantlm.nn.kernel_cache)
    replaces_grid = True  # whether its own tensors stand for the layer's scales and zero points too (bytes read)

    def __init__(self, layer: QuantLinear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.out_features = layer.out_features
        self.layer = [layer]  # a list: not a submodule, so the layer is not registered inside itself
        self.from_cache = False

    def prepared(self) -> dict[str, Tensor]:
        """What a kernel cache keeps of a cacheable kernel: the tensors it made from its layer, by name."""
        return {}

    @classmethod
    def why_not(cls, layer: QuantLinear, device: torch.device) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def pays_off(cls, device: torch.device) -> bool:
        """Whether ``auto`` should take this kernel on ``device`` (it may run but be slower than the fallback)."""
        return True

    def extra_repr(self) -> str:
        return self.name


class TorchDequantKernel(Kernel):
    """Dequantize the whole weight on every call, then a dense matmul: correct on every device and layer."""

    name = "torch"

    @classmethod
    def why_not(cls, layer, device):
        return None

    def forward(self, x: Tensor) -> Tensor:
        return reference_matmul(self.layer[0], x)


def _int4pack_group(layer: QuantLinear) -> int | None:
    """The group size the int4 op runs this layer with (None if none fits)."""
    k = layer.in_features
    natural = layer.spec.group_size if layer.spec.granularity == "group" else k
    for g in INT4PACK_GROUP_SIZES:
        if natural % g == 0 and k % g == 0:
            return g
    return None


def _weight_only_cpu(layer: QuantLinear, device: torch.device) -> str | None:
    if device.type != "cpu":
        return "runs on CPU only"
    if layer.act_bits is not None:
        return "weight-only kernel, the layer quantizes activations"
    return None


def _group_order(layer: QuantLinear) -> Tensor | None:
    """For act-order layers: the column permutation that makes every group contiguous (None if already natural)."""
    if layer.g_idx is None:
        return None
    return torch.argsort(layer.g_idx.long(), stable=True)


class Int4PackKernel(Kernel):
    name = "int4pack"

    @classmethod
    def why_not(cls, layer, device):
        reason = _weight_only_cpu(layer, device)
        if reason:
            return reason
        if layer.spec.bits > 4:
            return f"needs at most 4-bit codes, the layer has {layer.spec.bits}"
        if layer.spec.codebook != "none":
            return f"needs an integer grid, the layer has {layer.spec.codebook} levels"
        if layer.spec.granularity not in ("group", "channel"):
            return f"needs group or per-channel scales, the layer has {layer.spec.granularity}"
        if _int4pack_group(layer) is None:
            return (
                f"needs a group size of 32, 64, 128 or 256 (or a multiple) dividing in_features; "
                f"the layer has group {layer.spec.group_size} and in_features {layer.in_features}"
            )
        if layer.g_idx is not None:
            counts = torch.bincount(layer.g_idx.long(), minlength=layer.scales.shape[1])
            full = counts[:-1] if counts.numel() > 1 else counts
            if bool((full != layer.spec.group_size).any()):
                return "act-order groups of unequal size"
        return None

    cacheable = True

    def __init__(
        self, layer: QuantLinear, dtype: torch.dtype = torch.float32, prepared: dict[str, Tensor] | None = None
    ) -> None:
        """``prepared``: this layer's tensors from a kernel cache (``prepared()`` of an earlier kernel), used when
        their shapes and dtypes fit the layer; otherwise the codes are packed here."""
        super().__init__(layer, dtype)
        self.group = _int4pack_group(layer)
        order = _group_order(layer)
        self.register_buffer("order", order, persistent=False)
        self.from_cache = prepared is not None and self._fits(layer, prepared)
        tensors = prepared if self.from_cache else self._pack(layer, order)
        self.register_buffer("packed", tensors["packed"], persistent=False)
        # [K / group, N, 2]: scale and the float offset m = (8 - zero) * scale of each group
        self.register_buffer("scale_offset", tensors["scale_offset"], persistent=False)

    @staticmethod
    def _fits(layer: QuantLinear, prepared: dict[str, Tensor]) -> bool:
        """Whether ``prepared`` has the tensors, shapes, dtypes and device the op needs for a layer of this shape."""
        rows = layer.out_features + (-layer.out_features % INT4PACK_ROW_MULTIPLE)
        k, group = layer.in_features, _int4pack_group(layer)
        want = {"packed": ((rows, k // 2), torch.uint8), "scale_offset": ((k // group, rows, 2), OP_DTYPE)}
        return set(prepared) == set(want) and all(
            tuple(prepared[n].shape) == shape
            and prepared[n].dtype == dtype
            and prepared[n].device == layer.qweight.device
            for n, (shape, dtype) in want.items()
        )

    def prepared(self) -> dict[str, Tensor]:
        return {"packed": self.packed, "scale_offset": self.scale_offset}

    def _pack(self, layer: QuantLinear, order: Tensor | None) -> dict[str, Tensor]:
        # 2- and 3-bit codes are moved to the middle of the 4-bit range (zero points with them), so the op's offset
        # m = (8 - zero) * scale stays small and its bf16 rounding does not cancel against (q - 8) * scale
        shift = 8 - (1 << (layer.spec.bits - 1))
        codes = layer.codes().to(torch.int32)
        scale = layer.scales.float()
        zero = layer.zeros.float()
        if shift:
            codes, zero = codes + shift, zero + shift
        if order is not None:
            codes = codes[:, order]
        repeat = (layer.spec.group_size if layer.spec.granularity == "group" else layer.in_features) // self.group
        scale = scale.repeat_interleave(repeat, dim=1)
        zero = zero.repeat_interleave(repeat, dim=1)
        pad = -layer.out_features % INT4PACK_ROW_MULTIPLE
        if pad:
            codes = F.pad(codes, (0, 0, 0, pad), value=8)
            scale = F.pad(scale, (0, 0, 0, pad))
            zero = F.pad(zero, (0, 0, 0, pad), value=8)
        return {
            "packed": torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1),
            "scale_offset": torch.stack([scale.t(), ((8 - zero) * scale).t()], dim=-1).to(OP_DTYPE).contiguous(),
        }

    def forward(self, x: Tensor) -> Tensor:
        x2, lead = _rows(x)
        if x2.shape[0] >= DEQUANT_MIN_ROWS:
            return _prefill_matmul(self.layer[0], x2).reshape(*lead, self.out_features)
        if self.order is not None:
            x2 = x2.index_select(1, self.order)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(_op_input(x2), self.packed, self.group, self.scale_offset)
        return y[:, : self.out_features].to(x.dtype).reshape(*lead, self.out_features)


def _nibble_layers(layer: QuantLinear) -> tuple[QuantLinear, QuantLinear]:
    """A 5-8-bit layer as two 4-bit layers whose weights add up to its own. With c = q - round(zero) in [-128, 127]
    split as c = 16 h + l (h in [-8, 7], l in [0, 15]): (q - zero) s = (h + 8 - 7.5) 16 s + (l - 8 - r) s, where
    r = zero - round(zero) is the fractional rest of a float zero point (0 for integer ones). The high layer holds
    codes h + 8 on scales 16 s around zero 7.5, the low one codes l on scales s around zero 8 + r: both halves are
    centred (the op's offsets (8 - zero) s are 8 s and -r s), so neither carries a large constant weight whose
    product with an input of nonzero mean the op would round to bf16 before the halves cancel it."""
    from quantlm.core import QuantSpec

    spec = QuantSpec(bits=4, symmetric=False, group_size=layer.spec.group_size, granularity=layer.spec.granularity)
    zero = layer.zeros.float()
    whole = torch.round(zero)
    c = layer.codes().to(torch.int16) - whole.to(torch.int16)[:, _column_groups(layer)]
    scale = layer.scales.float()
    high = layer.__class__.from_codes(
        (c >> 4) + 8, scale * 16, torch.full_like(zero, 7.5), spec, zero_dtype=torch.float32
    )
    low = layer.__class__.from_codes(c & 15, scale, 8 + zero - whole, spec, zero_dtype=torch.float32)
    return high, low


def _column_groups(layer: QuantLinear) -> Tensor:
    """The scale column of each input column (groups in column order)."""
    if layer.spec.granularity == "group":
        return torch.arange(layer.in_features) // layer.spec.group_size
    return torch.zeros(layer.in_features, dtype=torch.long)


class Int4PairKernel(Kernel):
    """5-8-bit integer grids on the int4 op, twice: the centered codes' high and low nibbles as two 4-bit layers
    (``_nibble_layers``) whose products add up. For few rows (decode), where the plain kernel would unpack and
    dequantize every weight on every token; many rows dequantize once and use the dense GEMM, as int4pack does."""

    name = "int4x2"

    @classmethod
    def why_not(cls, layer, device):
        reason = _weight_only_cpu(layer, device)
        if reason:
            return reason
        if not 5 <= layer.spec.bits <= 8:
            return f"needs 5- to 8-bit codes, the layer has {layer.spec.bits}"
        if layer.spec.codebook != "none" or layer.outlier_threshold is not None:
            return "needs a plain integer grid"
        if layer.spec.granularity not in ("group", "channel") or _int4pack_group(layer) is None:
            return "needs groups the int4 op runs (32, 64, 128, 256 or a multiple, dividing in_features)"
        if layer.g_idx is not None:
            return "needs groups in column order (no act-order g_idx)"
        whole = torch.round(layer.zeros.float())  # codes q in [0, maxq]: q - whole in [-whole, maxq - whole]
        if bool((whole > 128).any()) or bool((whole < layer.spec.maxq - 127).any()):
            return "needs codes within 128 of their zero point (8-bit asymmetric grids whose zero is not 127 or 128)"
        return None

    cacheable = True
    HALVES = ("high", "low")

    def __init__(
        self, layer: QuantLinear, dtype: torch.dtype = torch.float32, prepared: dict[str, Tensor] | None = None
    ) -> None:
        """``prepared``: both halves' tensors from a kernel cache (``prepared()`` of an earlier kernel); a half
        has the layer's own shapes, so the layer stands in for the 4-bit half when they are checked."""
        super().__init__(layer, dtype)
        halves = {
            h: {n.removeprefix(f"{h}_"): t for n, t in (prepared or {}).items() if n.startswith(f"{h}_")}
            for h in self.HALVES
        }
        if all(Int4PackKernel._fits(layer, half) for half in halves.values()):
            kernels = {h: Int4PackKernel(layer, dtype, halves[h]) for h in self.HALVES}
        else:
            kernels = dict(zip(self.HALVES, (Int4PackKernel(half, dtype) for half in _nibble_layers(layer))))
        self.high, self.low = kernels["high"], kernels["low"]
        self.from_cache = self.high.from_cache and self.low.from_cache
        for half in (self.high, self.low):  # the halves' packed tensors are all they need; let their layers go
            half.layer = self.layer

    def prepared(self) -> dict[str, Tensor]:
        """Both halves' tensors as ``high_packed``, ``low_scale_offset``, ...: no dots, since the kernel cache
        splits its keys at the last one."""
        return {f"{h}_{n}": t for h in self.HALVES for n, t in getattr(self, h).prepared().items()}

    def forward(self, x: Tensor) -> Tensor:
        x2, lead = _rows(x)
        if x2.shape[0] >= DEQUANT_MIN_ROWS:
            return _prefill_matmul(self.layer[0], x2).reshape(*lead, self.out_features)
        return self.high(x) + self.low(x)


class UnpackedKernel(Kernel):
    """The plain kernel's dequantize-then-matmul with the codes unpacked once, as uint8 (one byte per weight; 8-bit
    codes are already that), so a call only subtracts zero points and multiplies scales: for grids no integer op
    runs (groups of 16 as in Q2_K/Q3_K/Q6_K, 8-bit asymmetric groups), where unpacking 3-, 5- or 6-bit fields on
    every call dominates decoding. CPU only: on a GPU the unpacked copy would cost memory the plain kernel spares."""

    name = "unpacked"
    replaces_grid = False  # it reads the layer's scales and zero points on every call

    @classmethod
    def why_not(cls, layer, device):
        reason = _weight_only_cpu(layer, device)
        if reason:
            return reason
        if layer.zeros is None:
            return "needs an integer grid (codebook layers run on the codebook kernel)"
        if layer.spec.granularity not in ("group", "channel") or layer.g_idx is not None:
            return "needs group or per-channel grids in column order"
        if layer.spec.granularity == "group" and layer.in_features % layer.spec.group_size:
            return "needs whole groups"
        return None

    def __init__(self, layer: QuantLinear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(layer, dtype)
        groups = layer.scales.shape[1]
        codes = layer.qweight if layer.spec.bits == 8 else layer.codes()  # 8-bit packing is the codes themselves
        self.register_buffer("codes", codes.view(layer.out_features, groups, -1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer[0]
        x2, lead = _rows(x)
        # fp32 elementwise work is faster than bf16's on CPUs; few rows (decode) also multiply in fp32
        w = self.codes.float().sub_(layer.zeros.float().unsqueeze(-1)).mul_(layer.scales.float().unsqueeze(-1))
        dtype = _dense_dtype(x2) if x2.shape[0] >= DEQUANT_MIN_ROWS else torch.float32
        y = F.linear(x2.to(dtype), w.view(layer.out_features, -1).to(dtype))
        return y.to(x.dtype).reshape(*lead, self.out_features)


def _signed_codes(layer: QuantLinear) -> Tensor:
    """Codes of a symmetric grid as int8 around its zero 2**(bits-1) (128 at 8 bits)."""
    return (layer.codes().to(torch.int16) - (1 << (layer.spec.bits - 1))).to(torch.int8)


def _per_channel_8bit(layer: QuantLinear) -> str | None:
    if layer.spec.bits != 8:
        return f"needs 8-bit weights, the layer has {layer.spec.bits}"
    if layer.spec.granularity not in ("channel", "tensor"):
        return f"needs one scale per output channel, the layer has {layer.spec.describe()}"
    return None


class Int8PackKernel(Kernel):
    name = "int8pack"

    @classmethod
    def why_not(cls, layer, device):
        reason = _weight_only_cpu(layer, device)
        if reason:
            return reason
        reason = _per_channel_8bit(layer)
        if reason:
            return reason
        if layer.in_features % INT8PACK_K_MULTIPLE:
            return f"needs in_features divisible by {INT8PACK_K_MULTIPLE}, the layer has {layer.in_features}"
        return None

    def __init__(self, layer: QuantLinear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(layer, dtype)
        scale, zero = layer.row_params()
        self.register_buffer("weight", _signed_codes(layer), persistent=False)
        self.register_buffer("scale", scale.to(OP_DTYPE), persistent=False)
        offset = (128 - zero) * scale
        self.register_buffer("offset", offset if bool(offset.any()) else None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x2, lead = _rows(x)
        if x2.shape[0] >= DEQUANT_MIN_ROWS:
            return _prefill_matmul(self.layer[0], x2).reshape(*lead, self.out_features)
        y = torch.ops.aten._weight_int8pack_mm(_op_input(x2), self.weight, self.scale).to(x.dtype)
        if self.offset is not None:
            y = y + (x2.float().sum(dim=1, keepdim=True) * self.offset).to(y.dtype)
        return y.reshape(*lead, self.out_features)


class _SharedInputCodes(threading.local):
    """The int8 form of the last input seen, so that Linears fed the same tensor (q, k and v; gate and up) quantize
    it once. A hit needs the very same tensor object, unchanged since (its version counter), and the same
    activation grid. Inference-mode tensors keep no version counter, so under ``torch.inference_mode`` nothing is
    shared and every layer quantizes its own input; nor is anything shared while ``torch.compile`` traces (the
    compiled graph fuses the quantization instead). The entry holds the last input until the next call."""

    def __init__(self) -> None:
        self.entry: tuple | None = None

    def get(self, x: Tensor, key: tuple, compute):
        if torch.compiler.is_compiling():
            return compute()
        try:
            version = x._version
        except RuntimeError:  # an inference tensor
            return compute()
        entry = self.entry
        if entry is not None and entry[0] is x and entry[1] == version and entry[2] == key:
            return entry[3]
        value = compute()
        self.entry = (x, version, key, value)
        return value

    def clear(self) -> None:
        self.entry = None


SHARED_INPUT = _SharedInputCodes()


class Int8GemmKernel(Kernel):
    """W8A8 (and W4A8, W4A4 and the like) on ``torch._int_mm``: symmetric weights per output channel, as int8 codes,
    times int8 activations, quantized per token on the fly or with the layer's static per-tensor scale, int32
    accumulation, then both scales. 4-bit activations are codes in [-7, 7] in the same int8 product: exact, at
    int8 speed (torch has no int4 x int4 CPU op). LLM.int8()
    layers multiply their outlier columns in floating point with those columns of the dequantized weight."""

    name = "int8"

    @classmethod
    def why_not(cls, layer, device):
        if device.type != "cpu":
            return "runs on CPU only (torch._int_mm on CUDA needs more than 16 rows)"
        if layer.act_bits is None:
            return "needs a layer with quantized activations (8 or 4 bits)"
        if layer.spec.granularity not in ("channel", "tensor"):
            return f"needs one scale per output channel, the layer has {layer.spec.describe()}"
        if not layer.spec.symmetric:
            return "needs symmetric weights"
        return None

    @classmethod
    def pays_off(cls, device):
        return cpu_has_fast_int8()

    def __init__(self, layer: QuantLinear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(layer, dtype)
        scale, _ = layer.row_params()
        self.register_buffer("weight_t", _signed_codes(layer).t(), persistent=False)  # [in, out], column-major
        self.register_buffer("scale", scale, persistent=False)
        static = None if layer.act_scale is None else float(layer.act_scale)
        self.input_key = (layer.act_bits, layer.act_granularity, static, layer.outlier_threshold)

    def forward(self, x: Tensor) -> Tensor:
        lead = tuple(x.shape[:-1])
        codes, x_scale, outliers, cols = SHARED_INPUT.get(
            x, self.input_key, lambda: quantized_rows(self.layer[0], x.reshape(-1, x.shape[-1]).contiguous())
        )
        # int32 -> fp32, then the scales in place, in the order of reference.integer_product (int32 * fp32
        # promotes 2x slower)
        y = torch._int_mm(codes, self.weight_t).float().mul_(x_scale).mul_(self.scale).to(x.dtype)
        if cols is not None and cols.numel():
            columns = (self.weight_t.index_select(0, cols).float() * self.scale).to(x.dtype)  # [n_outliers, out]
            y = y + outliers @ columns
        return y.reshape(*lead, self.out_features)


@functools.cache
def _level_quads(codebook: str, device: torch.device) -> Tensor:
    """[65536, 4]: the levels of the four 4-bit codes packed in every 16-bit word (``quantlm.core.packing``'s
    order read as little-endian int16), one table per codebook and device, shared by every layer."""
    levels = codebook_levels(codebook, device)
    word = torch.arange(1 << 16, device=device)
    return torch.stack([levels[(word >> shift) & 15] for shift in (0, 4, 8, 12)], dim=1)


class CodebookKernel(Kernel):
    """NF4/FP4 layers: four levels per packed 16-bit word from a shared table, times the group scales, then the
    dense GEMM. The table is no buffer of the kernel, so the packed codes count as what it reads."""

    name = "codebook"

    @classmethod
    def why_not(cls, layer, device):
        if layer.spec.codebook == "none":
            return "needs a codebook (nf4, fp4) layer"
        if layer.g_idx is not None:
            return "needs groups in natural column order"
        if layer.qweight.shape[1] % 2 or sys.byteorder != "little":
            return (
                "reads the codes as 16-bit words: needs ceil(in_features / 2) even (the layer has "
                f"{layer.in_features}) on a little-endian machine"
            )
        return None

    def weight(self, dtype: torch.dtype) -> Tensor:
        """The dequantized weight [out, in] in ``dtype`` (computed in fp32, as the reference computes it)."""
        layer = self.layer[0]
        out, k = layer.out_features, layer.in_features
        words = layer.qweight.view(torch.int16).reshape(-1).int() & 0xFFFF
        values = _level_quads(layer.spec.codebook, layer.qweight.device).index_select(0, words).view(out, -1)[:, :k]
        scales = layer.scales.float()
        size = k if layer.spec.granularity == "channel" else layer.spec.group_size
        if k % size == 0:
            w = values.reshape(out, k // size, size) * scales.unsqueeze(-1)
        else:
            w = values * scales.index_select(1, torch.arange(k, device=scales.device) // size)
        return w.reshape(out, k).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        dtype = _dense_dtype(x)
        return F.linear(x.to(dtype), self.weight(dtype)).to(x.dtype)


KERNELS: dict[str, type[Kernel]] = {
    k.name: k
    for k in (
        Int4PackKernel,
        Int4PairKernel,
        Int8PackKernel,
        Int8GemmKernel,
        CodebookKernel,
        UnpackedKernel,
        TorchDequantKernel,
    )
}
KERNEL_ALIASES = {"int8-dynamic": "int8"}  # the int8 kernel's name before it took static and LLM.int8() layers
AUTO_ORDER = ("int8", "int4pack", "int8pack", "int4x2", "codebook", "unpacked", "torch")
KERNEL_CHOICES = ("auto", *KERNELS, *KERNEL_ALIASES)


def choose_kernel(layer: QuantLinear, name: str = "auto", device: torch.device | None = None) -> type[Kernel]:
    """The kernel class for ``layer``: the first of AUTO_ORDER that can run it, or ``name`` if it can."""
    device = device if device is not None else layer.qweight.device
    if name == "auto":
        for candidate in AUTO_ORDER:
            kernel = KERNELS[candidate]
            if kernel.why_not(layer, device) is None and kernel.pays_off(device):
                return kernel
    kernel = KERNELS.get(KERNEL_ALIASES.get(name, name))
    if kernel is None:
        raise QuantlmError(f"unknown kernel '{name}': choose one of {', '.join(KERNEL_CHOICES)}")
    reason = kernel.why_not(layer, device)
    if reason is not None:
        raise QuantlmError(f"kernel '{name}' cannot run a {layer.describe()} layer: it {reason}; use --kernel auto")
    return kernel
