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
from quantlm.nn.qlinear import QuantLinear
from quantlm.pipeline.runner import BlockContext, LayerRecord


@dataclass
class RTN:
    """Round-to-nearest weight quantization of every Linear in the decoder blocks.

    ``lm_head=True`` also quantizes the output projection (untying it from tied input embeddings, which stay
    in full precision); with ``blocks=False`` it is the only layer quantized, which makes a step that gives the
    output projection a grid of its own after any other method (``head_step``). ``exclude`` holds fnmatch patterns of module names to leave alone. ``act_bits=8`` makes
    the layers W8A8: their inputs are quantized to int8 at run time, per token (``act_granularity="token"``,
    dynamic, no data needed) or per tensor with a static scale from the calibration set's max|x| (``"tensor"``).
    """

    spec: QuantSpec = field(default_factory=lambda: QuantSpec(bits=4, group_size=64))
    lm_head: bool = False
    blocks: bool = True
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
        if not self.blocks:
            return []
        targets = {n: m for n, m in ctx.linears().items() if not is_excluded(n, self.exclude)}
        scales = static_act_scales(ctx, targets) if self.needs_calibration and targets else {}
        return [self._quantize_module(ctx.model, name, module, scales.get(name)) for name, module in targets.items()]

    def finalize(self, model: nn.Module) -> list[LayerRecord]:
        if not self.lm_head:
            return []
        name = output_embedding_name(model)
        if name is None:
            if not self.blocks:
                raise InvalidSpecError(f"{type(model).__name__} has no output projection for a head-only step (--head-bits)")
            return []
        module = model.get_submodule(name)
        if isinstance(module, QuantLinear):
            raise InvalidSpecError(f"the output projection {name} is quantized already: quantize it in one step only")
        record = self._quantize_module(model, name, module)
        if getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False
        return [record]

    def __post_init__(self) -> None:
        check_activation_settings(self.act_bits, self.act_granularity)
        if self.lm_head and self.act_granularity == "tensor":
            raise InvalidSpecError("the output projection gets no static activation scale: use per-token activations with lm_head")
        if not self.blocks and not self.lm_head:
            raise InvalidSpecError("an RTN step with blocks=False quantizes only the output projection: set lm_head=True")

    @property
    def label(self) -> str:
        """The step's name in ``Recipe.describe``: says whether the output projection is rounded too, or alone."""
        return "rtn-head" if not self.blocks else ("rtn+head" if self.lm_head else "rtn")

    def to_config(self) -> dict[str, Any]:
        config = {"method": self.name, **self.spec.to_dict(), "lm_head": self.lm_head, "exclude": list(self.exclude)}
        if not self.blocks:
            config["blocks"] = False
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
        blocks = bool(config.pop("blocks", True))
        exclude = tuple(config.pop("exclude", ()))
        act_bits = config.pop("act_bits", None)
        act_granularity = config.pop("act_granularity", "token")
        return cls(
            spec=QuantSpec.from_dict(config), lm_head=lm_head, blocks=blocks, exclude=exclude, act_bits=act_bits,
            act_granularity=act_granularity,
        )


def head_spec(bits: int) -> QuantSpec:
    """The grid ``--head-bits`` gives the output projection: 8 bits per channel, symmetric (the W8A16 int8 kernel),
    or 2-4 bits in asymmetric groups of 64 (the int4 kernel)."""
    if bits == 8:
        return QuantSpec(bits=8, group_size=-1, symmetric=True)
    if bits in (2, 3, 4):
        return QuantSpec(bits=bits, group_size=64, symmetric=False)
    raise InvalidSpecError(f"head bits must be 8, 4, 3 or 2, got {bits}")


def head_step(bits: int) -> RTN:
    """A recipe step that rounds only the output projection (lm_head) to ``head_spec(bits)``, weight-only: put it
    after the steps that quantize the blocks. Decoding reads the whole output projection for every token, and for a
    small model with a large vocabulary it is the largest single weight (SmolLM2-135M: 28M of 135M parameters)."""
    return RTN(head_spec(bits), lm_head=True, blocks=False)
