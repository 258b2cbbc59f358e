"""What differs per model: where weights come from, where the decoder blocks are, which modules to quantize."""

from quantlm.models.blocks import DecoderBlocks, find_decoder_blocks, quantizable_linears
from quantlm.models.sources import ALIASES, ModelAlias, load_float_model, load_tokenizer, resolve_model_dir

__all__ = [
    "ALIASES",
    "DecoderBlocks",
    "ModelAlias",
    "find_decoder_blocks",
    "load_float_model",
    "load_tokenizer",
    "quantizable_linears",
    "resolve_model_dir",
]
