"""Quantization-aware fine-tuning (QAF): LoRA adapters trained through peft on a frozen quantized model, and merged
back (docs/finetune.md).

    from quantlm.finetune import LoraSettings, finetune
    finetune("out/smollm2-w4", "tiny-shakespeare", "out/adapter", LoraSettings(pooled=True), merge="exact")
"""

from quantlm.finetune.adapters import (
    LoraSettings,
    adapter_config,
    adapter_targets,
    attach_adapters,
    load_adapters,
)
from quantlm.finetune.merge import MERGE_MODES, merge_adapters
from quantlm.finetune.run import FinetuneResult, finetune

__all__ = [
    "MERGE_MODES",
    "FinetuneResult",
    "LoraSettings",
    "adapter_config",
    "adapter_targets",
    "attach_adapters",
    "finetune",
    "load_adapters",
    "merge_adapters",
]
