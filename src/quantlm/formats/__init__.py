"""Checkpoint writers and readers."""

from quantlm.formats.native import FORMAT_NAME, is_quantlm_checkpoint, load_checkpoint, save_checkpoint

__all__ = ["FORMAT_NAME", "is_quantlm_checkpoint", "load_checkpoint", "save_checkpoint"]
