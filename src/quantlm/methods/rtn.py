"""Round-to-nearest (RTN): every weight rounded to the nearest point of its grid, no data needed.

The grid per row or group comes from ``quantlm.core`` (min/max, or an MSE search over clipped ranges with
``clip="mse"``). It is the baseline every other method is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from quantlm.core import QuantSpec
from quantlm.errors import InvalidSpecError
from quantlm.methods.common import check_activation_settings, is_excluded, round_to_grid, static_act_scales
from quantlm.models.blocks import output_embedding_name
from quantlm.pipeline.runner import BlockContext, LayerRecord


@dataclass
class RTN:
    """Round-to-nearest weight quantization of every Linear in the decoder blocks.

    ``lm_head=True`` also quantizes the output projection (untying it from tied input embeddings, which stay
    in full precision). ``exclude`` holds fnmatch patterns of module names to leave alone. ``act_bits=8`` makes
    the layers W8A8: their inputs are quantized to int8 at run time, per token (``act_granularity="token"``,
    dynamic, no data needed) or per tensor with a static scale from the calibration set's max|x| (``"tensor"``).
    """

    spec: QuantSpec = field(default_factory=lambda: QuantSpec(bits=4, group_size=64))
    lm_head: bool = False
    exclude: tuple[str, ...] = ()
    act_bits: int | None = None
    act_granularity: str = "token"

    name = "rtn"

    @property
    def needs_calibration(self) -> bool:
        return self.act_granularity == "tensor"

    def _quantize_module(self, root: nn.Module, name: str, module: nn.Module, act_scale=None) -> LayerRecord:
        return round_to_grid(root, name, module, self.spec, self.name, act_bits=self.act_bits, act_scale=act_scale)

    def process_block(self, ctx: BlockContext) -> list[LayerRecord]:
        targets = {n: m for n, m in ctx.linears().items() if not is_excluded(n, self.exclude)}
        scales = static_act_scales(ctx, targets) if self.needs_calibration and targets else {}
        return [self._quantize_module(ctx.model, name, module, scales.get(name)) for name, module in targets.items()]

    def finalize(self, model: nn.Module) -> list[LayerRecord]:
        if not self.lm_head:
            return []
        name = output_embedding_name(model)
        if name is None:
            return []
        record = self._quantize_module(model, name, model.get_submodule(name))
        if getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False
        return [record]

    def __post_init__(self) -> None:
        check_activation_settings(self.act_bits, self.act_granularity)
        if self.lm_head and self.act_granularity == "tensor":
            raise InvalidSpecError("the output projection gets no static activation scale: use per-token activations with lm_head")

    def to_config(self) -> dict[str, Any]:
        config = {"method": self.name, **self.spec.to_dict(), "lm_head": self.lm_head, "exclude": list(self.exclude)}
        if self.act_bits is not None:
            config["act_bits"] = self.act_bits
        if self.act_granularity != "token":
            config["act_granularity"] = self.act_granularity
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "RTN":
        config = dict(config)
        config.pop("method", None)
        config.pop("calibration", None)
        lm_head = bool(config.pop("lm_head", False))
        exclude = tuple(config.pop("exclude", ()))
        act_bits = config.pop("act_bits", None)
        act_granularity = config.pop("act_granularity", "token")
        return cls(
            spec=QuantSpec.from_dict(config), lm_head=lm_head, exclude=exclude, act_bits=act_bits,
            act_granularity=act_granularity,
        )
