"""Quantization methods, one file per algorithm, and the recipe that orders them."""

from quantlm.methods.recipe import METHODS, Recipe, parse_recipe
from quantlm.methods.rtn import RTN

__all__ = ["METHODS", "RTN", "Recipe", "parse_recipe"]
