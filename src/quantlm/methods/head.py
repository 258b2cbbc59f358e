"""The output projection alone: a step that rounds only lm_head, weight-only, after the steps that quantize the
decoder blocks (``--head-bits``).

Decoding reads the whole output projection for every token, and for a small model with a large vocabulary it is
the largest single weight (SmolLM2-135M: 28M of 135M parameters), so rounding it pays even when the blocks were
quantized by a method that leaves it alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantlm.core import QuantSpec
from quantlm.errors import InvalidSpecError
from quantlm.methods.base import Method, register
from quantlm.methods.common import round_output_projection
from quantlm.pipeline.runner import LayerRecord


def head_spec(bits: int) -> QuantSpec:
    """The grid ``--head-bits`` gives the output projection: 8 bits per channel, symmetric (the W8A16 int8 kernel),
    or 2-4 bits in asymmetric groups of 64 (the int4 kernel)."""
    if bits == 8:
        return QuantSpec(bits=8, group_size=-1, symmetric=True)
    if bits in (2, 3, 4):
        return QuantSpec(bits=bits, group_size=64, symmetric=False)
    raise InvalidSpecError(f"head bits must be 8, 4, 3 or 2, got {bits}")


@register
@dataclass(frozen=True)
class HeadRounding(Method):
    """Round-to-nearest of the output projection only (the decoder blocks are left as they are)."""

    spec: QuantSpec = QuantSpec(bits=8, symmetric=True)

    name = "rtn-head"
    quantizes_head = True
    offered = False  # on the command line it is --head-bits, after any method

    def finalize(self, model: nn.Module) -> list[LayerRecord]:
        return round_output_projection(model, self.spec, self.name, required=True)


def head_step(bits: int) -> HeadRounding:
    """A recipe step that rounds only the output projection to ``head_spec(bits)``: put it after the steps that
    quantize the blocks."""
    return HeadRounding(head_spec(bits))
