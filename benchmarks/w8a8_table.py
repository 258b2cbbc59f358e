"""W8A8 on the default model (docs/benchmarks.md protocol): SmoothQuant, static and dynamic int8 activations,
LLM.int8(); perplexity per row, and prefill speed of the real int8 GEMM against dense bf16 in one run.

Quality: every row is `quantlm quantize` in its own process, then `quantlm eval` (32 x 2048 eval windows) of the
checkpoint, merged into benchmarks/results/w8a8_smollm2.{md,json} (rerunning a row replaces it). Weights are int8
per output channel, symmetric, in every W8A8 row.

Speed (--speed): dense bf16, and W8A8 checkpoints (per token, static per tensor, LLM.int8()) on the int8 kernel with
bf16 activations; `quantlm bench` in a child process per measurement, the settings interleaved over --rounds rounds
so that machine noise hits them alike; medians of the prefill tokens/s (2048-token prompt) and their ratio to dense
bf16. Also the Linear layers alone: one decoder block's seven Linears at 2048 tokens, int8 kernel vs bf16 GEMM.
Writes benchmarks/results/w8a8_speed_smollm2.{md,json}.

Run: .venv/bin/python benchmarks/w8a8_table.py --rows fp32 w8a8-token sq-token ... [--calib-samples 32]
     .venv/bin/python benchmarks/w8a8_table.py --speed [--rounds 3]          (--list shows the rows)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from quality_rows import measure_row, merge_rows, quantlm_command
from quantlm.paths import atomic_write_text

MODEL = "smollm2-135m"
W8A8 = "--method rtn --bits 8 --group-size -1 --sym --a-bits 8"
ROWS = {
    "fp32": ("fp32", None),
    "w8a8-token": ("W8A8 per-token, no smoothing", W8A8),
    "sq-token": ("W8A8 per-token, SmoothQuant alpha 0.5", "--method smoothquant --alpha 0.5"),
    "sq-token-norm": (
        "W8A8 per-token, SmoothQuant alpha 0.5, norm folds only (as the reference)",
        "--method smoothquant --alpha 0.5 --smooth-folds norm",
    ),
    "sq-token-norm-vo": (
        "W8A8 per-token, SmoothQuant alpha 0.5, norm + v-o folds",
        "--method smoothquant --alpha 0.5 --smooth-folds norm,v-o",
    ),
    "sq-token-norm-updown": (
        "W8A8 per-token, SmoothQuant alpha 0.5, norm + up-down folds",
        "--method smoothquant --alpha 0.5 --smooth-folds norm,up-down",
    ),
    "sq-token-auto": ("W8A8 per-token, SmoothQuant alpha auto", "--method smoothquant --alpha auto"),
    # the same row, meant for the protocol's full calibration: --rows sq-token-auto-c128 --calib-samples 128
    "sq-token-auto-c128": (
        "W8A8 per-token, SmoothQuant alpha auto (128 calibration windows)",
        "--method smoothquant --alpha auto",
    ),
    "w8a8-tensor": ("W8A8 per-tensor static, no smoothing", f"{W8A8} --a-granularity tensor"),
    "sq-tensor": (
        "W8A8 per-tensor static, SmoothQuant alpha 0.5",
        "--method smoothquant --alpha 0.5 --a-granularity tensor",
    ),
    "sq-tensor-norm": (
        "W8A8 per-tensor static, SmoothQuant alpha 0.5, norm folds only",
        "--method smoothquant --alpha 0.5 --smooth-folds norm --a-granularity tensor",
    ),
    "sq-tensor-auto": (
        "W8A8 per-tensor static, SmoothQuant alpha auto",
        "--method smoothquant --alpha auto --a-granularity tensor",
    ),
    "llm-int8": ("LLM.int8(), threshold 6.0", "--method llm-int8 --threshold 6.0"),
    "llm-int8-t4": ("LLM.int8(), threshold 4.0", "--method llm-int8 --threshold 4.0"),
    "llm-int8-t3": ("LLM.int8(), threshold 3.0", "--method llm-int8 --threshold 3.0"),
    "sq-gptq-w8": (
        "W8A8 per-token, SmoothQuant alpha 0.5 then GPTQ W8 (act-order + static groups)",
        "--method smoothquant --alpha 0.5 --weights gptq",
    ),
    "sq-auto-gptq-w8": (
        "W8A8 per-token, SmoothQuant alpha auto then GPTQ W8 (act-order + static groups)",
        "--method smoothquant --alpha auto --weights gptq",
    ),
    "sq-gptq-w4a8": (
        "W4 g64 asym A8 per-token, SmoothQuant alpha 0.5 then GPTQ (act-order + static groups)",
        "--method smoothquant --alpha 0.5 --weights gptq --bits 4 --group-size 64 --asym",
    ),
    "gptq-w4a8": (
        "W4 g64 asym A8 per-token, GPTQ (act-order + static groups) without smoothing",
        "--method gptq --bits 4 --group-size 64 --asym --a-bits 8",
    ),
}
SPEED = {  # key: (label, quantize flags or None for the dense model)
    "dense-bf16": ("dense bf16 (transformers eager)", None),
    "w8a8-token": ("W8A8 per-token (SmoothQuant checkpoints run the same)", W8A8),
    "w8a8-tensor": ("W8A8 per-tensor static", f"{W8A8} --a-granularity tensor"),
    "llm-int8": ("LLM.int8() threshold 6.0", "--method llm-int8 --threshold 6.0"),
}
RESULTS = Path(__file__).parent / "results" / "w8a8_smollm2"
SPEED_RESULTS = Path(__file__).parent / "results" / "w8a8_speed_smollm2"
WORK = Path("out/w8a8_bench")


def write_quality(rows: list[dict]) -> None:
    fp = next((r["ppl"] for r in rows if r["key"] == "fp32"), None)
    lines = [
        "SmolLM2-135M, enwiki eval 32 x 2048 windows; enwiki calibration (seed 0); one process per row, "
        "fp32 activations "
        "(the int8 rows on the int8 GEMM kernel).",
        "",
        "| setting | perplexity | vs fp | quantize (s) | peak RSS (GB) | calibration | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = f"{100 * (r['ppl'] / fp - 1):+.2f}%" if fp else "-"
        lines.append(
            f"| {r['setting']} | {r['ppl']:.3f} | {vs} | {r['quantize_s']:.0f} | {r['peak_rss_gb']:.2f} "
            f"| {r['calib']} | `{r['command']}` |"
        )
    atomic_write_text(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")
    atomic_write_text(RESULTS.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


def _checkpoint(key: str, flags: str, calib_samples: int) -> str:
    out = WORK / key
    if not (out / "config.json").is_file():
        cmd = [
            *quantlm_command(),
            "quantize",
            MODEL,
            *flags.split(),
            "--calib-samples",
            str(calib_samples),
            "--out",
            str(out),
            "--overwrite",
            "--json",
        ]
        print(f"[make {key}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return str(out)


def _bench(target: str, repeats: int) -> dict:
    cmd = [
        *quantlm_command(),
        "bench",
        target,
        "--dtype",
        "bfloat16",
        "--repeats",
        str(repeats),
        "--decode-tokens",
        "16",
        "--json",
    ]
    return json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout)


def linear_speed(repeats: int = 20) -> dict:
    """One SmolLM2 block's seven Linears at 2048 tokens: the int8 kernel (q/k/v and gate/up sharing their quantized
    input, as in the model) against dense bf16 GEMMs; median seconds of the whole set."""
    import torch

    from quantlm.core import QuantSpec
    from quantlm.nn import QuantLinear
    from quantlm.nn.kernels import SHARED_INPUT

    torch.set_num_threads(os.cpu_count() or 1)
    shapes = [
        ("q", 576, 576, "attn_in"),
        ("k", 192, 576, "attn_in"),
        ("v", 192, 576, "attn_in"),
        ("o", 576, 576, "o_in"),
        ("gate", 1536, 576, "mlp_in"),
        ("up", 1536, 576, "mlp_in"),
        ("down", 576, 1536, "down_in"),
    ]
    g = torch.Generator().manual_seed(0)
    inputs = {"attn_in": 576, "o_in": 576, "mlp_in": 576, "down_in": 1536}
    xs = {k: torch.randn(1, 2048, n, generator=g).bfloat16() for k, n in inputs.items()}
    dense, quant = [], []
    for _, out_f, in_f, src in shapes:
        w = torch.randn(out_f, in_f, generator=g)
        dense.append((w.bfloat16(), src))
        q = QuantLinear.from_weight(w, QuantSpec(bits=8, symmetric=True), act_bits=8)
        q.use_kernel("int8", torch.bfloat16)
        quant.append((q, src))

    def run_dense():
        for w, src in dense:
            torch.nn.functional.linear(xs[src], w)

    def run_int8():
        SHARED_INPUT.clear()
        for q, src in quant:
            q(xs[src])

    times = {}
    with torch.no_grad():
        for name, fn in (("bf16", run_dense), ("int8", run_int8)):
            fn()
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            times[name] = statistics.median(samples)
    return {"bf16_s": times["bf16"], "int8_s": times["int8"], "speedup": times["bf16"] / times["int8"]}


def run_speed(rounds: int, repeats: int, calib_samples: int) -> None:
    targets = {k: MODEL if flags is None else _checkpoint(k, flags, calib_samples) for k, (_, flags) in SPEED.items()}
    runs: dict[str, list[dict]] = {k: [] for k in SPEED}
    for r in range(rounds):
        for key, target in targets.items():
            report = _bench(target, repeats)
            runs[key].append(report)
            print(
                f"[round {r + 1} {key}] prefill {report['prefill_tok_s']:.1f} tok/s ({report['extra']['kernels']})",
                file=sys.stderr,
                flush=True,
            )
    base = statistics.median(x["prefill_tok_s"] for x in runs["dense-bf16"])
    rows = []
    for key, (label, _) in SPEED.items():
        prefill = [x["prefill_tok_s"] for x in runs[key]]
        ratios = [x["prefill_tok_s"] / d["prefill_tok_s"] for x, d in zip(runs[key], runs["dense-bf16"])]
        rows.append(
            {
                "key": key,
                "setting": label,
                "prefill_tok_s": statistics.median(prefill),
                "prefill_runs": prefill,
                "x_dense_bf16": statistics.median(prefill) / base,
                "round_ratios": ratios,
                "kernels": runs[key][0]["extra"]["kernels"],
                "quantized_linear_mb": runs[key][0]["weight_bytes"]["quantized_linear"] / 1e6,
            }
        )
    linears = linear_speed()
    lines = [
        f"SmolLM2-135M prefill, 2048-token prompt, batch 1, bf16 activations, {os.cpu_count()} threads, "
        f"{platform.processor() or platform.machine()}; {rounds} interleaved rounds of "
        f"`quantlm bench --repeats {repeats}`, medians.",
        "",
        "| setting | kernels | prefill tok/s | x dense bf16 | per-round ratios |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['kernels']} | {r['prefill_tok_s']:.0f} | {r['x_dense_bf16']:.2f} | "
            f"{', '.join(f'{x:.2f}' for x in r['round_ratios'])} |"
        )
    lines += [
        "",
        f"One block's seven Linears at 2048 tokens: bf16 GEMMs {1e3 * linears['bf16_s']:.1f} ms, int8 kernel "
        f"{1e3 * linears['int8_s']:.1f} ms: {linears['speedup']:.2f}x.",
    ]
    atomic_write_text(SPEED_RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")
    atomic_write_text(
        SPEED_RESULTS.with_suffix(".json"),
        json.dumps({"rows": rows, "linears": linears, "runs": runs}, indent=2) + "\n",
    )
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=[], choices=sorted(ROWS))
    parser.add_argument("--speed", action="store_true", help="Measure prefill speed instead.")
    parser.add_argument("--list", action="store_true", help="Show the rows and exit.")
    parser.add_argument("--max-windows", type=int, default=32)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.speed:
        run_speed(args.rounds, args.repeats, args.calib_samples)
        return
    if args.list or not args.rows:
        for key, (label, flags) in ROWS.items():
            print(f"{key:22s} {label}: {flags}")
        return
    for key in args.rows:
        label, flags = ROWS[key]
        row = measure_row(key, label, flags, MODEL, args.max_windows, args.calib_samples)
        write_quality(merge_rows(RESULTS.with_suffix(".json"), ROWS, {key: row}))


if __name__ == "__main__":
    main()
