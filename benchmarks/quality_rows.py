"""Shared by the quality tables (gptq_table.py, w8a8_table.py): one row = one `quantlm quantize` child process
(so its peak resident memory is its own), then `quantlm eval` of the checkpoint in a second child; rows are merged
into a results file, so rerunning a row replaces it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Perplexity rows are computed in fp32 on every machine. `quantlm eval`'s default, --dtype auto, takes bf16 where
# the CPU runs it natively, which would make a row depend on the machine it ran on (fp32 16.937, bf16 16.944).
EVAL_DTYPE = ("--dtype", "float32")


def quantlm_command() -> list[str]:
    return [str(Path(sys.executable).with_name("quantlm"))]


def run_child(args: list[str]) -> tuple[str, float, float]:
    """Run a command; return its stdout, wall seconds and peak RSS in GB (its own: measured by a fresh wrapper)."""
    probe = (
        "import resource, subprocess, sys, json;"
        "p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, text=True);"
        "print(json.dumps({'rc': p.returncode, 'out': p.stdout,"
        " 'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
    )
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, *args], stdout=subprocess.PIPE, text=True, check=True)
    wall = time.perf_counter() - t0
    report = json.loads(done.stdout)
    if report["rc"] != 0:
        raise SystemExit(f"failed ({report['rc']}): {' '.join(args)}")
    return report["out"], wall, report["maxrss_kb"] / 1024**2


def measure_row(key: str, label: str, flags: str | None, model: str, max_windows: int, calib_samples: int) -> dict:
    """Quantize ``model`` with ``flags`` (None: evaluate the model itself) and measure its perplexity."""
    calib = [] if calib_samples == 128 else ["--calib-samples", str(calib_samples)]
    with tempfile.TemporaryDirectory(prefix="quantlm-bench-") as tmp:
        summary, wall, rss_gb, target = {}, 0.0, 0.0, model
        if flags is not None:
            target = str(Path(tmp) / key)
            cmd = [*quantlm_command(), "quantize", model, *flags.split(), *calib, "--out", target, "--json"]
            print(f"[{key}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            out, wall, rss_gb = run_child(cmd)
            summary = json.loads(out)
        eval_out, _, _ = run_child(
            [*quantlm_command(), "eval", target, "--max-windows", str(max_windows), *EVAL_DTYPE, "--json"]
        )
        ppl = json.loads(eval_out)
    row = {
        "key": key,
        "setting": label,
        "ppl": ppl["ppl"],
        "tokens": ppl["tokens"],
        "kernels": ppl.get("kernels"),
        "eval_dtype": ppl.get("dtype"),
        "quantize_s": summary.get("quantize_seconds", 0.0),
        "process_wall_s": wall,
        "peak_rss_gb": rss_gb,
        "calib": f"{calib_samples} x 2048" if flags is not None else "-",
        "checkpoint_mb": summary.get("checkpoint_mb"),
        "command": f"quantlm quantize {model} {flags}{' ' + ' '.join(calib) if calib else ''} --out OUT"
        if flags is not None
        else f"quantlm eval {model} {' '.join(EVAL_DTYPE)}",
        "cpu": os.cpu_count(),
    }
    print(f"[{key}] ppl {row['ppl']:.3f}, quantize {row['quantize_s']:.0f}s, peak RSS {rss_gb:.2f} GB", file=sys.stderr)
    return row


def merge_rows(path: Path, order, new_rows: dict) -> list[dict]:
    """The rows already in ``path`` (JSON) with ``new_rows`` replacing theirs, in the order of ``order``'s keys."""
    rows = {r["key"]: r for r in (json.loads(path.read_text()) if path.is_file() else [])}
    rows.update(new_rows)
    return [rows[k] for k in order if k in rows]
