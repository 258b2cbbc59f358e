"""Quantization methods, one file per algorithm, each registered by name (``quantlm.methods.base``), and the
recipe that orders them."""

from quantlm.methods.awq import AWQ
from quantlm.methods.base import Method, method_class, register, registered_methods
from quantlm.methods.codebook import FP4, NF4
from quantlm.methods.gptq import GPTQ, gptq_quantize
from quantlm.methods.head import HeadRounding, head_step
from quantlm.methods.hqq import HQQ, hqq_quantize
from quantlm.methods.llm_int8 import LLMInt8
from quantlm.methods.recipe import Recipe, parse_recipe, recipe_from_options
from quantlm.methods.rtn import RTN, Int8WeightOnly
from quantlm.methods.smoothquant import SmoothQuant

__all__ = [
    "AWQ",
    "FP4",
    "GPTQ",
    "HQQ",
    "Int8WeightOnly",
    "NF4",
    "hqq_quantize",
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
