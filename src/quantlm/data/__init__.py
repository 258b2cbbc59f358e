"""Text sources for calibration and evaluation."""

from quantlm.data.calibration import calibration_windows, tokenize_text
from quantlm.data.texts import BUILTIN_TEXTS, load_text

__all__ = ["BUILTIN_TEXTS", "calibration_windows", "load_text", "tokenize_text"]
