"""GPTQ on the default model, per docs/benchmarks.md: perplexity, quantization wall time and peak memory.

Every row is one `quantlm quantize` command (128 x 2048 enwiki calibration tokens unless the row says otherwise),
run as a child process so its peak resident memory (ru_maxrss) is its own, followed by `quantlm eval` of the
checkpoint in a second child (32 x 2048 eval windows). A GPTQ run takes about half an hour on a 2-core CPU, so rows
are run one at a time and merged into benchmarks/results/gptq_smollm2.{md,json}: rerunning a row replaces it.

Run: .venv/bin/python benchmarks/gptq_table.py --rows w4-asym [w4-sym w3-asym ...]   (--list shows the rows)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from quality_rows import measure_row, merge_rows
from quantlm.paths import atomic_write_text

ROWS = {
    "w4-asym": (
        "GPTQ W4 g64 asym (defaults: act-order + static groups)",
        "--method gptq --bits 4 --group-size 64 --asym",
    ),
    "w4-asym-best": (
        "GPTQ W4 g64 asym, defaults + MSE clip + damp 0.003",
        "--method gptq --bits 4 --group-size 64 --asym --clip mse --damp 0.003",
    ),
    "w4-asym-mse": (
        "GPTQ W4 g64 asym, act-order + static groups + MSE clip",
        "--method gptq --bits 4 --group-size 64 --asym --act-order --static-groups --clip mse",
    ),
    "w4-asym-hmse": (
        "GPTQ W4 g64 asym, defaults + MSE clip weighted by the Hessian diagonal",
        "--method gptq --bits 4 --group-size 64 --asym --clip mse --hessian-clip",
    ),
    "w4-asym-in-order": (
        "GPTQ W4 g64 asym, columns in order (the defaults before act-order)",
        "--method gptq --bits 4 --group-size 64 --asym --no-act-order --no-static-groups",
    ),
    "w4-asym-plain": (
        "GPTQ W4 g64 asym, in order, sink weight 1 (plain GPTQ)",
        "--method gptq --bits 4 --group-size 64 --asym --no-act-order --no-static-groups --sink-weight 1",
    ),
    "w4-sym": ("GPTQ W4 g64 sym", "--method gptq --bits 4 --group-size 64 --sym"),
    "w4-sym-damp05": (
        "GPTQ W4 g64 sym, damp 0.05 (GPTQModel's default)",
        "--method gptq --bits 4 --group-size 64 --sym --damp 0.05",
    ),
    "w3-asym": ("GPTQ W3 g64 asym", "--method gptq --bits 3 --group-size 64 --asym"),
    "w3-asym-mse": (
        "GPTQ W3 g64 asym, defaults + MSE clip",
        "--method gptq --bits 3 --group-size 64 --asym --clip mse",
    ),
    "w3-asym-hmse": (
        "GPTQ W3 g64 asym, defaults + MSE clip weighted by the Hessian diagonal",
        "--method gptq --bits 3 --group-size 64 --asym --clip mse --hessian-clip",
    ),
    "w4-asym-offload": (
        "GPTQ W4 g64 asym, activations offloaded to disk",
        "--method gptq --bits 4 --group-size 64 --asym --offload-activations",
    ),
    "nf4-gptq": (
        "GPTQ on the NF4 grid (blocks of 64, absmax scales): calibrated NF4",
        "--method gptq --codebook nf4 --group-size 64",
    ),
    "w4-awq-rtn": (
        "AWQ W4 g64 asym (scale and clip search), then round-to-nearest",
        "--method awq --bits 4 --group-size 64 --asym --awq-search-windows 4",
    ),
    "w4-awq-gptq": (
        "AWQ W4 g64 asym, then GPTQ (defaults)",
        "--method awq --weights gptq --bits 4 --group-size 64 --asym --awq-search-windows 4",
    ),
    "w4-awq-gptq-hmse": (
        "AWQ W4 g64 asym (scales searched with GPTQ rounding, no clip search: the defaults before GPTQ), then GPTQ "
        "with MSE clip weighted by the Hessian diagonal",
        "--method awq --weights gptq --bits 4 --group-size 64 --asym --clip mse --hessian-clip --awq-search-windows 4",
    ),
}
RESULTS = Path(__file__).parent / "results" / "gptq_smollm2"


def measure(key: str, model: str, max_windows: int, calib_samples: int) -> dict:
    label, flags = ROWS[key]
    return measure_row(key, label, flags, model, max_windows, calib_samples)


def write_results(rows: list[dict]) -> None:
    lines = [
        "SmolLM2-135M, enwiki calibration (seed 0), eval 32 x 2048 windows; one process per row on a 2-core CPU, fp32.",
        "",
        "| setting | perplexity | quantize (s) | peak RSS (GB) | calibration | command |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']}{' (' + r['note'] + ')' if r.get('note') else ''} | {r['ppl']:.2f} "
            f"| {r['quantize_s']:.0f} "
            f"| {r['peak_rss_gb']:.2f} | {r['calib']} | `{r['command']}` |"
        )
    atomic_write_text(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")
    atomic_write_text(RESULTS.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=[], choices=sorted(ROWS))
    parser.add_argument("--list", action="store_true", help="Show the rows and exit.")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-windows", type=int, default=32)
    parser.add_argument("--calib-samples", type=int, default=128)
    args = parser.parse_args()
    if args.list or not args.rows:
        for key, (label, flags) in ROWS.items():
            print(f"{key:18s} {label}: {flags}")
        return
    for key in args.rows:
        row = measure(key, args.model, args.max_windows, args.calib_samples)
        write_results(merge_rows(RESULTS.with_suffix(".json"), ROWS, {key: row}))


if __name__ == "__main__":
    main()
