"""Inference speed of the default model, dense and quantized, in one run (docs/benchmarks.md protocol).

Makes checkpoints of SmolLM2-135M with RTN (the kernels do not care how the codes were found, so GPTQ checkpoints
of the same layout run at the same speed): W4 g64 asym (W4A16), the same with its output projection in int8 or int4
(`--head-bits`), W8 per-channel sym (W8A16), and W8 per-channel sym with int8 per-token activations (W8A8). Then
every row is one `quantlm bench` in its own process (so its peak RSS is its own): prefill tokens/s of a 2048-token
prompt and decode tokens/s of 128 new tokens after a 128-token prompt, medians of --repeats runs, in bf16 (the
protocol's dense baseline), eager and with --compile, with transformers' SDPA attention or quantlm's default
(`quantlm.nn.attention`). Ratios are to the 'dense-bf16' row of the same run: transformers' plain eager `generate`
with its own attention.

Run: .venv/bin/python benchmarks/inference_table.py [--repeats 3] [--rows dense-bf16 w4-bf16 ...] [--list]
Writes benchmarks/results/inference_smollm2.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from quantlm.paths import atomic_write_text

MODEL = "smollm2-135m"
CHECKPOINTS = {
    "w4": ("W4A16 g64 asym", "--method rtn --bits 4 --group-size 64 --asym"),
    "w4h8": ("W4A16 g64 asym, int8 head", "--method rtn --bits 4 --group-size 64 --asym --head-bits 8"),
    "w4h4": ("W4A16 g64 asym, int4 g64 head", "--method rtn --bits 4 --group-size 64 --asym --head-bits 4"),
    "w8": ("W8A16 per-channel sym", "--method rtn --bits 8 --group-size -1 --sym"),
    "w8a8": (
        "W8A8 per-channel sym, int8 per-token activations",
        "--method rtn --bits 8 --group-size -1 --sym --a-bits 8",
    ),
}
# row key: (checkpoint key or None for the dense model, dtype, extra bench flags). Rows without --attention run
# quantlm's default (auto: decode steps of a bf16 model's attention in fp32, quantlm.nn.attention).
ROWS = {
    "dense-bf16": (None, "bfloat16", "--attention sdpa"),
    "dense-bf16-fast-attention": (None, "bfloat16", ""),
    "dense-fp32": (None, "float32", ""),
    "w4-bf16-sdpa": ("w4", "bfloat16", "--attention sdpa"),
    "w4-bf16": ("w4", "bfloat16", ""),
    "w4h8-bf16": ("w4h8", "bfloat16", ""),
    "w4h4-bf16": ("w4h4", "bfloat16", ""),
    "w4-fp32": ("w4", "float32", ""),
    "w8-bf16": ("w8", "bfloat16", ""),
    "w8a8-bf16": ("w8a8", "bfloat16", ""),
    "w4-torch-bf16": ("w4", "bfloat16", "--kernel torch"),
    "dense-bf16-compiled": (None, "bfloat16", "--compile"),
    "w4-bf16-compiled": ("w4", "bfloat16", "--compile"),
    "w4h8-bf16-compiled": ("w4h8", "bfloat16", "--compile"),
    "w4h4-bf16-compiled": ("w4h4", "bfloat16", "--compile"),
}
DEFAULT_ROWS = [k for k in ROWS if k not in ("w4-torch-bf16", "w4h4-bf16")]
BASELINE = "dense-bf16"
RESULTS = Path(__file__).parent / "results" / "inference_smollm2"
WORK = Path("out/inference_bench")


def quantlm_command() -> list[str]:
    return [str(Path(sys.executable).with_name("quantlm"))]


def make_checkpoint(key: str) -> Path:
    out = WORK / key
    if not (out / "config.json").is_file():
        _, flags = CHECKPOINTS[key]
        cmd = [*quantlm_command(), "quantize", MODEL, *flags.split(), "--out", str(out), "--overwrite", "--json"]
        print(f"[make {key}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def bench(key: str, repeats: int) -> dict:
    checkpoint, dtype, flags = ROWS[key]
    target = MODEL if checkpoint is None else str(make_checkpoint(checkpoint))
    cmd = [*quantlm_command(), "bench", target, "--dtype", dtype, "--repeats", str(repeats), *flags.split(), "--json"]
    print(f"[{key}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    report = json.loads(done.stdout)
    label = "dense" if checkpoint is None else CHECKPOINTS[checkpoint][0]
    report.update(key=key, setting=f"{label}, {dtype}{', ' + flags if flags else ''}", wall_s=time.perf_counter() - t0)
    return report


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["key"] == BASELINE), None)
    lines = [
        "| setting | kernels | attention | prefill tok/s | x bf16 | decode tok/s | x bf16 | decode bound tok/s "
        "| weights MB | "
        "quantized Linears vs bf16 | load s | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w = r["weight_bytes"]
        pre = f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f}" if base else "-"
        dec = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}" if base else "-"
        ratio = f"{w['quantized_linear'] / w['quantized_linear_bf16']:.3f}" if w["quantized_linear_bf16"] else "-"
        lines.append(
            f"| {r['setting']} | {r['extra']['kernels']} | {r['extra'].get('attention', 'sdpa')} "
            f"| {r['prefill_tok_s']:.0f} | {pre} | {r['decode_tok_s']:.1f} | {dec} | "
            f"{r['decode_bound_tok_s']:.0f} | {w['total'] / 1e6:.0f} | {ratio} | {r['extra']['load_seconds']:.2f} | "
            f"{r['peak_rss_gb']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        for key, (checkpoint, dtype, flags) in ROWS.items():
            print(f"{key}\t{checkpoint or 'dense'} {dtype} {flags}")
        return
    rows = [bench(key, args.repeats) for key in args.rows]
    bandwidth = sorted(r["bandwidth_gb_s"] for r in rows)[len(rows) // 2]
    header = (
        f"{MODEL}, batch 1; prefill: {rows[0]['prefill_tokens']}-token prompt; "
        f"decode: {rows[0]['decode_prompt']}-token "
        f"prompt, {rows[0]['decode_tokens']} new tokens, greedy; medians of {args.repeats} runs after a warm-up; one "
        f"process per row, all in one run on {platform.processor() or platform.machine()} "
        f"with {os.cpu_count()} threads "
        f"(torch CPU capability {cpu_capability()}); memory read bandwidth {bandwidth:.1f} GB/s. Ratios are to the "
        f"'{BASELINE}' row (transformers' plain eager `generate`, its SDPA attention). "
        "Decode bound = bandwidth / bytes read per token.\n\n"
    )
    rows_flag = "" if args.rows == DEFAULT_ROWS else " --rows " + " ".join(args.rows)
    text = (
        header
        + table(rows)
        + f"\n\nCommand: `.venv/bin/python benchmarks/inference_table.py --repeats {args.repeats}{rows_flag}`\n"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    atomic_write_text(RESULTS.with_suffix(".md"), text)
    print(text)


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


if __name__ == "__main__":
    main()
