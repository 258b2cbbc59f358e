"""Load time of the default model, dense and quantized, with and without the kernel cache, in one run.

Each setting runs in its own child process: one first load (the files in the page cache, the process new), then
--loads more loads in the same process (warm: torch and transformers imported, their code paths hot). The settings
are interleaved over --rounds rounds so that machine noise hits them alike; the table has the medians of the warm
loads and of the first loads, and each median's ratio to the dense model's. Every load is `quantlm.load(..., dtype=
torch.bfloat16)` (the inference benchmark's dtype) and ends with the model ready to run (kernels prepared).

Settings: the dense model (quantlm's safetensors cache of SmolLM2-135M), and the W4 g64 asym and W8 per-channel sym
checkpoints of benchmarks/inference_table.py, each with the kernel cache off (every load repacks) and on (an entry
made by a load before the timed rounds; `quantlm.nn.kernel_cache`).

Run: .venv/bin/python benchmarks/load_time.py [--rounds 3] [--loads 5]
Writes benchmarks/results/load_smollm2.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from inference_table import MODEL, make_checkpoint
from quantlm.paths import atomic_write_text

RESULTS = Path(__file__).parent / "results" / "load_smollm2"
SETTINGS = {  # key: (label, checkpoint key or None for the dense model, kernel cache on)
    "dense": ("dense bf16", None, False),
    "w4": ("W4A16 g64 asym, kernel cache off", "w4", False),
    "w4-cached": ("W4A16 g64 asym, kernel cache on", "w4", True),
    "w8": ("W8A16 per-channel sym, kernel cache off", "w8", False),
    "w8-cached": ("W8A16 per-channel sym, kernel cache on", "w8", True),
}
CHILD = """
import json, sys, time, torch
t0 = time.perf_counter()
import quantlm
imported = time.perf_counter() - t0
torch.set_num_threads(__import__("os").cpu_count())
times = []
for _ in range(int(sys.argv[2]) + 1):
    t = time.perf_counter()
    model = quantlm.load(sys.argv[1], dtype=torch.bfloat16)
    times.append(time.perf_counter() - t)
    del model
print(json.dumps({"import_s": imported, "first_s": times[0], "warm_s": times[1:]}))
"""


def run_child(target: str, cached: bool, loads: int) -> dict:
    env = dict(os.environ, QUANTLM_KERNEL_CACHE="1" if cached else "0")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, target, str(loads)],
        env=env,
        check=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loads", type=int, default=5, help="Warm loads per process, after its first load.")
    args = parser.parse_args()
    targets = {key: MODEL if ckpt is None else str(make_checkpoint(ckpt)) for key, (_, ckpt, _) in SETTINGS.items()}
    for key, (_, _, cached) in SETTINGS.items():  # page cache warm for all; cache entries made for the cached rows
        run_child(targets[key], cached, 0)
    runs: dict[str, list[dict]] = {key: [] for key in SETTINGS}
    for r in range(args.rounds):
        for key, (label, _, _cached) in SETTINGS.items():
            runs[key].append(run_child(targets[key], cached, args.loads))
            print(f"round {r + 1}: {label}: warm {min(runs[key][-1]['warm_s']):.3f} s", file=sys.stderr, flush=True)
    rows = []
    for key, (label, _, _cached) in SETTINGS.items():
        warm = [t for run in runs[key] for t in run["warm_s"]]
        first = [run["first_s"] for run in runs[key]]
        rows.append(
            {
                "key": key,
                "setting": label,
                "warm_median_s": statistics.median(warm),
                "warm_s": warm,
                "first_median_s": statistics.median(first),
                "first_s": first,
            }
        )
    dense = rows[0]
    lines = [
        f"SmolLM2-135M, `quantlm.load(..., dtype=torch.bfloat16)`; {args.rounds} rounds of one process per setting, "
        f"interleaved; each process: one first load, then {args.loads} warm loads; medians. "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores.",
        "",
        "| setting | warm load (s) | x dense | first load in a process (s) | x dense |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['warm_median_s']:.3f} | {r['warm_median_s'] / dense['warm_median_s']:.2f} "
            f"| {r['first_median_s']:.3f} | {r['first_median_s'] / dense['first_median_s']:.2f} |"
        )
    atomic_write_text(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")
    atomic_write_text(RESULTS.with_suffix(".json"), json.dumps({"rows": rows, "runs": runs}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
