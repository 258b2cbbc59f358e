"""What the peer benchmarks (gptq_peers.py, calibration_free_peers.py) share: throwaway venvs for peer libraries,
the token windows every worker reads (saved to files and hashed), the one perplexity scorer, workers as child
processes with their own peak RSS, and the report files.

A benchmark script is both the orchestrator (in the project's venv) and its workers (``SCRIPT --worker KIND --job
JOB.json``, in a peer's venv or the project's). Workers import this module too, so at import time it needs the
standard library only; what needs torch, transformers or quantlm is imported inside the functions that use it, and
the quantlm parts (``prepare_windows``, ``project_version``) run in the orchestrator only.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
TORCH_PIN = "torch==2.13.0"
MARKER = ".quantlm-peer-installed"
GB = 1024**3
CPU_FLAGS_SHOWN = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


# --------------------------------------------------------------------------------------------------------------
# Both sides: stdlib only.


def log(message: str) -> None:
    """Progress goes to stderr, so stdout carries only the final table; tagged with the running script's name."""
    print(f"[{Path(sys.argv[0]).stem}] {message}", file=sys.stderr, flush=True)


def first_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of ``text``, shortened for a table cell."""
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def write_json_atomically(path: Path, data) -> None:
    """Write ``data`` as JSON through a temporary file in the same directory and a rename."""
    write_text_atomically(path, json.dumps(data, indent=2, default=str) + "\n")


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file in the same directory and a rename. (Workers run in a peer's venv
    without quantlm, so this cannot be ``quantlm.paths.atomic_write_text``.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def package_versions(*names: str) -> dict[str, str | None]:
    """Installed versions of ``names`` (None where a package is missing) plus python's."""
    import importlib.metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def tensor_digest(tensor) -> str:
    """A short hash of a token tensor, to show that every worker read the same tokens."""
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]


def format_seconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


def cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


# --------------------------------------------------------------------------------------------------------------
# Worker side: runs inside a peer's venv (or the project's venv for quantlm and fp32).


def perplexity_on_windows(model, windows, bos_token_id: int | None) -> dict:
    """The one scorer of every peer benchmark. Each row of ``windows`` is one sequence (BOS prepended if given, never
    scored), run once under ``torch.no_grad``; loss = cross entropy of logits[:-1] (in fp32) against ids[1:], summed
    over tokens; ppl = exp(total / count)."""
    import torch
    import torch.nn.functional as F

    total_nll, total_tokens = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for row in windows:
            ids = row.unsqueeze(0)
            if bos_token_id is not None:
                ids = torch.cat([torch.tensor([[bos_token_id]]), ids], dim=1)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
            targets = ids[0, 1:]
            total_nll += F.cross_entropy(logits.float(), targets, reduction="sum").item()
            total_tokens += targets.numel()
    return {
        "ppl": math.exp(total_nll / total_tokens),
        "nll": total_nll,
        "tokens": total_tokens,
        "eval_s": time.perf_counter() - t0,
    }


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantized_module_types(model) -> str:
    """Which module classes now hold the decoder's projection weights, e.g. 'TorchQuantLinear x210'."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if name.endswith(PROJECTIONS):
            kind = type(module).__name__
            counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{kind} x{n}" for kind, n in sorted(counts.items()))


def decoder_linears(model) -> dict:
    """{name: module} of every ``nn.Linear`` of a float HF causal LM except its output projection: the Linears of
    the decoder blocks, which every method here quantizes."""
    from torch import nn

    head = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def set_module(model, name: str, module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def load_fp32(job: dict, calib) -> dict:
    """The unquantized fp32 model: the reference row."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    return {
        "model": model.eval(),
        "load_s": time.perf_counter() - t0,
        "quantize_s": None,
        "versions": package_versions("torch", "transformers"),
        "settings": {},
    }


Worker = Callable[[dict, object], dict]


def run_worker(kind: str, job_path: Path, workers: Mapping[str, Worker]) -> int:
    """Run ``workers[kind]``, score its model, write the job's result file; errors are recorded, not raised.

    A worker takes (job, calibration windows or None) and returns a dict with ``model``, ``load_s``,
    ``quantize_s``, ``versions`` and ``settings``; optionally ``extra`` (more fields for the result), ``eval_dtype``
    (the dtype it computes in, where the first parameter's dtype would not say it) and ``after_scoring`` (a
    function of the model, called after scoring, whose dict also goes into the result: e.g. a speed measurement).
    """
    job = json.loads(Path(job_path).read_text())
    result_path = Path(job["result_path"])
    try:
        import torch

        torch.set_num_threads(job["threads"])
        calib = torch.load(job["calib_path"])["input_ids"] if job.get("calib_path") else None
        evaluation = torch.load(job["eval_path"])
        outcome = workers[kind](job, calib)
        gc.collect()
        # load + quantize (+ save and reload where the worker does that), before scoring adds its own memory
        rss_before_scoring = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
        log(f"{job['name']}: scoring {evaluation['input_ids'].shape[0]} windows")
        model = outcome["model"]
        score = perplexity_on_windows(model, evaluation["input_ids"], evaluation["bos_token_id"])
        result = {
            "ok": True,
            **score,
            "load_s": outcome["load_s"],
            "quantize_s": outcome["quantize_s"],
            "quantize_rss_gb": rss_before_scoring,
            "versions": outcome["versions"],
            "settings": outcome["settings"],
            "eval_digest": tensor_digest(evaluation["input_ids"]),
            "threads": torch.get_num_threads(),
            "eval_dtype": outcome.get("eval_dtype") or str(next(model.parameters()).dtype).removeprefix("torch."),
            **outcome.get("extra", {}),
        }
        if calib is not None:
            result["calib_digest"] = tensor_digest(calib)
        if outcome.get("after_scoring") is not None:
            result.update(outcome["after_scoring"](model))
    except Exception as e:
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {first_line(str(e))}"}
    write_json_atomically(result_path, result)
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------------------------------------------
# Orchestrator side: runs in the project's venv.


