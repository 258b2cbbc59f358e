"""The layer-wise runner every method plugs into."""

from quantlm.pipeline.capture import BlockInputs, capture_block_inputs
from quantlm.pipeline.runner import BlockContext, LayerRecord, run_pipeline

__all__ = ["BlockContext", "BlockInputs", "LayerRecord", "capture_block_inputs", "run_pipeline"]
