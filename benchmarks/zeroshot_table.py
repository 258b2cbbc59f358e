"""The LLM-QAT paper's table for the default model: zero-shot accuracy on its eight tasks and enwiki perplexity,
for the float model and each quantization method, every number from quantlm's own command line.

Each row's checkpoint is made once under --runs (kept: `quantlm report` reads them afterwards, and a rerun skips
a checkpoint that is already there), then scored by one `quantlm eval CKPT --tasks all --limit N --json` child
process and one perplexity run (32 x 2048 enwiki eval windows), whose JSON is kept beside the checkpoints as
KEY.tasks.json and KEY.eval.json (`quantlm report RUNS/* --out DIR` plots them). Rows are merged into
benchmarks/results/zeroshot_smollm2.{md,json} after each one (rerunning a row replaces it).

Run: .venv/bin/python benchmarks/zeroshot_table.py [--rows fp32 rtn ...] [--limit 500] [--make-only] [--list]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from quality_rows import merge_rows, quantlm_command, run_child
from quantlm.eval.tasks import PAPER_TASKS
from quantlm.hardware import describe_cpu
from quantlm.paths import atomic_write_text

MODEL = "smollm2-135m"
RESULTS = Path(__file__).parent / "results"
QAT_DATA = "gen.jsonl"  # under --runs

# key -> (label, the commands that make its checkpoint OUT: None = the float model itself)
ROWS: dict[str, tuple[str, list[str] | None]] = {
    "fp32": ("fp32", None),
    "rtn": ("RTN W4 g64 asym", ["quantize {model} --method rtn --bits 4 --group-size 64 --asym --out {out}"]),
    "gptq": (
        "GPTQ W4 g64 asym (32 x 2048 calibration)",
        ["quantize {model} --method gptq --bits 4 --group-size 64 --asym --calib-samples 32 --out {out}"],
    ),
    "smoothquant": (
        "SmoothQuant W8A8 (alpha auto, int8 per token, 16 x 2048 calibration)",
        ["quantize {model} --method smoothquant --alpha auto --calib-samples 16 --out {out}"],
    ),
    "llm-int8": (
        "LLM.int8() (threshold 6, 16 x 2048 calibration)",
        ["quantize {model} --method llm-int8 --threshold 6.0 --calib-samples 16 --out {out}"],
    ),
    "rtn-484": (
        "RTN W4A8KV4 (per channel, sym)",
        ["quantize {model} --method rtn --bits 4 --group-size -1 --sym --a-bits 8 --kv-bits 4 --out {out}"],
    ),
    "qat-484": (
        "QAT W4A8KV4 (40 steps)",
        [
            "generate-data {model} --samples 256 --max-length 512 --batch-size 128 --out {runs}/" + QAT_DATA,
            "qat {model} --data {runs}/" + QAT_DATA + " --w-bits 4 --a-bits 8 --kv-bits 4 --steps 40 --lr 1e-4 "
            "--warmup 10 --out {out}",
        ],
    ),
}


def make_checkpoint(key: str, runs: Path) -> str:
    """The model the row scores: the float model, or its checkpoint under ``runs`` (made when missing)."""
    _, commands = ROWS[key]
    if commands is None:
        return MODEL
    out = runs / key
    if (out / "config.json").is_file():
        return str(out)
    for command in commands:
        text = command.format(model=MODEL, out=out, runs=runs)
        if text.startswith("generate-data") and (runs / QAT_DATA).is_file():
            continue
        print(f"[{key}] quantlm {text}", file=sys.stderr, flush=True)
        run_child([*quantlm_command(), *text.split(), "--json"])
    return str(out)


def measure(key: str, args) -> dict:
    target = make_checkpoint(key, args.runs)
    tasks_out, tasks_wall, _ = run_child(
        [*quantlm_command(), "eval", target, "--tasks", "all", "--limit", str(args.limit), "--json"]
    )
    ppl_out, _, _ = run_child([*quantlm_command(), "eval", target, "--max-windows", "32", "--json"])
    tasks = json.loads(tasks_out)
    # kept beside the checkpoints for `quantlm report` (docs/report.md)
    atomic_write_text(args.runs / f"{key}.tasks.json", tasks_out)
    atomic_write_text(args.runs / f"{key}.eval.json", ppl_out)
    label, commands = ROWS[key]
    row = {
        "key": key,
        "setting": label,
        "tasks": tasks["tasks"],
        "tasks_seconds": round(tasks_wall, 1),
        "tasks_dtype": tasks.get("dtype"),
        "ppl": json.loads(ppl_out)["ppl"],
        "limit": args.limit,
        "commands": [("quantlm " + c.format(model=MODEL, out="OUT", runs=".")) for c in commands or []],
        "cpu": describe_cpu(),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
    }
    mean = sum(row["tasks"][t]["acc"] for t in PAPER_TASKS) / len(PAPER_TASKS)
    print(f"[{key}] mean acc {100 * mean:.2f}, ppl {row['ppl']:.3f}, tasks {tasks_wall:.0f}s", file=sys.stderr)
    return row


def to_markdown(rows: list[dict]) -> str:
    limit = {r["limit"] for r in rows}
    lines = [
        "# Zero-shot accuracy and perplexity, SmolLM2-135M",
        "",
        f"Accuracy (%, lm-eval's `acc`) on the first {', '.join(map(str, sorted(limit)))} validation documents of "
        "each task (ARC-Challenge has 299), scored by `quantlm eval --tasks`; perplexity on 32 x 2048 enwiki eval "
        "windows. Written by benchmarks/zeroshot_table.py.",
        "",
        "| setting | " + " | ".join(PAPER_TASKS) + " | mean | enwiki ppl | tasks time |",
        "|---|" + "---|" * (len(PAPER_TASKS) + 3),
    ]
    for r in rows:
        accs = [100 * r["tasks"][t]["acc"] for t in PAPER_TASKS]
        cells = " | ".join(f"{a:.1f}" for a in accs)
        lines.append(
            f"| {r['setting']} | {cells} | {sum(accs) / len(accs):.2f} | {r['ppl']:.2f} "
            f"| {r['tasks_seconds'] / 60:.1f} min ({r['tasks_dtype']}) |"
        )
    lines += ["", "Commands (OUT: the checkpoint; then `quantlm eval OUT --tasks all --limit N`):", ""]
    lines += [f"- {r['setting']}: " + "; ".join(f"`{c}`" for c in r["commands"]) for r in rows if r["commands"]]
    lines += ["", f"CPU: {rows[0]['cpu']} ({rows[0]['machine']})." if rows else ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=list(ROWS))
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--runs", type=Path, default=Path("runs/zeroshot"))
    ap.add_argument("--make-only", action="store_true", help="Make the checkpoints, score nothing.")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--name", default="zeroshot_smollm2")
    args = ap.parse_args()
    if args.list:
        for key, (label, _) in ROWS.items():
            print(f"{key}\t{label}")
        return
    unknown = [k for k in args.rows if k not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: --list shows them")
    args.runs.mkdir(parents=True, exist_ok=True)
    args.runs = args.runs.resolve()
    if args.make_only:
        for key in args.rows:
            make_checkpoint(key, args.runs)
        return
    path = RESULTS / f"{args.name}.json"
    for key in args.rows:
        rows = merge_rows(path, ROWS, {key: measure(key, args)})
        atomic_write_text(path, json.dumps(rows, indent=1) + "\n")
        atomic_write_text(RESULTS / f"{args.name}.md", to_markdown(rows))


if __name__ == "__main__":
    main()