class PeerFailure(Exception):
    """A peer could not be installed or run; the message becomes its row."""


def run_streamed(cmd: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path = REPO) -> dict:
    """Run ``cmd``, copying its output to stderr and to ``log_path``; return rc, wall time, peak RSS, last lines.

    The peak RSS comes from ``os.wait4`` on this one child, so it covers the child (and any process it waited
    for) and nothing else this script ran.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=40)
    t0 = time.perf_counter()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        pending = b""
        while chunk := os.read(proc.stdout.fileno(), 65536):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            log_file.write(chunk)
            log_file.flush()
            pending += chunk
            *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
            tail.extend(line.decode(errors="replace") for line in lines if line.strip())
        if pending.strip():
            tail.append(pending.decode(errors="replace"))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
    return {
        "rc": proc.returncode,
        "wall_s": time.perf_counter() - t0,
        "peak_rss_gb": usage.ru_maxrss * 1024 / GB,  # ru_maxrss is in KiB on Linux
        "tail": list(tail),
    }


def failure_reason(run: dict) -> str:
    """One line on why a command failed: pip's ERROR line, an exception line, or the exit status."""
    for line in reversed(run["tail"]):
        if line.startswith("ERROR") or "Error" in line.split(":")[0] or line.startswith("Killed"):
            return first_line(line)
    if run["rc"] < 0:
        return f"killed by signal {-run['rc']}"
    return first_line(run["tail"][-1]) if run["tail"] else f"exit status {run['rc']}"


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every child process: CPU only, unbuffered, no stray Python path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra or {})
    return env


def worker_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for workers: ``threads`` for OpenMP and MKL, plus ``extra``."""
    n = str(threads)
    return child_env({"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, **(extra or {})})


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(
    venv: Path,
    requirements: list[str],
    *,
    logs: Path,
    skip_install: bool = False,
    install_env: dict[str, str] | None = None,
) -> tuple[Path, float | None]:
    """The python of the venv at ``venv``, built first unless its marker lists exactly ``requirements``; and the
    install time (None when reused).

    ``requirements[0]`` must be ``TORCH_PIN``: torch goes in first, on its own, and is named again with the rest,
    so pip can neither upgrade it nor pull the CUDA build of another version. Install logs go to ``logs``.
    """
    if requirements[0] != TORCH_PIN:
        raise ValueError(f"the first requirement must be {TORCH_PIN}, got {requirements[0]}")
    marker = venv / MARKER
    name = venv.name
    if marker.is_file() and json.loads(marker.read_text()) == requirements and venv_python(venv).exists():
        log(f"{name}: reusing {venv}")
        return venv_python(venv), None
    if skip_install:
        raise PeerFailure(f"not installed in {venv} (run without --skip-install)")
    log(f"{name}: installing {' '.join(requirements)} into {venv}")
    t0 = time.perf_counter()
    env = child_env(install_env)
    python = str(venv_python(venv))
    pip = [python, "-m", "pip", "install", "--progress-bar", "off"]
    steps = {
        "venv": [sys.executable, "-m", "venv", "--clear", str(venv)],
        "torch": [*pip, TORCH_PIN],
        "packages": [*pip, *requirements[1:], TORCH_PIN],
    }
    for step, cmd in steps.items():
        run = run_streamed(cmd, logs / f"install-{name}-{step}.log", env=env)
        if run["rc"] != 0:
            raise PeerFailure(f"install ({step}): {failure_reason(run)}")
    marker.write_text(json.dumps(requirements))
    seconds = time.perf_counter() - t0
    log(f"{name}: installed in {seconds:.0f}s")
    return venv_python(venv), seconds


def prepare_windows(
    model: str, work_dir: Path, *, eval_windows: int, eval_seqlen: int, calibration: tuple[int, int] | None = None
) -> dict:
    """Compute the evaluation windows (and, if ``calibration`` = (samples, seqlen) is given, the calibration
    windows) with quantlm's own code, save them under ``work_dir`` for every worker, and describe them."""
    import torch

    from quantlm.api import Calibration
    from quantlm.data import load_text, tokenize_text
    from quantlm.eval.perplexity import eval_windows as cut_windows
    from quantlm.eval.perplexity import needs_bos
    from quantlm.models.sources import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(model)
    tokenizer = load_tokenizer(model_dir)
    eval_tokens = tokenize_text(tokenizer, load_text("enwiki", "eval"))
    evaluation = cut_windows(eval_tokens, eval_seqlen, eval_windows)
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type", "")
    config_only = SimpleNamespace(config=SimpleNamespace(model_type=model_type))  # all that needs_bos looks at
    bos = tokenizer.bos_token_id if needs_bos(config_only) else None
    tokens = {
        "model_dir": model_dir,
        "eval_path": work_dir / "eval.pt",
        "evaluation": {
            "source": "enwiki",
            "split": "eval",
            "windows": evaluation.shape[0],
            "seqlen": evaluation.shape[1],
            "bos_token_id": bos,
            "digest": tensor_digest(evaluation),
        },
    }
    torch.save({"input_ids": evaluation, "bos_token_id": bos}, tokens["eval_path"])
    if calibration is not None:
        spec = Calibration(n_samples=calibration[0], seqlen=calibration[1])
        calib = spec.windows(tokenizer)
        tokens["calib_path"] = work_dir / "calibration.pt"
        tokens["calibration"] = {**spec.to_dict(), "digest": tensor_digest(calib)}
        torch.save({"input_ids": calib}, tokens["calib_path"])
    return tokens


