"""QuantLinear: a linear layer whose weight is stored as packed low-bit integer codes.

Storage (all buffers, so they travel with ``state_dict``):
- ``qweight``: uint8 [out_features, packed_length(in_features, bits)], the codes packed along in_features;
- ``scales``: [out_features, n_groups] in ``scale_dtype`` (fp16 by default, fp32 where fp16 would overflow); with
  ``double_quant`` they are stored double-quantized instead (``scale_codes`` uint8 [out_features, n_groups] of
  log2 scale, ``scale_range`` fp32 [n_blocks, 2], the log2 range of each block of 256: ``quantlm.core.codebook``)
  and ``scales`` is their decoding (fp16 where it fits), kept in memory only: double quantization makes the
  checkpoint smaller, not the loaded model;
- ``zeros``: [out_features, n_groups], the zero points: uint8 integers (2**(bits-1) for symmetric grids), or fp16 /
  fp32 (``zero_dtype``) for methods that solve for a fractional zero point (HQQ); absent for codebook grids
  (``spec.codebook``: NF4, FP4), whose weight is ``level[q] * scale``;
- ``bias``: optional, in the original float dtype;
- ``g_idx``: optional int32 [in_features], the group of each input column, for GPTQ act-order checkpoints whose
  groups were formed in a permuted column order (absent: column j is in group j // group_size).
The weight follows the GPTQ grid convention of ``quantlm.core``: w = (q - zero) * scale, groups along in_features.
``act_bits`` 8 makes it a W8A8 layer: its input is quantized to int8 on every call, per token with a scale of its
own (``act_granularity="token"``, dynamic) or per tensor with the calibrated scale in the ``act_scale`` buffer
(``"tensor"``, static). ``act_bits`` 4 makes it W4A4 (or W8A4): per token, codes in [-7, 7], held in int8 and
multiplied by the same integer product (no CPU op multiplies int4 by int4). ``outlier_threshold`` makes it an
LLM.int8() layer: the input columns in which some |x| >= threshold are multiplied in floating point (with the
dequantized weight columns), the rest in int8.

The matmul is done by a kernel (``quantlm.nn.kernels``) chosen with :meth:`QuantLinear.use_kernel`; until one is
chosen it is the plain-torch reference (``quantlm.nn.reference``: dequantize, then matmul), correct on any device.
Imports go one way: qlinear -> kernels -> reference, and qlinear -> reference.
"""

from __future__ import annotations

import torch
from torch import nn

from quantlm.core import QuantSpec, compute_qparams, dequantize, pack, quantize, unpack
from quantlm.core.activation import ACT_GRANULARITIES, INTEGER_ACT_BITS, quantize_int8
from quantlm.core.codebook import SCALE_BLOCK, DoubleQuantScales, decode
from quantlm.core.packing import packed_length
from quantlm.errors import InvalidSpecError
from quantlm.nn.autograd import matmul_with_input_grad
from quantlm.nn.kernels import Kernel, choose_kernel
from quantlm.nn.reference import reference_matmul

ACT_BITS = (None, *INTEGER_ACT_BITS)
ZERO_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}


def check_act_bits(act_bits) -> int | None:
    if act_bits not in ACT_BITS or isinstance(act_bits, bool):
        raise InvalidSpecError(f"activation bits must be 8 (W8A8), 4 (W4A4, per token) or none, got {act_bits!r}")
    return None if act_bits is None else int(act_bits)


def check_act_granularity(granularity) -> str:
    if granularity not in ACT_GRANULARITIES:
        raise InvalidSpecError(
            f"activation granularity must be 'token' (dynamic) or 'tensor' (static, calibrated), got {granularity!r}"
        )
    return granularity


def check_outlier_threshold(threshold) -> float | None:
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise InvalidSpecError(f"the outlier threshold must be a positive number such as 6.0, got {threshold!r}")
    return float(threshold)


def storage_scale_dtype(scale: torch.Tensor, spec: QuantSpec | None = None) -> torch.dtype:
    """fp16 when every scale is a normal fp16 number (the GPTQ ecosystem's choice), else fp32; always fp32 for
    ``spec``'s super-block grids (``scale_bits``), whose scales are fp16 factors times codes."""
    if spec is not None and spec.scale_bits is not None:
        return torch.float32
    fp16 = torch.finfo(torch.float16)
    a = scale.abs()
    return torch.float16 if bool(((a >= fp16.tiny) & (a <= fp16.max)).all()) else torch.float32


FP16_ZERO_MAX_BITS = 5  # fp16 holds zeros up to 31 to 1/64 of a step; wider grids keep fp32 zeros


