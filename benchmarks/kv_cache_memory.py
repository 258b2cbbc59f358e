"""KV-cache memory of the default model after a 2048-token prefill (batch 1): float caches against the quantized
KV cache at 8 and 4 bits (codes plus one fp32 scale per token and KV head). Prints a markdown table.

Run: .venv/bin/python benchmarks/kv_cache_memory.py [--tokens 2048]
"""

from __future__ import annotations

import argparse

import torch

from quantlm.models.sources import load_float_model
from quantlm.nn.kv_cache import KVQuantConfig, enable_kv_quantization, kv_cache_nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    ids = torch.randint(100, 40000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    print(f"| cache | MB at {args.tokens} tokens |\n|---|---|")
    for label, dtype, bits in (
        ("fp32", torch.float32, None),
        ("bf16", torch.bfloat16, None),
        ("int8 + fp32 scale per token and head", torch.bfloat16, 8),
        ("int4 (packed) + fp32 scale", torch.bfloat16, 4),
    ):
        model = load_float_model(args.model, dtype=dtype).eval()
        enable_kv_quantization(model, None if bits is None else KVQuantConfig(bits))
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
        print(f"| {label} | {kv_cache_nbytes(cache) / 1e6:.1f} |")


if __name__ == "__main__":
    main()
