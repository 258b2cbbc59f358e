"""LLM-QAT's settings (Liu et al., 2023): what is fake-quantized while the whole model trains, and how.

QAT is not a step of the layer-wise pipeline: it trains the whole model end to end (``quantlm.qat``), so it is
registered as a method whose recipe is read back from a checkpoint, but which ``quantize`` refuses. Weights use the
same grid vocabulary as every other method (a ``QuantSpec``); activations are per token, the KV cache per token and
head. Bits are often written as a W-A-KV triple such as 4-8-4, where 16 leaves a part in full precision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantlm.core import QuantSpec
from quantlm.errors import InvalidSpecError
from quantlm.methods.base import Method, register, spec_with
from quantlm.methods.common import exclude_setting
from quantlm.methods.smoothquant import SmoothQuant
from quantlm.models.smoothing import FOLD_KINDS, parse_folds
from quantlm.nn.kv_cache import KVQuantConfig

OFF = 16
QAT_ACT_CLIPS = ("minmax", "lsq")
QAT_WEIGHT_CLIPS = ("none", "stats")  # searches (mse) would run on every step
PART_BITS = (2, 3, 4, 5, 6, 7, 8)


@dataclass(frozen=True)
class QATBits:
    """Bit widths of weights, activations and KV cache; 16 means that part stays in full precision."""

    w: int = 4
    a: int = 8
    kv: int = 4

    def __post_init__(self) -> None:
        for part, bits in (("weight", self.w), ("activation", self.a), ("KV-cache", self.kv)):
            if isinstance(bits, bool) or bits not in PART_BITS + (OFF,):
                raise InvalidSpecError(f"{part} bits must be 2..8, or 16 for full precision, got {bits!r}")

    @classmethod
    def parse(cls, text: str | QATBits) -> QATBits:
        """'4-8-4' -> QATBits(4, 8, 4)."""
        if isinstance(text, QATBits):
            return text
        m = re.fullmatch(r"\s*(\d+)-(\d+)-(\d+)\s*", str(text))
        if not m:
            raise InvalidSpecError(f"bits are written W-A-KV, such as 4-8-4 (16 = full precision), got {text!r}")
        return cls(*(int(g) for g in m.groups()))

    def __str__(self) -> str:
        return f"{self.w}-{self.a}-{self.kv}"


def _on(bits: int) -> int | None:
    return None if bits == OFF else bits


@register
@dataclass(frozen=True)
class QATConfig(Method):
    """What is fake-quantized during QAT. ``weight``: the weight grid (None: full precision; per output channel,
    symmetric MinMax is the paper's); ``act_bits``: per-token activations (None: full precision); ``kv_bits``: the
    KV cache per token and head (None: full precision); ``learnable_clip``: the weight scales are trained too;
    ``act_clip``: "minmax" (per-token MinMax, the paper's) or "lsq" (one learned step per layer, static per tensor:
    LSQ, the paper's clipping ablation); ``smooth_alpha``: start from the float model smoothed by SmoothQuant with
    this α (a number, or "auto": searched per layer group for these W and A bits; None: no smoothing, the
    default), folded where ``smooth_folds`` say (the paper's table 6)."""

    weight: QuantSpec | None = QuantSpec(bits=4, symmetric=True)
    act_bits: int | None = 8
    kv_bits: int | None = 4
    a_symmetric: bool = True
    kv_symmetric: bool = True
    learnable_clip: bool = False
    act_clip: str = "minmax"
    smooth_alpha: float | str | None = None
    smooth_folds: tuple[str, ...] = FOLD_KINDS
    exclude: tuple[str, ...] = exclude_setting()

    name = "qat"
    pipeline = False
    offered = False  # quantlm qat, not quantize

    def __post_init__(self) -> None:
        for part, bits in (("activation", self.act_bits), ("KV-cache", self.kv_bits)):
            if bits is not None and (isinstance(bits, bool) or bits not in PART_BITS):
                raise InvalidSpecError(f"{part} bits must be 2..8, or None for full precision, got {bits!r}")
        if self.weight is not None and not isinstance(self.weight, QuantSpec):
            raise InvalidSpecError(f"the QAT weight grid must be a QuantSpec or None, got {self.weight!r}")
        if self.weight is not None and self.weight.codebook != "none":
            raise InvalidSpecError(f"QAT trains integer grids, not {self.weight.codebook}: drop the codebook")
        if self.weight is not None and self.weight.scale_bits is not None:
            raise InvalidSpecError("QAT trains float group scales: drop scale_bits (quantize to a K-quant grid after)")
        if self.act_clip not in QAT_ACT_CLIPS:
            raise InvalidSpecError(f"the activation clip is one of {', '.join(QAT_ACT_CLIPS)}, got {self.act_clip!r}")
        if self.act_clip == "lsq" and (self.act_bits is None or not self.a_symmetric):
            raise InvalidSpecError(
                "LSQ learns a symmetric activation step: set the activation bits below 16, symmetric"
            )
        if self.weight is not None and self.weight.clip not in QAT_WEIGHT_CLIPS:
            raise InvalidSpecError(
                f"QAT recomputes the weight grid every step: clip none (MinMax) or stats, not {self.weight.clip!r}"
            )
        if self.learnable_clip and self.weight is None:
            raise InvalidSpecError("learnable clipping needs quantized weights: set the weight bits below 16")
        if self.smooth_alpha is not None:
            if self.act_bits is None:
                raise InvalidSpecError(
                    "smoothing moves activation outliers into the weights: it needs quantized activations (bits below "
                    "16), or drop the smoothing"
                )
            step = SmoothQuant(alpha=self.smooth_alpha, folds=self.smooth_folds)  # checks both
            object.__setattr__(self, "smooth_alpha", step.alpha)
            object.__setattr__(self, "smooth_folds", step.folds)
        elif parse_folds(self.smooth_folds) != FOLD_KINDS:
            raise InvalidSpecError("the smoothing folds apply with smoothing: add --smooth-alpha, or drop the folds")
        else:
            object.__setattr__(self, "smooth_folds", FOLD_KINDS)

    def smoothing(self) -> SmoothQuant | None:
        """The SmoothQuant step the student starts from (None: no smoothing), its α search done for these W and A
        bits (weights on this grid without its clip, activations per token)."""
        if self.smooth_alpha is None:
            return None
        weight = None if self.weight is None else spec_with(self.weight, {"clip": "none"})
        # LSQ: one static grid per layer (searched as the static int8 grid; per token at other widths)
        granularity = "tensor" if self.act_clip == "lsq" and self.act_bits == 8 else "token"
        step = SmoothQuant(alpha=self.smooth_alpha, folds=self.smooth_folds)
        return step.searching_for(weight, self.act_bits, granularity)

    @classmethod
    def from_bits(cls, bits: str | QATBits, **settings) -> QATConfig:
        """The settings for a W-A-KV triple (``"4-8-4"``); ``settings``: the weight grid's other keys (``symmetric``,
        ``group_size``, ``clip``) and this class's other fields."""
        bits = QATBits.parse(bits)
        grid = {k: settings.pop(k) for k in ("symmetric", "group_size", "clip") if k in settings}
        if bits.w == OFF and grid:
            raise InvalidSpecError(
                f"{', '.join(sorted(grid))} set the weight grid: quantize the weights (bits below 16)"
            )
        weight = None if bits.w == OFF else spec_with(cls().weight, {"bits": bits.w, **grid})
        return cls(weight=weight, act_bits=_on(bits.a), kv_bits=_on(bits.kv), **settings)

    @classmethod
    def from_options(cls, *, w_bits=None, a_bits=None, kv_bits=None, **settings) -> QATConfig:
        """The settings from command-line style options: bits per part (16: full precision) and the weight grid's
        ``symmetric``/``group_size``; an option left None takes this class's default."""
        default = cls().bits
        given = {k: v for k, v in settings.items() if v is not None}
        pick = lambda given, fallback: fallback if given is None else given  # noqa: E731
        bits = QATBits(pick(w_bits, default.w), pick(a_bits, default.a), pick(kv_bits, default.kv))
        return cls.from_bits(bits, **given)

    @property
    def bits(self) -> QATBits:
        return QATBits(self.weight.bits if self.weight else OFF, self.act_bits or OFF, self.kv_bits or OFF)

    @property
    def kv_config(self) -> KVQuantConfig | None:
        return None if self.kv_bits is None else KVQuantConfig(self.kv_bits, self.kv_symmetric)

    def describe(self) -> str:
        grid = f", {self.weight.describe()}" if self.weight else ""
        extra = (", learnable clip" if self.learnable_clip else "") + (
            ", lsq activations" if self.act_clip == "lsq" else ""
        )
        if self.smooth_alpha is not None:
            extra += f", {self.smoothing().describe()}"
        return f"qat({self.bits}{grid}{extra})"
