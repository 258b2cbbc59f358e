"""QuantLinear: a linear layer whose weight is stored as packed low-bit integer codes.

Storage (all buffers, so they travel with ``state_dict``):
- ``qweight``: uint8 [out_features, packed_length(in_features, bits)], the codes packed along in_features;
- ``scales``: [out_features, n_groups] in ``scale_dtype`` (fp16 by default, fp32 where fp16 would overflow);
- ``zeros``: uint8 [out_features, n_groups], integer zero points (2**(bits-1) for symmetric grids);
- ``bias``: optional, in the original float dtype;
- ``g_idx``: optional int32 [in_features], the group of each input column, for GPTQ act-order checkpoints whose
  groups were formed in a permuted column order (absent: column j is in group j // group_size).
The weight follows the GPTQ grid convention of ``quantlm.core``: w = (q - zero) * scale, groups along in_features.

This module's forward is the plain-torch fallback (dequantize, then matmul), always correct on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantlm.core import QuantSpec, compute_qparams, dequantize, pack, quantize, unpack
from quantlm.core.packing import packed_length

def storage_scale_dtype(scale: torch.Tensor) -> torch.dtype:
    """fp16 when every scale is a normal fp16 number (the GPTQ ecosystem's choice), else fp32."""
    fp16 = torch.finfo(torch.float16)
    a = scale.abs()
    return torch.float16 if bool(((a >= fp16.tiny) & (a <= fp16.max)).all()) else torch.float32


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
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        n_groups = spec.n_groups(in_features)
        self.register_buffer(
            "qweight",
            torch.zeros(out_features, packed_length(in_features, spec.bits), dtype=torch.uint8, device=device),
        )
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=scale_dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        if g_idx:
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        else:
            self.g_idx = None

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
    ) -> "QuantLinear":
        """Build from integer codes [out, in], scales and zeros [out, n_groups] (as ``quantlm.core`` returns them).

        ``g_idx`` is kept only when it differs from the natural order j // group_size."""
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
            scale_dtype=scale.dtype,
            dtype=bias.dtype if bias is not None else torch.float32,
            device=codes.device,
            g_idx=g_idx is not None,
        )
        if g_idx is not None:
            module.g_idx.copy_(g_idx.to(torch.int32))
        if spec.granularity == "tensor":
            scale = scale.expand(out_features, 1)
            zero = zero.expand(out_features, 1)
        module.qweight.copy_(pack(codes.to(torch.uint8), spec.bits))
        module.scales.copy_(scale)
        module.zeros.copy_(zero.to(torch.uint8))
        if bias is not None:
            module.bias.copy_(bias.detach())
        return module

    @classmethod
    def from_weight(cls, weight: torch.Tensor, spec: QuantSpec, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Round-to-nearest quantization of a float weight [out, in] on ``spec``'s grid.

        The scales are rounded to their storage dtype *before* the codes are computed, so the stored model is
        exactly the one whose error is measured.
        """
        w = weight.detach().float()
        scale, zero = compute_qparams(w, spec)
        scale = scale.to(storage_scale_dtype(scale))
        codes = quantize(w, scale.float(), zero, spec)
        return cls.from_codes(codes, scale, zero, spec, bias)

    def layout(self) -> dict:
        """What a checkpoint config records of this module: enough to rebuild it empty with ``from_layout``."""
        return {
            **self.spec.to_dict(),
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "g_idx": self.g_idx is not None,
        }

    @classmethod
    def from_layout(cls, layout: dict, scale_dtype: torch.dtype, device: torch.device | str = "meta") -> "QuantLinear":
        """An empty module (on ``device``, meta by default) to be filled by ``load_state_dict(..., assign=True)``."""
        entry = dict(layout)
        in_f, out_f, bias = entry.pop("in_features"), entry.pop("out_features"), entry.pop("bias")
        g_idx = bool(entry.pop("g_idx", False))
        return cls(in_f, out_f, QuantSpec.from_dict(entry), bias=bias, scale_dtype=scale_dtype, device=device, g_idx=g_idx)

    # -- use ------------------------------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.spec.bits, self.in_features)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = self.scales.float()
        zero = self.zeros.float()
        if self.spec.granularity == "tensor":
            scale, zero = scale[:1, :1], zero[:1, :1]
        elif self.g_idx is not None:
            index = self.g_idx.long()
            scale, zero = scale[:, index], zero[:, index]
        return dequantize(self.codes(), scale, zero, self.spec, dtype=dtype)

    @property
    def weight_bytes(self) -> int:
        tensors = [self.qweight, self.scales, self.zeros] + ([self.g_idx] if self.g_idx is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.describe()}"
