"""Quantization methods, one file per algorithm, and the recipe that orders them."""

from quantlm.methods.gptq import GPTQ, gptq_quantize
from quantlm.methods.recipe import METHODS, Recipe, parse_recipe
from quantlm.methods.rtn import RTN

__all__ = ["GPTQ", "METHODS", "gptq_quantize", "RTN", "Recipe", "parse_recipe"]
