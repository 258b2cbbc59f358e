"""RTN on the default model, per docs/benchmarks.md: fp and RTN W4 g64 asym/sym, W3 g64 asym, W8 per-channel.

Writes benchmarks/results/rtn_smollm2.{md,json}. Each row can be reproduced alone with the command it lists.
Run: .venv/bin/python benchmarks/rtn_table.py [--max-windows 32]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import quantlm
from quantlm.core import QuantSpec
from quantlm.methods import RTN
from quantlm.nn import QuantLinear

SETTINGS = [
    ("W4 g64 asym", QuantSpec(bits=4, group_size=64), "--bits 4 --group-size 64 --asym"),
    ("W4 g64 sym", QuantSpec(bits=4, group_size=64, symmetric=True), "--bits 4 --group-size 64 --sym"),
    ("W3 g64 asym", QuantSpec(bits=3, group_size=64), "--bits 3 --group-size 64 --asym"),
    ("W8 per-channel asym", QuantSpec(bits=8, group_size=-1), "--bits 8 --group-size -1 --asym"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-windows", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rtn_smollm2")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    tokenizer = quantlm.load_tokenizer(args.model)
    rows = []
    t0 = time.perf_counter()
    fp = quantlm.evaluate(quantlm.load(args.model), tokenizer=tokenizer, max_windows=args.max_windows)
    rows.append(
        {
            "setting": "fp32",
            "ppl": fp.ppl,
            "tokens": fp.tokens,
            "eval_s": time.perf_counter() - t0,
            "quantized_weight_mb": None,
            "command": f"quantlm eval {args.model}",
        }
    )
    print(f"fp32: {fp.ppl:.3f}", flush=True)
    for label, spec, flags in SETTINGS:
        model = quantlm.load(args.model)
        t0 = time.perf_counter()
        quantlm.quantize(model, RTN(spec), progress=False)
        quantize_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = quantlm.evaluate(model, tokenizer=tokenizer, max_windows=args.max_windows)
        qbytes = sum(m.weight_bytes for m in model.modules() if isinstance(m, QuantLinear))
        rows.append(
            {
                "setting": f"RTN {label}",
                "ppl": result.ppl,
                "tokens": result.tokens,
                "quantize_s": quantize_s,
                "eval_s": time.perf_counter() - t0,
                "quantized_weight_mb": qbytes / 1e6,
                "command": f"quantlm quantize {args.model} --method rtn {flags} --out out/rtn --eval",
            }
        )
        print(f"{label}: {result.ppl:.3f}", flush=True)

    lines = [
        f"SmolLM2-135M, enwiki eval, {args.max_windows} x 2048 tokens ({rows[0]['tokens']} predicted tokens).",
        "",
        "| setting | perplexity | vs fp | quantized Linear weights (MB) | command |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        mb = "-" if r["quantized_weight_mb"] is None else f"{r['quantized_weight_mb']:.1f}"
        lines.append(
            f"| {r['setting']} | {r['ppl']:.2f} | {r['ppl'] / rows[0]['ppl'] - 1:+.1%} | {mb} | `{r['command']}` |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