def run_job(name: str, kind: str, python: Path, script: Path, job: dict, work_dir: Path, env: dict[str, str]) -> dict:
    """Run ``python script --worker kind --job ...`` on ``job`` in ``work_dir`` and return the fields of its row:
    ``total_s`` and ``peak_rss_gb`` of the process, then the worker's result, or ``ok=False`` and ``error``."""
    job = {**job, "name": name, "result_path": str(work_dir / f"result-{name}.json"), "work_dir": str(work_dir)}
    job_path = work_dir / f"job-{name}.json"
    write_json_atomically(job_path, job)
    result_path = Path(job["result_path"])
    result_path.unlink(missing_ok=True)
    log_path = work_dir / "logs" / f"{name}.log"
    log(f"{name}: running (log: {log_path})")
    # in the work dir: some peers write files (logs/, caches) into the current directory
    run = run_streamed([str(python), str(script), "--worker", kind, "--job", str(job_path)], log_path, env, work_dir)
    row = {"total_s": run["wall_s"], "peak_rss_gb": run["peak_rss_gb"]}
    if not result_path.is_file():
        return {**row, "ok": False, "error": failure_reason(run)}
    return {**row, **json.loads(result_path.read_text())}


def git_revision() -> str:
    """The commit, with '+dirty' when the working tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return head + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_info() -> dict:
    """The CPU's name and the flags (from ``lscpu``) that decide which kernels run fast: AVX2, AVX-512 (F, BF16,
    VNNI) and AMX. Falls back to /proc/cpuinfo where lscpu is missing."""
    fields: dict[str, str] = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
        name, flags = fields.get("Model name", ""), fields.get("Flags", "").split()
    except (OSError, subprocess.CalledProcessError):
        name, flags = "", []
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value.split()
        except OSError:
            pass
    return {
        "model": name or platform.processor() or platform.machine(),
        "flags": [f for f in CPU_FLAGS_SHOWN if f in flags],
        "cores": os.cpu_count(),
    }


def cpu_line(cpu: dict) -> str:
    """E.g. 'Intel Xeon ... (2 cores; avx2 avx512f avx512_bf16 avx512_vnni; no AMX)'."""
    flags = " ".join(cpu["flags"]) or "no AVX2/AVX-512"
    amx = "" if any(f.startswith("amx") for f in cpu["flags"]) else "; no AMX"
    return f"{cpu['model']} ({cpu['cores']} cores; {flags}{amx})"


def write_report_files(out: Path, report: dict, markdown: str) -> None:
    """Write OUT.json and OUT.md, each atomically."""
    write_json_atomically(out.with_suffix(".json"), report)
    write_text_atomically(out.with_suffix(".md"), markdown)


def kept_rows(rows: list[dict], previous: dict, key: str) -> list[dict]:
    """``rows`` plus the rows of the ``previous`` report for names (``row[key]``) not run now, each marked with the
    run it is from; the previous order is kept and new names go last. The caller checks that ``previous`` measured
    the same thing."""
    fresh = {r[key]: r for r in rows}
    merged = [
        fresh.pop(r[key])
        if r[key] in fresh
        else {
            **r,
            "kept_from": r.get("kept_from")
            or {"date": previous["date"], "git": previous["git"], "command": previous["command"]},
        }
        for r in previous["rows"]
    ]
    return merged + list(fresh.values())
