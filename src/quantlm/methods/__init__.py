"""Quantization methods, one file per algorithm, each registered by name (``quantlm.methods.base``), and the
recipe that orders them."""

from quantlm.methods.base import Method, method_class, register, registered_methods
from quantlm.methods.gptq import GPTQ, gptq_quantize
from quantlm.methods.head import HeadRounding, head_step
from quantlm.methods.llm_int8 import LLMInt8
from quantlm.methods.recipe import Recipe, parse_recipe, recipe_from_options
from quantlm.methods.rtn import RTN
from quantlm.methods.smoothquant import SmoothQuant

__all__ = [
    "GPTQ",
    "HeadRounding",
    "LLMInt8",
    "Method",
    "RTN",
    "Recipe",
    "SmoothQuant",
    "gptq_quantize",
    "head_step",
    "method_class",
    "parse_recipe",
    "recipe_from_options",
    "register",
    "registered_methods",
]
