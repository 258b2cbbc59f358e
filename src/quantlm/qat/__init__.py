"""Quantization-aware training the LLM-QAT way: data-free generation, fake quantization, distillation, conversion."""
