"""Is each command's default dtype (``--dtype auto``) the faster one on this CPU? Tokens/s of the default against
the other dtype (fp32 or bf16) for the work behind generate-data, generate, bench (prefill and decode), qat and eval,
on the default model, in one run.

Each (CPU mode, dtype) pair runs in its own process, because the ISA torch may use is fixed when it starts:
- ``native``: the CPU as it is.
- ``avx2``: torch held to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``), which is how an AVX2-only
  CPU runs: no bf16 or AVX-512 instructions. This is an emulation on the same silicon, not an AVX2-only machine
  (its caches and clocks are this CPU's), so its absolute numbers are not such a machine's; the ratio between the
  dtypes is what it shows.
The default is what ``quantlm.hardware.choose_dtype`` takes in that process, as every command does.

Run: .venv/bin/python benchmarks/dtype_defaults.py [--modes native,avx2] [--out benchmarks/results/dtype_defaults]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}
DTYPES = ("float32", "bfloat16")
MODEL = "smollm2-135m"
GEN_BATCH = 32  # samples generated together (generate-data's default is 64)


def _tok_s(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")


def worker(dtype_name: str) -> dict:
    """Time each command's work in ``dtype_name`` in this process; also say what ``auto`` takes here."""
    import torch

    from quantlm import api
    from quantlm.hardware import choose_dtype
    from quantlm.qat.run import run_qat, training_windows

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, dtype_name)
    tokenizer = api.load_tokenizer(MODEL)
    rows = {}
    lm = api.load(MODEL, dtype=dtype)

    with tempfile.TemporaryDirectory() as tmp:
        settings = api.GenerationSettings(n_samples=GEN_BATCH, max_length=64, batch_size=GEN_BATCH, seed=0)
        t0 = time.perf_counter()
        api.generate_training_data(lm, tokenizer, Path(tmp) / "d.jsonl", settings, progress=False)
        seconds = time.perf_counter() - t0
        rows["generate-data"] = _tok_s(sum(len(s) for s in api.read_samples(Path(tmp) / "d.jsonl")), seconds)

    t0 = time.perf_counter()
    api.generate_text(lm, tokenizer, "The history of the Roman Empire", max_new_tokens=32, stream=False)
    rows["generate"] = _tok_s(32, time.perf_counter() - t0)

    report = api.measure_speed(lm, tokenizer, prefill_tokens=512, decode_prompt=64, decode_tokens=32, repeats=1)
    rows["bench prefill"] = report.prefill_tok_s
    rows["bench decode"] = report.decode_tok_s

    t0 = time.perf_counter()
    result = api.evaluate(lm, tokenizer=tokenizer, seqlen=1024, max_windows=2, progress=False)
    rows["eval"] = _tok_s(result.tokens, time.perf_counter() - t0)
    ppl = result.ppl
    del lm

    teacher = api.load_float_model(MODEL, dtype=torch.float32)  # qat loads fp32 weights and autocasts
    windows = training_windows("enwiki", tokenizer, seqlen=256, max_windows=8)
    config = api.QATConfig.from_options(w_bits=4, a_bits=8, kv_bits=4)
    settings = api.TrainSettings(steps=2, batch_size=2, dtype=dtype_name, save_every=100)
    _, trained = run_qat(teacher, tokenizer, windows, config, settings, progress=False)
    rows["qat"] = _tok_s(trained.tokens, trained.seconds)

    auto = {  # what each command's --dtype auto takes for the work above (the rows its matmuls have)
        "generate-data": choose_dtype("auto", "cpu", rows=GEN_BATCH),
        "generate": choose_dtype("auto", "cpu", rows=1),
        "bench prefill": choose_dtype("auto", "cpu", rows=512),  # bench times each phase in its own auto dtype
        "bench decode": choose_dtype("auto", "cpu", rows=1),
        "eval": choose_dtype("auto", "cpu", rows=1024),
        "qat": choose_dtype("auto", "cpu", rows=2 * 256, training=True),
    }
    return {
        "dtype": dtype_name,
        "rows": rows,
        "eval_ppl": ppl,
        "auto": {command: choice.name for command, choice in auto.items()},
        "why": {command: choice.reason for command, choice in auto.items()},
    }


def run_mode(mode: str) -> dict[str, dict]:
    results = {}
    for dtype_name in DTYPES:
        env = {**os.environ, **MODES[mode]}
        done = subprocess.run(
            [sys.executable, __file__, "--worker", dtype_name], env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise SystemExit(f"{mode}/{dtype_name} failed:\n{done.stderr[-3000:]}")
        results[dtype_name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{mode} {dtype_name}: {results[dtype_name]['rows']}", file=sys.stderr, flush=True)
    return results


def table(all_results: dict[str, dict[str, dict]], cpu: str) -> str:
    lines = [
        f"CPU: {cpu}; {os.cpu_count()} threads; one run, one process per (mode, dtype).",
        "",
        "| CPU mode | command | default (auto) | default tok/s | other dtype | other tok/s | default / other |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, results in all_results.items():
        any_result = next(iter(results.values()))
        for command in any_result["rows"]:
            auto = any_result["auto"][command]
            other = next(d for d in DTYPES if d != auto)
            mine, theirs = results[auto]["rows"][command], results[other]["rows"][command]
            lines.append(
                f"| {mode} | {command} | {auto} | {mine:.1f} | {other} | {theirs:.1f} | {mine / theirs:.2f}x |"
            )
    lines.append("")
    for mode, results in all_results.items():
        any_result = next(iter(results.values()))
        ppl = ", ".join(f"{d} {r['eval_ppl']:.4f}" for d, r in results.items())
        why = "; ".join(f"{command}: {reason}" for command, reason in any_result["why"].items())
        lines.append(f"- {mode}: eval perplexity {ppl}. Why auto took what it took: {why}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--modes", default="native,avx2")
    ap.add_argument("--out", default="benchmarks/results/dtype_defaults")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    from quantlm.hardware import describe_cpu

    all_results = {mode: run_mode(mode) for mode in args.modes.split(",")}
    text = table(all_results, describe_cpu())
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(all_results, indent=1))
    out.with_suffix(".md").write_text(
        "# Default dtype against the other, per command\n\n"
        "`.venv/bin/python benchmarks/dtype_defaults.py` (its docstring explains the `avx2` emulation).\n\n"
        + text
        + "\n"
    )


if __name__ == "__main__":
    main()
