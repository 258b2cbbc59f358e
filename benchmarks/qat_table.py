"""LLM-QAT on the default model (docs/benchmarks.md protocol): QAT against RTN at the same W-A-KV bits, the
KV-cache rows, and the ablations.

Every row is one child process of the CLI (so its time and peak memory are its own), then `quantlm eval`
(enwiki eval split, --max-windows windows of 2048 tokens, fp32 compute) of the checkpoint it wrote:
- rtn-W-A-KV: `quantlm quantize --method rtn --bits W --group-size -1 --sym [--a-bits 8] [--kv-bits KV]`, weights
  per output channel, symmetric MinMax, as the paper's RTN baseline (it is also QAT's step 0);
- qat-W-A-KV: `quantlm qat --data DATA --w-bits W --a-bits A --kv-bits KV` with the training settings below;
- fp-kvN: the float model evaluated with an N-bit KV cache (`quantlm eval --kv-bits N`);
- ablation rows (abl-*): qat-4-8-4 with one thing changed: enwiki text instead of generated, pure sampling, label
  cross-entropy instead of distillation, StatsQ weight ranges, LSQ activations (the paper's clipping ablation);
  abl-hybrid is qat-4-8-4 itself under its own key, so the ablation can run
  at fewer --steps than the main rows and still have its baseline at the same steps;
- W4A4 and W4A8 (KV16) rows, RTN and QAT, each also from the SmoothQuant-smoothed model (sq-rtn-*, sq-qat-*:
  `--method smoothquant --alpha auto --calib-samples 16` for PTQ, `qat --smooth-alpha auto` for QAT, which
  calibrates on 64 of its 512-token training windows: the same 32k tokens), the paper's table 6;
- init rows (init-rtn-ch, init-gptq-ch, init-rtn-g64, init-gptq-g64): QAT W4A8KV4 per channel or g64 from the
  float weights, or from a GPTQ checkpoint of the same grid that the row makes first (--calib-samples windows);
  init-gptq-* start the weights at their bins' centres (`--init-offsets centre`), init-gptq-float-* at the float
  weights moved into their bins (`--init-offsets float`, the default since these rows).
Rows are merged into benchmarks/results/qat_smollm2.{md,json} (rerunning a row replaces it).

Run: .venv/bin/python benchmarks/qat_table.py --rows rtn-4-8-4 qat-4-8-4 ... [--steps 120] [--list]
The generated data comes from `quantlm generate-data smollm2-135m --samples 256 --max-length 512 --batch-size 128
--out DATA` (--data; for abl-sample the same with --mode sample, --sample-data).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from quality_rows import EVAL_DTYPE, merge_rows, quantlm_command, run_child
from quantlm.paths import atomic_write_text

MODEL = "smollm2-135m"
RESULTS = Path(__file__).parent / "results"


def _bits_rows() -> dict[str, tuple[str, str, dict]]:
    rows = {
        "fp32": ("fp32", "eval", {}),
        "fp-kv8": ("fp32 weights, KV cache int8", "eval", {"kv": 8}),
        "fp-kv4": ("fp32 weights, KV cache int4", "eval", {"kv": 4}),
    }
    for w, a, kv in ((4, 8, 4), (4, 8, 8), (8, 8, 8), (4, 16, 16), (4, 4, 16), (4, 8, 16)):
        name = f"{w}-{a}-{kv}"
        rows[f"rtn-{name}"] = (f"RTN W{w}A{a}KV{kv}", "rtn", {"w": w, "a": a, "kv": kv})
        rows[f"qat-{name}"] = (f"QAT W{w}A{a}KV{kv}", "qat", {"w": w, "a": a, "kv": kv})
    # the paper's table 6: the same W4A4 and W4A8 rows from the model smoothed by SmoothQuant (alpha searched for
    # the row's bits; PTQ calibrates on enwiki, QAT on its own generated training windows)
    for a in (4, 8):
        name = f"4-{a}-16"
        smooth = {"w": 4, "a": a, "kv": 16, "smooth": True}
        rows[f"sq-rtn-{name}"] = (f"SmoothQuant (alpha auto) + RTN W4A{a}KV16", "rtn", smooth)
        rows[f"sq-qat-{name}"] = (f"QAT W4A{a}KV16 from the SmoothQuant-smoothed model", "qat", smooth)
    rows["abl-hybrid"] = (
        "QAT W4A8KV4, the ablation's baseline: hybrid generated text, logit distillation",
        "qat",
        {"w": 4, "a": 8, "kv": 4},
    )
    rows["abl-enwiki"] = (
        "QAT W4A8KV4 on enwiki calibration text (not generated)",
        "qat",
        {"w": 4, "a": 8, "kv": 4, "data": "enwiki"},
    )
    rows["abl-sample"] = (
        "QAT W4A8KV4 on purely sampled generated text",
        "qat",
        {"w": 4, "a": 8, "kv": 4, "data": "sample"},
    )
    rows["abl-ce"] = (
        "QAT W4A8KV4 with label cross-entropy instead of logit distillation",
        "qat",
        {"w": 4, "a": 8, "kv": 4, "loss": "ce"},
    )
    rows["abl-statsq"] = (
        "QAT W4A8KV4 with StatsQ weight ranges (2 x mean abs(w) per channel) instead of MinMax",
        "qat",
        {"w": 4, "a": 8, "kv": 4, "flags": ["--clip", "stats"]},
    )
    rows["abl-lsq"] = (
        "QAT W4A8KV4 with LSQ activations (a learned static step per layer) instead of per-token MinMax",
        "qat",
        {"w": 4, "a": 8, "kv": 4, "flags": ["--act-clip", "lsq"]},
    )
    # the start of QAT: float weights (RTN at step 0) or a GPTQ checkpoint of the same weight grid (--init)
    for group in (-1, 64):
        where = "per channel" if group == -1 else f"g{group}"
        suffix = "ch" if group == -1 else f"g{group}"
        rows[f"init-rtn-{suffix}"] = (f"QAT W4A8KV4 {where}, from the float weights (RTN)", "qat", _init(group, None))
        rows[f"init-gptq-{suffix}"] = (
            f"QAT W4A8KV4 {where}, from GPTQ W4 {where}, weights at their bins' centres",
            "qat",
            _init(group, "gptq", ("--init-offsets", "centre")),
        )
        rows[f"init-gptq-float-{suffix}"] = (
            f"QAT W4A8KV4 {where}, from GPTQ W4 {where}, weights at the float offsets in their bins",
            "qat",
            _init(group, "gptq", ("--init-offsets", "float")),
        )
    return rows


def _init(group: int, method: str | None, extra: tuple[str, ...] = ()) -> dict:
    flags = ["--group-size", str(group), *extra]
    return {"w": 4, "a": 8, "kv": 4, "flags": flags, "init": method, "group": group}


ROWS = _bits_rows()


def _bits_flags(kind: str, p: dict) -> list[str]:
    if kind == "rtn":
        # SmoothQuant's calibration: 16 x 2048 tokens, as the W8A8 table's (QAT smooths on 64 x 512 of its own)
        method = ["smoothquant", "--alpha", "auto", "--calib-samples", "16"] if p.get("smooth") else ["rtn"]
        flags = ["--method", *method, "--bits", str(p["w"]), "--group-size", "-1", "--sym"]
        if p["a"] != 16:
            flags += ["--a-bits", str(p["a"])]
        if p["kv"] != 16:
            flags += ["--kv-bits", str(p["kv"])]
        return flags
    smooth = ["--smooth-alpha", "auto"] if p.get("smooth") else []
    return ["--w-bits", str(p["w"]), "--a-bits", str(p["a"]), "--kv-bits", str(p["kv"]), *smooth, *p.get("flags", [])]


def _start_checkpoint(p: dict, tmp: Path, args) -> tuple[list[str], float, str | None]:
    """For a row that starts from a PTQ checkpoint: make it (GPTQ on the QAT weight grid, --calib-samples windows)
    and return (the --init flags, its wall seconds, its command); nothing for a row that starts from float."""
    if p.get("init") is None:
        return [], 0.0, None
    flags = ["--method", p["init"], "--bits", "4", "--group-size", str(p["group"]), "--sym"]
    flags += ["--calib-samples", str(args.calib_samples)]
    start = tmp / "start"
    print(f"[init] quantlm quantize {MODEL} {' '.join(flags)}", file=sys.stderr, flush=True)
    _, wall, _ = run_child([*quantlm_command(), "quantize", MODEL, *flags, "--out", str(start), "--json"])
    return ["--init", str(start)], wall, f"quantlm quantize {MODEL} {' '.join(flags)} --out START"


def measure(key: str, args) -> dict:
    label, kind, p = ROWS[key]
    with tempfile.TemporaryDirectory(prefix="quantlm-qat-") as tmp:
        target, summary, wall, rss, command = MODEL, {}, 0.0, 0.0, None
        init_flags, init_wall, init_command = [], 0.0, None
        eval_flags = []
        if kind == "eval":
            if p.get("kv"):
                eval_flags = ["--kv-bits", str(p["kv"])]
            command = " ".join(["quantlm eval", MODEL, *eval_flags, *EVAL_DTYPE])
        else:
            target = str(Path(tmp) / key)
            if kind == "rtn":
                cmd = ["quantize", MODEL, *_bits_flags(kind, p)]
            else:
                data = {"enwiki": "enwiki", "sample": args.sample_data}.get(p.get("data"), args.data)
                init_flags, init_wall, init_command = _start_checkpoint(p, Path(tmp), args)
                cmd = [
                    "qat",
                    MODEL,
                    "--data",
                    data,
                    *_bits_flags(kind, p),
                    "--steps",
                    str(args.steps),
                    "--batch-size",
                    str(args.batch_size),
                    "--seqlen",
                    str(args.seqlen),
                    "--lr",
                    str(args.lr),
                    "--warmup",
                    str(args.warmup),
                    "--loss",
                    p.get("loss", "kd"),
                    *init_flags,
                ]
            command = "quantlm " + " ".join(cmd) + " --out OUT"
            if init_command:
                command = f"{init_command} && {command.replace(init_flags[-1], 'START')}"
            print(f"[{key}] {command}", file=sys.stderr, flush=True)
            out, wall, rss = run_child([*quantlm_command(), *cmd, "--out", target, "--json"])
            summary = json.loads(out)
            wall += init_wall
        eval_out, eval_wall, _ = run_child(
            [
                *quantlm_command(),
                "eval",
                target,
                "--max-windows",
                str(args.max_windows),
                *eval_flags,
                *EVAL_DTYPE,
                "--json",
            ]
        )
        ppl = json.loads(eval_out)
    training = summary.get("training") or {}
    row = {
        "key": key,
        "setting": label,
        "ppl": ppl["ppl"],
        "tokens": ppl["tokens"],
        "kv_cache": ppl.get("kv_cache"),
        "kernels": ppl.get("kernels"),
        "eval_dtype": ppl.get("dtype"),
        "process_wall_s": round(wall, 1),
        "peak_rss_gb": round(rss, 2),
        "steps": args.steps if kind == "qat" else None,
        "train_s": training.get("seconds"),
        "train_tokens": training.get("tokens"),
        "first_loss": training.get("first_loss"),
        "last_loss": training.get("last_loss"),
        "command": command,
        "cpu": os.cpu_count(),
    }
    print(f"[{key}] ppl {row['ppl']:.3f}, wall {wall:.0f}s, peak RSS {rss:.2f} GB", file=sys.stderr, flush=True)
    return row


def to_markdown(rows: list[dict], fp_ppl: float | None) -> str:
    lines = [
        "# LLM-QAT on SmolLM2-135M",
        "",
        "Perplexity: enwiki eval split, windows of 2048 tokens (see `tokens`). W = weights per output channel,",
        "symmetric MinMax; A = activations per token; KV = keys (after RoPE) and values per token and head.",
        "Written by benchmarks/qat_table.py. Eval dtype: the compute of `quantlm eval` for the row; `auto` is eval's",
        "default, which takes bf16 on CPUs with AVX-512 BF16 (rows of 2026-12-05/06 before the table pinned fp32).",
        "",
        "| setting | ppl | vs fp | steps | train s | train tokens | loss first → last | peak RSS GB | eval dtype "
        "| command |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = f"{100 * (r['ppl'] / fp_ppl - 1):+.2f}%" if fp_ppl else "-"
        loss = f"{r['first_loss']:.3f} → {r['last_loss']:.3f}" if r.get("first_loss") is not None else "-"
        lines.append(
            f"| {r['setting']} | {r['ppl']:.3f} | {vs} | {r.get('steps') or '-'} | {r.get('train_s') or '-'} "
            f"| {r.get('train_tokens') or '-'} | "
            f"{loss} | {r['peak_rss_gb'] or '-'} | {r.get('eval_dtype') or 'not recorded'} | `{r['command']}` |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=[])
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--data", default=str(Path.home() / ".cache/quantlm/qat/gen_hybrid.jsonl"))
    ap.add_argument("--sample-data", default=str(Path.home() / ".cache/quantlm/qat/gen_sample.jsonl"))
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--max-windows", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=32, help="GPTQ windows (2048 tokens) of the init rows")
    ap.add_argument("--name", default="qat_smollm2")
    args = ap.parse_args()
    if args.list:
        for k, (label, _, _) in ROWS.items():
            print(f"{k}\t{label}")
        return
    unknown = [k for k in args.rows if k not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: --list shows them")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    for key in args.rows:
        rows = merge_rows(path, ROWS, {key: measure(key, args)})
        atomic_write_text(path, json.dumps(rows, indent=1) + "\n")
        fp = next((r["ppl"] for r in rows if r["key"] == "fp32"), None)
        atomic_write_text(RESULTS / f"{args.name}.md", to_markdown(rows, fp))


if __name__ == "__main__":
    main()
