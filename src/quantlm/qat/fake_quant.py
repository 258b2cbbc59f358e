"""Fake quantization for quantization-aware training (LLM-QAT, Liu et al. 2023, section 2.2).

Bits are a W-A-KV triple such as 4-8-4; 16 turns a part off. During training:
- weights: per output channel (or per group), symmetric MinMax by default, recomputed from the current weights on
  every step; with ``learnable_clip`` the scales are parameters initialised from MinMax and trained with the
  weights (LSQ-style gradient through ``quantlm.core.fake_quantize``). Scales are rounded to the dtype a checkpoint
  stores them in, so the trained grid is exactly the one that is saved;
- activations: the input of every Linear in the decoder blocks, per token, symmetric MinMax by default; with
  ``act_clip="lsq"`` one learned step per layer instead (LSQ, a static per-tensor grid, started by
  :func:`calibrate_act_steps`), which converts to the static int8 kernel at 8 bits;
- KV cache: keys (after RoPE) and values per token and head (``quantlm.nn.kv_cache``'s fake path).
Every rounding has a straight-through gradient. :func:`prepare_qat` turns a float model into a fake-quantized
one in place; ``quantlm.qat.convert`` turns that into packed QuantLinears afterwards.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantlm.core import QuantSpec, compute_qparams, fake_quantize, quantize
from quantlm.core.activation import (
    INTEGER_ACT_BITS,
    fake_quantize_per_token,
    lsq_fake_quantize,
    lsq_initial_step,
    quantize_per_tensor_int8,
    quantize_per_token_int8,
)
from quantlm.errors import InvalidSpecError
from quantlm.methods.common import is_excluded
from quantlm.methods.qat import QATConfig
from quantlm.models.blocks import find_decoder_blocks, is_linear, linear_weight, set_submodule
from quantlm.nn.kv_cache import enable_fake_kv_quantization
from quantlm.nn.qlinear import storage_scale_dtype
from quantlm.nn.reference import integer_product


def _storage_rounded(scale: Tensor) -> Tensor:
    """``scale`` rounded to the dtype a QuantLinear stores it in, with an identity gradient."""
    stored = scale.detach().to(storage_scale_dtype(scale.detach())).float()
    return scale + (stored - scale).detach()


class FakeQuantLinear(nn.Module):
    """A Linear whose weight and input are rounded onto their grids in the forward pass (straight-through)."""

    quantlm_linear = True  # found as a linear layer by quantlm.models.blocks

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        spec: QuantSpec | None,
        act_bits: int | None,
        act_symmetric: bool = True,
        learnable_clip: bool = False,
        act_clip: str = "minmax",
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.spec = spec
        self.act_bits = act_bits
        self.act_symmetric = act_symmetric
        # LSQ: the activations' learned step (static, per tensor); None: per-token MinMax on every call
        lsq = act_clip == "lsq" and act_bits is not None
        self.act_step = nn.Parameter(torch.ones(1, device=weight.device)) if lsq else None  # [1]: FSDP2 shards no 0-dim
        self.calibrating = False  # calibrate_act_steps: record the LSQ start, leave the input unrounded
        self.clip_scale: Tensor | None = None  # None: MinMax of the current weight on every call
        self.clip_zero: Tensor | None = None
        if learnable_clip and spec is not None:
            scale, zero = compute_qparams(self.weight.detach().float(), spec)
            self.set_grid(scale, zero, learnable=True)

    def set_grid(self, scale: Tensor, zero: Tensor, learnable: bool) -> None:
        """Use this grid from now on: trained with the weights (``learnable``, LSQ-style) or fixed."""
        if self.spec is None:
            raise InvalidSpecError("a layer with 16-bit weights has no weight grid")
        for name in ("clip_scale", "clip_zero"):
            if name in self._parameters:
                del self._parameters[name]
            if name in self._buffers:
                del self._buffers[name]
            self.__dict__.pop(name, None)
        scale = scale.detach().float().clone()
        if learnable:
            self.clip_scale = nn.Parameter(scale)
        else:
            self.register_buffer("clip_scale", scale)
        self.register_buffer("clip_zero", zero.detach().float().clone())

    @property
    def learnable_clip(self) -> bool:
        return isinstance(self.clip_scale, nn.Parameter)

    def grid(self) -> tuple[Tensor, Tensor]:
        """The weight grid (scale, with its gradient when learnable; zero) as the forward pass uses it."""
        if self.clip_scale is not None:
            scale, zero = self.clip_scale.clamp(min=torch.finfo(torch.float16).tiny), self.clip_zero
        else:
            scale, zero = compute_qparams(self.weight.detach().float(), self.spec)
        return _storage_rounded(scale), zero

    def quantized_weight(self) -> Tensor:
        if self.spec is None:
            return self.weight
        scale, zero = self.grid()
        return fake_quantize(self.weight, self.spec, scale, zero)

    def _integer_path(self) -> bool:
        return (
            not torch.is_grad_enabled()
            and not self.calibrating
            and self.act_bits in ((8,) if self.act_step is not None else INTEGER_ACT_BITS)
            and self.act_symmetric
            and self.spec is not None
            and self.spec.granularity in ("channel", "tensor")
        )

    def _integer_forward(self, x: Tensor) -> Tensor:
        """Without gradients (W·A8, W·A4): the product as the converted QuantLinear computes it, integer sums then
        both scales (``quantlm.nn.reference.integer_product``), so a fake-quantized model and its conversion give
        the same numbers and the same roundings downstream."""
        scale, zero = (t.detach() for t in self.grid())
        w_int = quantize(self.weight.detach().float(), scale, zero, self.spec).float() - zero
        x2 = x.reshape(-1, self.in_features)
        if self.act_step is not None:
            codes, x_scale = quantize_per_tensor_int8(x2, self.act_step.detach().float().reshape(1))
        else:
            codes, x_scale = quantize_per_token_int8(x2, self.act_bits)
        y = integer_product(codes, x_scale, w_int, scale.reshape(-1).expand(self.out_features)).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self._integer_path():
            return self._integer_forward(x)
        if self.calibrating:
            with torch.no_grad():
                self.act_step.copy_(lsq_initial_step(x, self.act_bits).reshape(1))
        elif self.act_step is not None:
            x = lsq_fake_quantize(x, self.act_step, self.act_bits)
        elif self.act_bits is not None:
            x = fake_quantize_per_token(x, self.act_bits, self.act_symmetric)
        w = self.quantized_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        w = self.spec.describe() if self.spec else "w16"
        a = (f"a{self.act_bits}" + (" lsq" if self.act_step is not None else "")) if self.act_bits else "a16"
        clip = ", learnable clip" if self.learnable_clip else (", fixed grid" if self.clip_scale is not None else "")
        return f"{self.in_features} -> {self.out_features}, {w}, {a}{clip}"


def fake_quant_linears(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def prepare_qat(model: nn.Module, config: QATConfig) -> nn.Module:
    """Replace every Linear of the decoder blocks by a FakeQuantLinear and fake-quantize the KV cache, in place.

    The output projection (lm_head) and embeddings stay in full precision, as in the paper. Returns ``model``
    with ``model.quantlm_qat_config`` set."""
    blocks = find_decoder_blocks(model)
    spec = config.weight
    for i, block in enumerate(blocks.blocks):
        for name, module in list(block.named_modules()):
            full = f"{blocks.name(i)}.{name}"
            if not is_linear(module) or is_excluded(full, config.exclude):
                continue
            fq = FakeQuantLinear(
                linear_weight(module),
                getattr(module, "bias", None),
                spec,
                config.act_bits,
                config.a_symmetric,
                config.learnable_clip,
                config.act_clip,
            )
            set_submodule(block, name, fq.to(module.weight.device))
    enable_fake_kv_quantization(model, config.kv_config)
    model.quantlm_qat_config = config
    return model


def calibrate_act_steps(model: nn.Module, ids: Tensor) -> int:
    """LSQ's start for every layer with a learned activation step: 2·mean|x|/sqrt(Qp) of its input on one forward
    pass over ``ids``, with no activation rounded meanwhile. Returns the number of layers calibrated."""
    from quantlm.qat.losses import hidden_states_from, output_layer  # the logits are not needed here

    layers = [m for m in fake_quant_linears(model).values() if m.act_step is not None]
    if not layers:
        return 0
    for m in layers:
        m.calibrating = True
    was_training = model.training
    model.eval()
    head = output_layer(model)
    try:
        with torch.no_grad(), hidden_states_from(head) if head is not None else contextlib.nullcontext():
            model(input_ids=ids, use_cache=False)
    finally:
        model.train(was_training)
        for m in layers:
            m.calibrating = False
    return len(layers)
