"""From a fake-quantized (QAT) model to a real quantized one: packed QuantLinears, integer activations where A=8
or A=4 (4-bit codes run on the int8 GEMM), and the quantized KV cache.

Each FakeQuantLinear's weight is encoded on the very grid its forward pass used (MinMax of the trained weight, or
the learned clipping scales, rounded to the stored dtype), so the converted model computes what was trained up to
floating-point summation order.
"""

from __future__ import annotations

from torch import nn

from quantlm.core import quantize
from quantlm.core.activation import INTEGER_ACT_BITS
from quantlm.errors import InvalidSpecError
from quantlm.models.blocks import set_submodule
from quantlm.nn.kv_cache import enable_fake_kv_quantization, enable_kv_quantization
from quantlm.nn.qlinear import QuantLinear, storage_scale_dtype
from quantlm.qat.fake_quant import FakeQuantLinear, fake_quant_linears


def convertible(config) -> None:
    """Raise a one-line error for QAT settings that have no real (integer-kernel) form."""
    if config.act_bits is not None and (config.act_bits not in INTEGER_ACT_BITS or not config.a_symmetric):
        raise InvalidSpecError(
            f"only symmetric 8- or 4-bit activations run on integer kernels; a {config.act_bits}-bit "
            f"{'symmetric' if config.a_symmetric else 'asymmetric'} activation grid can be trained and evaluated "
            "but not converted: use --a-bits 8, 4 or 16"
        )
    if config.act_clip == "lsq" and config.act_bits != 8:
        raise InvalidSpecError(
            f"a learned (LSQ) activation step converts to the static int8 grid only, not {config.act_bits} bits: "
            "use --a-bits 8, or --act-clip minmax"
        )
    if config.act_bits is not None and config.weight is None:
        raise InvalidSpecError(
            f"{config.act_bits}-bit activations with 16-bit weights have no kernel here: quantize the weights too"
        )


def to_quant_linear(fq: FakeQuantLinear) -> nn.Module:
    """The packed QuantLinear (or, for W16, a plain Linear) that computes what ``fq`` computed."""
    if fq.spec is None:
        linear = nn.Linear(fq.in_features, fq.out_features, bias=fq.bias is not None)
        linear.weight.data = fq.weight.detach().clone()
        if fq.bias is not None:
            linear.bias.data = fq.bias.detach().clone()
        return linear
    scale, zero = (t.detach() for t in fq.grid())
    codes = quantize(fq.weight.detach().float(), scale, zero, fq.spec)
    bias = None if fq.bias is None else fq.bias.detach()
    act_scale = None if fq.act_step is None else fq.act_step.detach().float().reshape(1)  # LSQ: a static grid
    return QuantLinear.from_codes(
        codes,
        scale.to(storage_scale_dtype(scale, fq.spec)),
        zero,
        fq.spec,
        bias,
        act_bits=fq.act_bits,
        act_scale=act_scale,
    )


def convert_qat_model(model: nn.Module) -> nn.Module:
    """Replace every FakeQuantLinear by its QuantLinear and the fake KV quantization by a quantized KV cache, in
    place; returns ``model``."""
    config = getattr(model, "quantlm_qat_config", None)
    if config is not None:
        convertible(config)
    for name, fq in fake_quant_linears(model).items():
        set_submodule(model, name, to_quant_linear(fq).to(fq.weight.device))
    kv = getattr(model, "quantlm_fake_kv_config", None)
    enable_fake_kv_quantization(model, None)
    enable_kv_quantization(model, kv)
    return model