def storage_zero_dtype(zero: torch.Tensor, bits: int) -> torch.dtype:
    """For fractional zero points of a ``bits``-bit grid: fp16 up to FP16_ZERO_MAX_BITS bits when every one is
    within fp16's range, else fp32 (an fp16 zero near 200 is only resolved to 1/8 of a step)."""
    fits = bits <= FP16_ZERO_MAX_BITS and bool((zero.abs() <= torch.finfo(torch.float16).max).all())
    return torch.float16 if fits else torch.float32


def layout_scale_dtype(layout: dict, tensors: dict[str, torch.Tensor], name: str) -> torch.dtype | None:
    """The dtype a stored module's ``scales`` have in memory (None when the stored tensors lack them)."""
    if layout.get("double_quant"):
        stored = f"{name}.scale_codes" in tensors and f"{name}.scale_range" in tensors
        return torch.float32 if stored else None
    scales = tensors.get(f"{name}.scales")
    return None if scales is None else scales.dtype


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        *,
        bias: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        g_idx: bool = False,
        act_bits: int | None = None,
        act_granularity: str = "token",
        outlier_threshold: float | None = None,
        zero_dtype: torch.dtype = torch.uint8,
        double_quant: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.act_bits = check_act_bits(act_bits)
        self.act_granularity = check_act_granularity(act_granularity)
        self.outlier_threshold = check_outlier_threshold(outlier_threshold)
        if self.act_bits != 8 and (self.act_granularity != "token" or self.outlier_threshold is not None):
            raise InvalidSpecError("per-tensor activations and outlier thresholds need 8-bit activations (act_bits=8)")
        if self.act_granularity == "tensor" and self.outlier_threshold is not None:
            raise InvalidSpecError("LLM.int8() layers quantize activations per token: drop the per-tensor setting")
        if spec.codebook != "none" and self.act_bits is not None:
            raise InvalidSpecError(f"{spec.codebook} layers are weight-only: drop the activation bits")
        if zero_dtype not in ZERO_DTYPES.values():
            raise InvalidSpecError(f"zero points are stored as uint8, float16 or float32, not {zero_dtype}")
        self.kernel: Kernel | None = None
        self.double_quant = bool(double_quant)
        n_groups = spec.n_groups(in_features)
        self.register_buffer(
            "qweight",
            torch.zeros(out_features, packed_length(in_features, spec.bits), dtype=torch.uint8, device=device),
        )
        if self.double_quant:
            n_blocks = -(-out_features * n_groups // SCALE_BLOCK)
            self.register_buffer("scale_codes", torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device))
            self.register_buffer("scale_range", torch.zeros(n_blocks, 2, dtype=torch.float32, device=device))
            self.register_load_state_dict_post_hook(lambda module, _: module.decode_scales())
        self.register_buffer(
            "scales",
            torch.ones(out_features, n_groups, dtype=scale_dtype, device=device),
            persistent=not self.double_quant,
        )
        if spec.has_zero_point:
            self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=zero_dtype, device=device))
        else:
            self.zeros = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        if g_idx:
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        else:
            self.g_idx = None
        if self.act_granularity == "tensor":
            self.register_buffer("act_scale", torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.act_scale = None

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        spec: QuantSpec,
        bias: torch.Tensor | None = None,
        g_idx: torch.Tensor | None = None,
        act_bits: int | None = None,
        act_scale: torch.Tensor | None = None,
        outlier_threshold: float | None = None,
        zero_dtype: torch.dtype = torch.uint8,
    ) -> QuantLinear:
        """Build from integer codes [out, in], scales and zeros [out, n_groups] (as ``quantlm.core`` returns them).

        ``scale`` may be ``DoubleQuantScales`` (the codes computed with its decoding): the layer stores them
        double-quantized. ``zero`` is ignored for codebook grids; ``zero_dtype`` float16/float32 keeps fractional
        zero points (super-block grids with fractional zeros always keep fp32 ones). ``g_idx`` is kept only when it
        differs from the natural order j // group_size. ``act_scale`` (a static per-tensor activation scale) makes
        the activations per tensor; ``outlier_threshold`` makes an LLM.int8() layer."""
        double_quant = isinstance(scale, DoubleQuantScales)
        if spec.fractional_zero and zero_dtype == torch.uint8:
            zero_dtype = torch.float32
        if g_idx is not None and spec.granularity == "group":
            natural = torch.arange(codes.shape[1], device=g_idx.device) // spec.group_size
            if torch.equal(g_idx.to(natural.dtype), natural):
                g_idx = None
        elif g_idx is not None:
            g_idx = None
        out_features, in_features = codes.shape
        module = cls(
            in_features,
            out_features,
            spec,
            bias=bias is not None,
            scale_dtype=scale.decode().dtype if double_quant else scale.dtype,
            dtype=bias.dtype if bias is not None else torch.float32,
            device=codes.device,
            g_idx=g_idx is not None,
            act_bits=act_bits,
            act_granularity="token" if act_scale is None else "tensor",
            outlier_threshold=outlier_threshold,
            zero_dtype=zero_dtype,
            double_quant=double_quant,
        )
        if act_scale is not None:
            module.act_scale.copy_(torch.as_tensor(act_scale, dtype=torch.float32).reshape(1))
        if g_idx is not None:
            module.g_idx.copy_(g_idx.to(torch.int32))
        if spec.granularity == "tensor":
            scale = scale.expand(out_features, 1)
            zero = zero.expand(out_features, 1)
        module.qweight.copy_(pack(codes.to(torch.uint8), spec.bits))
        if double_quant:
            module.scale_codes.copy_(scale.codes)
            module.scale_range.copy_(scale.log_range)
            module.decode_scales()
        else:
            module.scales.copy_(scale)
        if module.zeros is not None:
            module.zeros.copy_(zero.to(zero_dtype))
        if bias is not None:
            module.bias.copy_(bias.detach())
        return module

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        spec: QuantSpec,
        bias: torch.Tensor | None = None,
        act_bits: int | None = None,
        act_scale: torch.Tensor | None = None,
        outlier_threshold: float | None = None,
        double_quant: bool = False,
    ) -> QuantLinear:
        """Round-to-nearest quantization of a float weight [out, in] on ``spec``'s grid.

        The scales are rounded to their storage dtype (or double-quantized) *before* the codes are computed, so the
        stored model is exactly the one whose error is measured.
        """
        w = weight.detach().float()
        scale, zero = compute_qparams(w, spec)
        stored = DoubleQuantScales.of(scale) if double_quant else scale.to(storage_scale_dtype(scale, spec))
        used = stored.decode() if double_quant else stored.float()
        codes = quantize(w, used, zero, spec)
        return cls.from_codes(
            codes, stored, zero, spec, bias, act_bits=act_bits, act_scale=act_scale, outlier_threshold=outlier_threshold
        )

    def decode_scales(self) -> None:
        """Recompute ``scales`` from their double-quantized form (after it was loaded or set)."""
        if self.double_quant and not (self.scale_codes.is_meta or self.scale_range.is_meta):
            self.scales = DoubleQuantScales(self.scale_codes, self.scale_range).decode()

    def layout(self) -> dict:
        """What a checkpoint config records of this module: enough to rebuild it empty with ``from_layout``."""
        layout = {
            **self.spec.to_dict(),
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "g_idx": self.g_idx is not None,
        }
        if self.act_bits is not None:
            layout["act_bits"] = self.act_bits
        if self.act_granularity != "token":
            layout["act_granularity"] = self.act_granularity
        if self.outlier_threshold is not None:
            layout["outlier_threshold"] = self.outlier_threshold
        if self.zeros is not None and self.zeros.dtype != torch.uint8:
            layout["zero_dtype"] = str(self.zeros.dtype).removeprefix("torch.")
        if self.double_quant:
            layout["double_quant"] = True
        return layout

    @classmethod
    def from_layout(cls, layout: dict, scale_dtype: torch.dtype, device: torch.device | str = "meta") -> QuantLinear:
        """An empty module (on ``device``, meta by default) to be filled by ``load_state_dict(..., assign=True)``."""
        entry = dict(layout)
        in_f, out_f, bias = entry.pop("in_features"), entry.pop("out_features"), entry.pop("bias")
        g_idx = bool(entry.pop("g_idx", False))
        act = {k: entry.pop(k) for k in ("act_bits", "act_granularity", "outlier_threshold") if k in entry}
        zero_dtype = entry.pop("zero_dtype", "uint8")
        if zero_dtype not in ZERO_DTYPES:
            raise InvalidSpecError(f"unknown zero-point dtype {zero_dtype!r}: expected one of {', '.join(ZERO_DTYPES)}")
        double_quant = bool(entry.pop("double_quant", False))
        return cls(
            in_f,
            out_f,
            QuantSpec.from_dict(entry),
            bias=bias,
            scale_dtype=scale_dtype,
            device=device,
            g_idx=g_idx,
            zero_dtype=ZERO_DTYPES[zero_dtype],
            double_quant=double_quant,
            **act,
        )

    # -- use ------------------------------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.spec.bits, self.in_features)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] on its grid, computed in fp32 and returned in ``dtype``."""
        k, g = self.in_features, self.spec.group_size
        if self.spec.granularity in ("group", "channel") and self.g_idx is None and (g < 0 or k % g == 0):
            # whole groups in natural order: broadcast each group's scale over a [out, groups, size] view
            codes = self.codes().view(self.out_features, self.scales.shape[1], -1)
            if self.zeros is None:
                values = decode(codes, self.spec.codebook)
            else:
                values = codes.float() - self.zeros.float().unsqueeze(-1)
            w = values * self.scales.float().unsqueeze(-1)
            return w.view(self.out_features, k).to(dtype)
        scale = self.scales.float()
        zero = self.zeros.float() if self.zeros is not None else torch.zeros_like(scale)
        if self.spec.granularity == "tensor":
            scale, zero = scale[:1, :1], zero[:1, :1]
        elif self.g_idx is not None:
            index = self.g_idx.long()
            scale, zero = scale[:, index], zero[:, index]
        return dequantize(self.codes(), scale, zero, self.spec, dtype=dtype)

    def stored_tensors(self) -> list[torch.Tensor]:
        """The tensors a checkpoint holds for the weight (codes, scales or their double-quantized form, zeros,
        g_idx), without the bias."""
        scales = [self.scale_codes, self.scale_range] if self.double_quant else [self.scales]
        return [t for t in (self.qweight, *scales, self.zeros, self.g_idx) if t is not None]

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored_tensors())

    def describe(self) -> str:
        """e.g. 'w4 g64 asym', 'nf4 g64 dq', 'w4 g64 asym fp16-zeros', 'w8 per-channel sym a8',
        'w8 per-channel sym a8 per-tensor' or 'w8 per-channel sym a8 outliers>=6'."""
        text = self.spec.describe()
        if self.double_quant:
            text += " dq"
        if self.zeros is not None and self.zeros.dtype != torch.uint8:
            text += f" {str(self.zeros.dtype).removeprefix('torch.').replace('float', 'fp')}-zeros"
        if self.act_bits is None:
            return text
        text = f"{text} a{self.act_bits}"
        if self.act_granularity != "token":
            text += f" per-{self.act_granularity}"
        if self.outlier_threshold is not None:
            text += f" outliers>={self.outlier_threshold:g}"
        return text

    def use_kernel(
        self, name: str = "auto", dtype: torch.dtype = torch.float32, prepared: dict[str, torch.Tensor] | None = None
    ) -> str:
        """Prepare the matmul kernel ``name`` (``auto``: the fastest that can run this layer on its device) for
        activations of ``dtype``; return the name of the kernel chosen. Call it again after moving the layer to
        another device. ``prepared``: a cacheable kernel's tensors from a kernel cache (``quantlm.nn.kernel_cache``)."""
        kernel = choose_kernel(self, name, self.qweight.device)
        self.kernel = kernel(self, dtype, prepared) if kernel.cacheable and prepared else kernel(self, dtype)
        return kernel.name

    def row_scaled(self) -> bool:
        """Whether the weight is integer codes times one scale per output row (per channel or per tensor)."""
        return self.spec.granularity in ("channel", "tensor")

    def row_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For row-scaled weights: scale and zero as fp32 vectors [out_features] (a per-tensor grid on every row)."""
        scale = self.scales.float()[:, 0].expand(self.out_features).contiguous()
        zeros = self.zeros if self.zeros is not None else torch.zeros_like(self.scales)
        zero = zeros.float()[:, 0].expand(self.out_features).contiguous()
        return scale, zero

    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For row-scaled weights: (codes − zero) as fp32 integers [out, in] and the row scales [out]."""
        scale, zero = self.row_params()
        return self.codes().float() - zero.unsqueeze(1), scale

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A W8A8 (W4A4) layer's input as int8 codes (in [-7, 7]) and fp32 scales (per token, or the static
        per-tensor scale)."""
        return quantize_int8(x, self.act_granularity, self.act_scale, self.act_bits)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x Wᵀ without the bias, by dequantizing the weight: the plain-torch path (``quantlm.nn.reference``, whose
        docstring says how W8A8 and LLM.int8() layers compute)."""
        return reference_matmul(self, x)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x Wᵀ without the bias, on the layer's kernel (the reference until one is chosen)."""
        return self.kernel(x) if self.kernel is not None else self.reference_forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # as nn.Linear under autocast: compute and return in its dtype
            x = x.to(torch.get_autocast_dtype(x.device.type))
        # a frozen weight: when x needs a gradient (adapters train upstream), backward recomputes the dense weight
        # layer by layer instead of keeping one per layer alive (quantlm.nn.autograd)
        y = matmul_with_input_grad(self, x) if torch.is_grad_enabled() and x.requires_grad else self.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.describe()}"
