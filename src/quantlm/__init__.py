"""quantlm: quantize Hugging Face causal language models to 2-8 bits, and keep them accurate."""

import quantlm.blas_threads  # noqa: F401  first: before anything loads OpenBLAS
from quantlm._version import __version__  # noqa: E402
from quantlm.api import Calibration, evaluate, export, load, quantize, save  # noqa: E402
from quantlm.core import QuantSpec  # noqa: E402
from quantlm.errors import QuantlmError  # noqa: E402
from quantlm.methods import RTN, Recipe, parse_recipe  # noqa: E402
from quantlm.models.sources import load_tokenizer  # noqa: E402

__all__ = [
    "Calibration",
    "QuantSpec",
    "QuantlmError",
    "RTN",
    "Recipe",
    "__version__",
    "evaluate",
    "export",
    "load",
    "load_tokenizer",
    "parse_recipe",
    "quantize",
    "save",
]
