"""Quantization methods, one file per algorithm, and the recipe that orders them."""

from quantlm.methods.gptq import GPTQ, gptq_quantize
from quantlm.methods.llm_int8 import LLMInt8
from quantlm.methods.recipe import METHODS, Recipe, parse_recipe
from quantlm.methods.rtn import RTN
from quantlm.methods.smoothquant import SmoothQuant

__all__ = ["GPTQ", "LLMInt8", "METHODS", "gptq_quantize", "RTN", "Recipe", "SmoothQuant", "parse_recipe"]
