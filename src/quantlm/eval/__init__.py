"""Evaluation: perplexity (and, later, speed, memory and reports)."""

from quantlm.eval.perplexity import PerplexityResult, needs_bos, perplexity, perplexity_of_windows

__all__ = ["PerplexityResult", "needs_bos", "perplexity", "perplexity_of_windows"]
