"""QuantSpec: what a quantization grid looks like (bit width, symmetry, granularity, clipping).

Granularity, for a tensor whose last dim has ``n`` columns, flattened to 2-D ``[rows, n]``
(all leading dims folded into ``rows``):

- ``"tensor"``: one scale/zero for the whole tensor -> qparams shape ``[1, 1]``
- ``"channel"``: one per row (a weight ``[out_features, in_features]`` gets one per output channel) -> ``[rows, 1]``
- ``"token"``: same math as ``"channel"``, named for activations ``[..., features]`` -> ``[rows, 1]``
- ``"group"``: ``group_size`` consecutive columns per row share one -> ``[rows, ceil(n / group_size)]``;
  the last group of a row may be partial.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any

from quantlm.core.codebook import CODEBOOKS as LEVEL_CODEBOOKS
from quantlm.errors import InvalidSpecError

GRANULARITIES = ("tensor", "channel", "group", "token")
CLIPS = ("none", "mse", "fit", "stats")
CODEBOOK_CLIPS = ("none", "fit")  # absmax scales, or refitted by least squares
CODEBOOKS = ("none", *LEVEL_CODEBOOKS)  # "none": the integer grid
MIN_BITS = 2
MAX_BITS = 8
MIN_SCALE_BITS = 4  # Q2_K's 4-bit scale codes; Q3_K/Q4_K/Q5_K use 6, Q6_K 8
SUPER_BLOCK = 256  # columns whose group scales share one fp16 factor (llama.cpp's QK_K)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class QuantSpec:
    """An immutable, validated description of a quantization grid.

    ``bits``: 2..8. ``symmetric``: grid centered on zero (zero point fixed at ``2**(bits-1)``).
    ``group_size``: -1 = one scale per row, >0 = groups of that many columns along the last dim.
    ``granularity``: "tensor" | "channel" | "group" | "token"; ``None`` is filled in as "group" when
    ``group_size > 0`` else "channel". ``clip``: "none" | "mse" (GPTQ-style shrink search, norm 2.4) | "fit"
    (codebook grids only: each absmax scale refitted by least squares, ``quantlm.core.quantizer``) | "stats"
    (symmetric integer grids only: StatsQ's statistical range, ±2·mean|x| of each unit, within its MinMax range).
    ``codebook``: "none" (the integer grid) or "nf4" / "fp4": each value is one of 16 fixed levels in [-1, 1] times
    its group's scale, the absmax (``quantlm.core.codebook``); such grids are 4-bit and symmetric by construction
    (``symmetric`` is set to True) and have no zero point.
    ``scale_bits``: None (float scales, the default) or 4-8: llama.cpp's K-quant grids
    (``quantlm.core.superblock``): every group scale of a super-block of 256 columns is an integer code of
    ``scale_bits`` bits times one fp16 factor, and on asymmetric grids so is every offset ``zero * scale`` (one fp16
    factor of its own), which makes the zero points fractional. Needs groups of 16 or 32 columns.
    """

    # ``metadata``: how the command line offers a field (``quantlm.methods.base.cli_settings``): its help, and the
    # flag's name where it is not ``--field-name``; a field without help is not offered.
    bits: int = field(default=4, metadata={"help": "Weight bits, 2-8.", "flag": "--bits", "aliases": ("--w-bits",)})
    symmetric: bool = field(default=False, metadata={"help": "Symmetric or asymmetric grid.", "flag": "--sym/--asym"})
    group_size: int = field(
        default=-1, metadata={"help": "Columns per group; -1 = one scale per output channel.", "aliases": ("-g",)}
    )
    granularity: str | None = None
    clip: str = field(
        default="none",
        metadata={
            "help": "Grid clipping: none, mse (a search over shrunk ranges), fit (nf4/fp4: least-squares scales), "
            "or stats (symmetric grids: the range 2 x mean|w|, StatsQ)."
        },
    )
    codebook: str = field(
        default="none",
        metadata={"help": "Weight levels: none (the integer grid), or nf4 / fp4 (4-bit codebooks times block scales)."},
    )
    scale_bits: int | None = field(
        default=None,
        metadata={
            "help": "K-quant grids (llama.cpp's Q2_K-Q6_K): group scales (and offsets) as codes of this many bits "
            "times one fp16 factor per 256 columns; groups of 16 or 32."
        },
    )

    def __post_init__(self) -> None:
        bits = self.bits
        if not _is_int(bits):
            raise InvalidSpecError(f"bits must be an integer between {MIN_BITS} and {MAX_BITS}, got {bits!r}")
        if not MIN_BITS <= bits <= MAX_BITS:
            raise InvalidSpecError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {bits}")
        object.__setattr__(self, "bits", int(bits))

        if not isinstance(self.symmetric, bool):
            raise InvalidSpecError(f"symmetric must be True or False, got {self.symmetric!r}")

        gs = self.group_size
        if not _is_int(gs) or gs == 0 or gs < -1:
            raise InvalidSpecError(
                f"group_size must be -1 (one scale per row) or a positive number of columns such as 128, got {gs!r}"
            )
        gs = int(gs)
        object.__setattr__(self, "group_size", gs)

        gran = self.granularity
        if gran is None:
            gran = "group" if gs > 0 else "channel"
        if not isinstance(gran, str) or gran not in GRANULARITIES:
            raise InvalidSpecError(
                f"granularity must be one of {', '.join(GRANULARITIES)} (or None to infer it from group_size), "
                f"got {gran!r}"
            )
        if gran == "group" and gs <= 0:
            raise InvalidSpecError(
                f"granularity 'group' needs group_size > 0 (e.g. group_size=128), got group_size={gs}"
            )
        if gran != "group" and gs > 0:
            raise InvalidSpecError(
                f"granularity {gran!r} does not use groups: set group_size=-1, or granularity='group' "
                f"to keep group_size={gs}"
            )
        object.__setattr__(self, "granularity", gran)

        if not isinstance(self.clip, str) or self.clip not in CLIPS:
            raise InvalidSpecError(f"clip must be one of {', '.join(CLIPS)}, got {self.clip!r}")

        if not isinstance(self.codebook, str) or self.codebook not in CODEBOOKS:
            raise InvalidSpecError(f"codebook must be one of {', '.join(CODEBOOKS)}, got {self.codebook!r}")
        if self.codebook != "none":
            if bits != 4:
                raise InvalidSpecError(f"the {self.codebook} codebook has 4-bit codes: use bits=4, not {bits}")
            if self.clip not in CODEBOOK_CLIPS:
                raise InvalidSpecError(
                    f"the {self.codebook} codebook takes clip none (absmax scales) or fit (least-squares scales), "
                    f"not {self.clip!r}"
                )
            if gran in ("tensor", "token"):
                raise InvalidSpecError(f"the {self.codebook} codebook needs per-group or per-channel absmax scales")
            object.__setattr__(self, "symmetric", True)
        elif self.clip == "fit":
            raise InvalidSpecError("clip='fit' refits the scales of nf4/fp4 grids: use clip='mse' on an integer grid")
        elif self.clip == "stats" and not self.symmetric:
            raise InvalidSpecError("clip='stats' (the range ±2·mean|w|) is for symmetric grids: add --sym")

        if self.scale_bits is not None:
            sb = self.scale_bits
            if not _is_int(sb) or not MIN_SCALE_BITS <= sb <= MAX_BITS:
                raise InvalidSpecError(f"scale_bits must be None or {MIN_SCALE_BITS}-{MAX_BITS}, got {sb!r}")
            object.__setattr__(self, "scale_bits", int(sb))
            if self.codebook != "none":
                raise InvalidSpecError(f"the {self.codebook} codebook has float block scales: drop scale_bits")
            if gran != "group" or gs not in (16, 32):
                raise InvalidSpecError(
                    f"scale_bits needs groups of 16 or 32 columns (16 or 8 per {SUPER_BLOCK}-column super-block), "
                    f"got {self.describe()}: pass --group-size 32 (Q4_K, Q5_K) or 16 (Q2_K, Q3_K, Q6_K), or use "
                    "--target-format gguf-TYPE"
                )

    # ------------------------------------------------------------------ derived values
    @property
    def maxq(self) -> int:
        """Largest code: ``2**bits - 1``. Codes live in ``[0, maxq]``."""
        return (1 << self.bits) - 1

    @property
    def fractional_zero(self) -> bool:
        """Whether zero points are fractional: asymmetric super-block grids, whose offset ``zero * scale`` is
        quantized apart from the scale (codes are then ``round(x / scale + zero)``)."""
        return self.scale_bits is not None and not self.symmetric

    @property
    def has_zero_point(self) -> bool:
        """Whether the grid has a zero point (integer grids do; codebook grids are level times absmax)."""
        return self.codebook == "none"

    def n_groups(self, n_columns: int) -> int:
        """Number of qparam columns for a tensor with ``n_columns`` columns (1 unless granularity is 'group')."""
        if self.granularity == "group":
            return math.ceil(n_columns / self.group_size)
        return 1

    def qparams_shape(self, rows: int, n_columns: int) -> tuple[int, int]:
        """Shape of ``scale``/``zero`` for a 2-D ``[rows, n_columns]`` tensor."""
        if self.granularity == "tensor":
            return (1, 1)
        return (rows, self.n_groups(n_columns))

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict:
        """JSON-friendly dict with every field (granularity already resolved; ``codebook`` only when there is one, so
        integer grids read the same as before codebooks existed)."""
        data = {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "group_size": self.group_size,
            "granularity": self.granularity,
            "clip": self.clip,
        }
        if self.codebook != "none":
            data["codebook"] = self.codebook
        if self.scale_bits is not None:
            data["scale_bits"] = self.scale_bits
        return data

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys are an error."""
        if not isinstance(d, dict):
            raise InvalidSpecError(f"a quantization spec must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise InvalidSpecError(
                f"unknown quantization spec key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}"
            )
        return cls(**d)

    def describe(self) -> str:
        """Short human label, e.g. 'w4 g128 asym', 'w8 per-channel sym', 'w4 g64 sym mse', 'nf4 g64', 'w4 g32 asym s6'
        (super-block scales of 6 bits)."""
        if self.granularity == "group":
            where = f"g{self.group_size}"
        else:
            where = f"per-{self.granularity}"
        if self.codebook != "none":
            return f"{self.codebook} {where}" + (f" {self.clip}" if self.clip != "none" else "")
        text = f"w{self.bits} {where} {'sym' if self.symmetric else 'asym'}"
        if self.scale_bits is not None:
            text += f" s{self.scale_bits}"
        if self.clip != "none":
            text += f" {self.clip}"
        return text
