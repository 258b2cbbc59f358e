"""GPTQ next to its peers: quantlm, GPTQModel and llm-compressor on one model, with the same tokens and the same scorer.

What it measures, per peer: the wall time of the quantize call alone, the wall time of the whole process (start-up,
model load, quantization, evaluation), the process's peak resident set size, and the perplexity of the quantized
model on the benchmark protocol's evaluation windows (docs/benchmarks.md).

How it keeps the comparison fair:
- The calibration windows (quantlm's ``Calibration``: enwiki calibration split, seed 0) and the evaluation windows
  (quantlm's ``eval_windows`` over the enwiki eval split) are computed once by this script and saved to files;
  every peer reads those files, and reports a hash of what it read.
- Every peer loads the same fp32 Hugging Face directory and runs its calibration forward passes and its solver in
  float32 on the CPU (GPTQModel would pick bfloat16 on a CPU, so it is told fp32; llm-compressor keeps the dtype
  of the model it is handed, loaded here in fp32). Same bits, group size, symmetry, damping and act-order for all;
  the differences that remain (llm-compressor's static group grids, GPTQModel's fp16 scales on disk) are listed
  in the workers' docstrings and in the table's notes.
- Every quantized model is scored by the same function below, in the peer's own process: each window runs once
  under ``torch.no_grad``, loss = cross entropy of logits[:-1] against ids[1:] summed over tokens, and
  ppl = exp(total / count). The table says in which dtype each model ran (GPTQModel has a float32 CPU kernel for
  4-bit only; other widths are scored in bfloat16).
- Each peer runs as a child process, so its peak RSS is its own (``os.wait4``).

Peers are never dependencies of quantlm: each one gets a throwaway virtualenv under
``$QUANTLM_HOME/peer-venvs/<peer>`` (torch==2.13.0 is installed first and stays pinned, so pip never pulls CUDA
packages), reused while its marker file matches the pinned versions. The peers' workers run this same file with
``--worker``; in that mode it imports neither quantlm nor anything outside the peer's venv.

Run (from the repository root, with the project's venv; progress goes to stderr):

    .venv/bin/python benchmarks/gptq_peers.py                         # W4 g64 sym, damp 0.05, 128 x 2048 calibration
    .venv/bin/python benchmarks/gptq_peers.py --peers fp32,gptqmodel,llmcompressor,quantlm --bits 3 --asym
    .venv/bin/python benchmarks/gptq_peers.py --calib-samples 2 --calib-seqlen 128 --eval-windows 1 \\
        --eval-seqlen 256 --peers quantlm                              # smoke test

On a machine that is busy with other work, pass ``--threads 1``: with OpenMP threads competing for cores, the
GPTQ solvers' many small operations slow down by an order of magnitude.

It writes benchmarks/results/gptq_peers.{md,json} (or ``--out``), again after every peer, so a run that is stopped
keeps the rows it measured (the report names the peers still to run). A peer that cannot be installed or fails is
recorded as ``failed: <reason>`` and the others still run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gptq_peers"
DEFAULT_WORK_DIR = REPO / "out" / "gptq_peers"
TORCH_PIN = "torch==2.13.0"
PEER_VERSIONS = {"gptqmodel": "7.6.0", "llmcompressor": "0.14.0.1"}
# GPTQModel 7.6.0's setup.py builds no extension at install time (its kernels are compiled on first use);
# BUILD_CUDA_EXT=0 is the variable older releases read, kept so an older pin cannot start a CUDA build.
PEER_INSTALL_ENV = {"gptqmodel": {"BUILD_CUDA_EXT": "0"}, "llmcompressor": {}}
ALL_PEERS = ("fp32", "gptqmodel", "llmcompressor", "quantlm")
VENV_PEERS = ("gptqmodel", "llmcompressor")
MARKER = ".quantlm-peer-installed"
GB = 1024**3


# --------------------------------------------------------------------------------------------------------------
# Shared by the orchestrator and the workers: stdlib only at import time.


def log(message: str) -> None:
    """Progress goes to stderr, so stdout carries only the final table."""
    print(f"[gptq_peers] {message}", file=sys.stderr, flush=True)


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
    """A short hash of a token tensor, to show that every peer read the same tokens."""
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# Worker side: runs inside a peer's venv (or the project's venv for quantlm and fp32).


def perplexity_on_windows(model, windows, bos_token_id: int | None) -> dict:
    """Score each row of ``windows`` as one sequence (BOS prepended if given, never scored); fp32 loss."""
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


def calibration_samples(windows) -> list[dict]:
    """The calibration windows as a list of {input_ids, attention_mask} rows of shape [1, seqlen]."""
    import torch

    return [{"input_ids": row.unsqueeze(0), "attention_mask": torch.ones_like(row).unsqueeze(0)} for row in windows]


def quantize_with_gptqmodel(job: dict, calib) -> dict:
    """GPTQModel: quantize a fp32 model on the CPU, save it, and load it back for scoring.

    The model that ``quantize`` leaves in memory cannot be scored: its packed ``TorchLinear`` modules keep the v1
    zero-point layout that is written to disk, while their forward expects v2, which only the loader converts
    (scored as is, the perplexity comes out in the billions). So the checkpoint is saved and loaded back, the way
    GPTQModel's README uses a quantized model, with the kernel GPTQModel picks for float32 on a CPU. Saving and
    loading are timed apart from ``quantize``. ``act_group_aware`` (GAR, GPTQModel's default reordering for GPTQ)
    is not plain GPTQ, so it is off unless asked for; everything else keeps GPTQModel's defaults.
    """
    import shutil

    import torch
    from gptqmodel import GPTQConfig, GPTQModel

    config = GPTQConfig(
        bits=job["bits"],
        group_size=job["group_size"],
        sym=job["sym"],
        desc_act=job["act_order"],
        act_group_aware=job["gptqmodel_gar"],
        static_groups=job["static_groups"],
        damp_percent=job["damp"],
        device="cpu",
    )
    t0 = time.perf_counter()
    qmodel = GPTQModel.load(job["model_dir"], config, dtype=torch.float32)  # the device comes from config.device
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    qmodel.quantize(calibration_samples(calib), batch_size=job["batch_size"], calibration_sort=None)
    quantize_s = time.perf_counter() - t0
    checkpoint = Path(job["work_dir"]) / "gptqmodel-checkpoint"
    shutil.rmtree(checkpoint, ignore_errors=True)
    t0 = time.perf_counter()
    qmodel.save(str(checkpoint))
    save_s = time.perf_counter() - t0
    qconfig = qmodel.quantize_config
    del qmodel
    t0 = time.perf_counter()
    model = load_gptqmodel_checkpoint(checkpoint)
    reload_s = time.perf_counter() - t0
    return {
        "model": model,
        "load_s": load_s,
        "quantize_s": quantize_s,
        "versions": package_versions("gptqmodel", "torch", "transformers"),
        "settings": {
            "damp_percent": qconfig.damp_percent,
            "damp_auto_increment": qconfig.damp_auto_increment,
            "desc_act": qconfig.desc_act,
            "act_group_aware": qconfig.act_group_aware,
            "static_groups": qconfig.static_groups,
            "true_sequential": qconfig.true_sequential,
            "mse": qconfig.mse,
            "offload_to_disk": qconfig.offload_to_disk,
            "checkpoint_scales": saved_scales_dtype(checkpoint),
            "save_s": round(save_s, 1),
            "reload_s": round(reload_s, 1),
            "kernel": quantized_module_types(model),
        },
    }


def load_gptqmodel_checkpoint(checkpoint: Path):
    """The saved GPTQModel checkpoint as a HF model on the CPU: in float32 if some kernel supports it, else bf16.

    In GPTQModel 7.6.0 the only CPU kernel that accepts float32 is TorchFusedLinear, which is 4-bit only; other
    bit widths have to run in bfloat16 (the TorchLinear and TorchAtenLinear kernels take fp16/bf16 only).
    """
    import torch
    from gptqmodel import GPTQModel

    try:
        return GPTQModel.load(str(checkpoint), device="cpu", dtype=torch.float32).model.eval()
    except (ValueError, NotImplementedError) as e:  # what select_quant_linear raises when no kernel fits
        log(f"gptqmodel: no float32 CPU kernel ({first_line(str(e))}); scoring in bfloat16 instead")
        return GPTQModel.load(str(checkpoint), device="cpu", dtype=torch.bfloat16).model.eval()


def saved_scales_dtype(checkpoint: Path) -> str:
    """The dtype the checkpoint stores its group scales in (GPTQ's format: float16, whatever the model's dtype)."""
    from safetensors import safe_open

    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if key.endswith(".scales"):
                    return f.get_slice(key).get_dtype()
    return "-"


def llmcompressor_scheme(job: dict) -> dict:
    """The config group for int weights at the requested bits, grouping and symmetry; activations untouched."""
    weights = {"num_bits": job["bits"], "type": "int", "symmetric": job["sym"]}
    if job["group_size"] > 0:
        weights.update(strategy="group", group_size=job["group_size"])
    else:
        weights.update(strategy="channel")
    return {"targets": ["Linear"], "weights": weights}


def quantize_with_llmcompressor(job: dict, calib) -> dict:
    """llm-compressor: ``oneshot`` with a GPTQModifier on a fp32 model; the result fake-quantizes in memory.

    Its GPTQ always takes each group's scale and zero from the original weights (a "static groups" grid, set by
    the weight observer before the solver runs), and it has no act-order that regroups columns: with --act-order
    it gets ``actorder="weight"`` (columns by descending Hessian diagonal, groups kept).
    """
    import datasets
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    load_s = time.perf_counter() - t0
    dataset = datasets.Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}
    )
    modifier = GPTQModifier(
        config_groups={"group_0": llmcompressor_scheme(job)},
        ignore=["lm_head"],
        dampening_frac=job["damp"],
        actorder="weight" if job["act_order"] else None,
        block_size=128,
    )
    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=modifier,
        num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False,
        batch_size=job["batch_size"],
        pipeline="sequential",
    )
    quantize_s = time.perf_counter() - t0
    return {
        "model": model.eval(),
        "load_s": load_s,
        "quantize_s": quantize_s,
        "versions": package_versions("llmcompressor", "compressed-tensors", "torch", "transformers"),
        "settings": {
            "dampening_frac": modifier.dampening_frac,
            "actorder": str(modifier.actorder),
            "static_groups": True,
            "pipeline": "sequential",
            "scheme": llmcompressor_scheme(job),
            "kernel": quantized_module_types(model),
        },
    }


def quantize_with_quantlm(job: dict, calib) -> dict:
    """quantlm: in memory (like the peers), or streamed block by block into a checkpoint and loaded back.

    In the streamed mode the quantize time includes writing the checkpoint, since the two are interleaved.
    """
    import quantlm
    from quantlm.api import quantize_to_checkpoint
    from quantlm.core import QuantSpec
    from quantlm.methods.gptq import GPTQ

    step = GPTQ(
        QuantSpec(bits=job["bits"], group_size=job["group_size"], symmetric=job["sym"]),
        damp=job["damp"],
        act_order=job["act_order"],
        static_groups=job["static_groups"],
    )
    if job["quantlm_mode"] == "memory":
        t0 = time.perf_counter()
        model = quantlm.load(job["model_dir"])
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        quantlm.quantize(model, step, calib, batch_size=job["batch_size"])
        quantize_s = time.perf_counter() - t0
    else:
        out = Path(job["work_dir"]) / "quantlm-checkpoint"
        blocks_dir = Path(job["work_dir"]) / "quantlm-blocks"
        # a timed run must not resume the blocks an interrupted earlier run left in the work directory
        shutil.rmtree(blocks_dir, ignore_errors=True)
        t0 = time.perf_counter()
        quantize_to_checkpoint(
            job["model_dir"],
            step,
            out,
            calibration=calib,
            batch_size=job["batch_size"],
            work_dir=blocks_dir,
            overwrite=True,
        )
        quantize_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = quantlm.load(out)
        load_s = time.perf_counter() - t0
    return {
        "model": model.eval(),
        "load_s": load_s,
        "quantize_s": quantize_s,
        "versions": {"quantlm": quantlm.__version__, **package_versions("torch", "transformers")},
        "settings": {
            "mode": job["quantlm_mode"],
            "damp": step.damp,
            "act_order": step.act_order,
            "static_groups": step.static_groups,
            "true_sequential": step.true_sequential,
            "sink_weight": step.sink_weight,
            "kernel": quantized_module_types(model),
        },
    }


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


WORKERS = {
    "fp32": load_fp32,
    "gptqmodel": quantize_with_gptqmodel,
    "llmcompressor": quantize_with_llmcompressor,
    "quantlm": quantize_with_quantlm,
}


def quantized_module_types(model) -> str:
    """Which module classes now hold the decoder's projection weights, e.g. 'TorchQuantLinear x210'."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
            kind = type(module).__name__
            counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{kind} x{n}" for kind, n in sorted(counts.items()))


def run_worker(peer: str, job_path: Path) -> int:
    """Quantize with ``peer``, score the result, write the result file; errors are recorded, not raised."""
    job = json.loads(Path(job_path).read_text())
    result_path = Path(job["result_path"])
    try:
        import torch

        torch.set_num_threads(job["threads"])
        calib = torch.load(job["calib_path"])["input_ids"]
        evaluation = torch.load(job["eval_path"])
        outcome = WORKERS[peer](job, calib)
        # load + quantize (+ save and reload where the peer does that), before scoring adds its own memory
        rss_before_scoring = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
        log(f"{peer}: scoring {evaluation['input_ids'].shape[0]} windows")
        score = perplexity_on_windows(outcome["model"], evaluation["input_ids"], evaluation["bos_token_id"])
        result = {
            "ok": True,
            **score,
            "load_s": outcome["load_s"],
            "quantize_s": outcome["quantize_s"],
            "quantize_rss_gb": rss_before_scoring,
            "versions": outcome["versions"],
            "settings": outcome["settings"],
            "calib_digest": tensor_digest(calib),
            "eval_digest": tensor_digest(evaluation["input_ids"]),
            "threads": torch.get_num_threads(),
            "eval_dtype": str(next(outcome["model"].parameters()).dtype).removeprefix("torch."),
        }
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


def worker_env(threads: int) -> dict[str, str]:
    """The environment for workers: ``threads`` for OpenMP and MKL, and GPTQModel's CPU worker pool.

    GPTQModel 7.6.0 sizes its "cpu" thread pool from GPTQMODEL_CPU_WORKERS (default: half the cores) and nests a
    "model_loader:cpu" pool of 2 workers inside it, which fails ("requests 2 workers but parent 'cpu' only has
    1") whenever the parent has fewer than 2: on a 2-core machine the variable must be set, to at least 2.
    """
    n = str(threads)
    return child_env({"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "GPTQMODEL_CPU_WORKERS": str(max(2, threads))})


def peer_requirements(peer: str, args) -> list[str]:
    """What the peer's venv must hold, in install order: torch first, then the peer pinned with torch."""
    version = getattr(args, f"{peer}_version")
    return [TORCH_PIN, f"{peer}=={version}"]


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_peer_venv(peer: str, args, work_dir: Path) -> tuple[Path, float | None]:
    """The python of the peer's venv, installing it first unless its marker matches; and the install time."""
    venv = args.venv_root / peer
    requirements = peer_requirements(peer, args)
    marker = venv / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == requirements and venv_python(venv).exists():
        log(f"{peer}: reusing {venv}")
        return venv_python(venv), None
    if args.skip_install:
        raise PeerFailure(f"not installed in {venv} (run without --skip-install)")
    log(f"{peer}: installing {' '.join(requirements)} into {venv}")
    t0 = time.perf_counter()
    env = child_env(PEER_INSTALL_ENV[peer])
    python = str(venv_python(venv))
    steps = {
        "venv": [sys.executable, "-m", "venv", "--clear", str(venv)],
        "torch": [python, "-m", "pip", "install", "--progress-bar", "off", TORCH_PIN],
        peer: [python, "-m", "pip", "install", "--progress-bar", "off", *requirements[1:], TORCH_PIN],
    }
    for step, cmd in steps.items():
        run = run_streamed(cmd, work_dir / "logs" / f"install-{peer}-{step}.log", env=env)
        if run["rc"] != 0:
            raise PeerFailure(f"install ({step}): {failure_reason(run)}")
    marker.write_text(json.dumps(requirements))
    seconds = time.perf_counter() - t0
    log(f"{peer}: installed in {seconds:.0f}s")
    return venv_python(venv), seconds


def prepare_tokens(args, work_dir: Path) -> dict:
    """Compute the calibration and evaluation windows with quantlm's own code and save them for every peer."""
    import torch

    from quantlm.api import Calibration
    from quantlm.data import load_text, tokenize_text
    from quantlm.eval.perplexity import eval_windows, needs_bos
    from quantlm.models.sources import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    calibration = Calibration(n_samples=args.calib_samples, seqlen=args.calib_seqlen)
    calib = calibration.windows(tokenizer)
    eval_tokens = tokenize_text(tokenizer, load_text("enwiki", "eval"))
    evaluation = eval_windows(eval_tokens, args.eval_seqlen, args.eval_windows)
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type", "")
    config_only = SimpleNamespace(config=SimpleNamespace(model_type=model_type))  # all that needs_bos looks at
    bos = tokenizer.bos_token_id if needs_bos(config_only) else None
    paths = {"calib_path": work_dir / "calibration.pt", "eval_path": work_dir / "eval.pt"}
    torch.save({"input_ids": calib}, paths["calib_path"])
    torch.save({"input_ids": evaluation, "bos_token_id": bos}, paths["eval_path"])
    return {
        "model_dir": model_dir,
        **paths,
        "calibration": {**calibration.to_dict(), "digest": tensor_digest(calib)},
        "evaluation": {
            "source": "enwiki",
            "split": "eval",
            "windows": evaluation.shape[0],
            "seqlen": evaluation.shape[1],
            "bos_token_id": bos,
            "digest": tensor_digest(evaluation),
        },
    }


def job_for(peer: str, args, tokens: dict, work_dir: Path) -> dict:
    """Everything a worker needs, as plain JSON."""
    return {
        "peer": peer,
        "model_dir": str(tokens["model_dir"]),
        "calib_path": str(tokens["calib_path"]),
        "eval_path": str(tokens["eval_path"]),
        "result_path": str(work_dir / f"result-{peer}.json"),
        "work_dir": str(work_dir),
        "bits": args.bits,
        "group_size": args.group_size,
        "sym": args.sym,
        "damp": args.damp,
        "act_order": args.act_order,
        "static_groups": args.static_groups,
        "gptqmodel_gar": args.gptqmodel_gar,
        "batch_size": args.batch_size,
        "quantlm_mode": args.quantlm_mode,
        "threads": args.threads,
    }


def run_peer(peer: str, args, tokens: dict, work_dir: Path) -> dict:
    """Install (if needed) and run one peer in its own process; a row for the table, failures included."""
    row: dict = {"peer": peer, "install_s": None}
    try:
        if peer in VENV_PEERS:
            row["pinned"] = getattr(args, f"{peer}_version")
            python, row["install_s"] = ensure_peer_venv(peer, args, work_dir)
        else:
            python = Path(sys.executable)
        job = job_for(peer, args, tokens, work_dir)
        job_path = work_dir / f"job-{peer}.json"
        write_json_atomically(job_path, job)
        Path(job["result_path"]).unlink(missing_ok=True)
        log(f"{peer}: quantizing and scoring (log: {work_dir / 'logs' / f'{peer}.log'})")
        cmd = [str(python), str(Path(__file__).resolve()), "--worker", peer, "--job", str(job_path)]
        # run in the work dir: GPTQModel writes its own logs/ folder into the current directory
        run = run_streamed(cmd, work_dir / "logs" / f"{peer}.log", env=worker_env(args.threads), cwd=work_dir)
        row.update(total_s=run["wall_s"], peak_rss_gb=run["peak_rss_gb"])
        result_path = Path(job["result_path"])
        if not result_path.is_file():
            raise PeerFailure(failure_reason(run))
        result = json.loads(result_path.read_text())
        if not result["ok"]:
            raise PeerFailure(result["error"])
        row.update(result)
        log(
            f"{peer}: ppl {result['ppl']:.3f}, quantize {format_seconds(result['quantize_s'])}, "
            f"total {run['wall_s']:.1f}s, peak RSS {run['peak_rss_gb']:.2f} GB"
        )
    except (PeerFailure, OSError) as e:
        row.update(ok=False, error=str(e) if isinstance(e, PeerFailure) else f"{type(e).__name__}: {e}")
        log(f"{peer}: failed: {e}")
    return row


def format_seconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


def cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def setting_label(args) -> str:
    """E.g. 'W4 g64 sym, damp 0.05'."""
    label = f"W{args.bits} {'g' + str(args.group_size) if args.group_size > 0 else 'per-channel'} "
    label += f"{'sym' if args.sym else 'asym'}, damp {args.damp:g}"
    if args.act_order:
        label += ", act-order"
    if args.static_groups:
        label += ", static groups"
    return label


def peer_version(row: dict) -> str:
    """The version the peer reported, else the one it was pinned to."""
    name = row["peer"] if row["peer"] != "fp32" else "torch"
    return (row.get("versions") or {}).get(name) or row.get("pinned") or "-"


def markdown_table(report: dict) -> str:
    """The results as markdown: a header on the setup, then one row per peer."""
    rows = report["rows"]
    fp = next((r for r in rows if r["peer"] == "fp32" and r.get("ok")), None)
    calib, evaluation = report["calibration"], report["evaluation"]
    lines = [
        f"GPTQ {report['setting']} on `{report['model']}`, "
        f"CPU ({report['cpu_count']} cores, {report['args']['threads']} "
        "threads per worker); calibration and solvers in float32, each model's scoring dtype in its notes.",
        f"Calibration: {calib['n_samples']} x {calib['seqlen']} tokens (enwiki calibration split, seed "
        f"{calib['seed']}, digest {calib['digest']}); evaluation: {evaluation['windows']} x {evaluation['seqlen']} "
        f"tokens (enwiki eval split, digest {evaluation['digest']}); batch size {report['args']['batch_size']}.",
        "",
        "| peer | version | perplexity | vs fp32 | quantize | total | peak RSS to quantize (GB) | peak RSS (GB) "
        "| install | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r.get("ok"):
            lines.append(
                f"| {r['peer']} | {peer_version(r)} | failed: {r['error']} | - | - | "
                f"{format_seconds(r.get('total_s'))} | - | {cell(r.get('peak_rss_gb'), '.2f')} | "
                f"{format_seconds(r['install_s'])} | |"
            )
            continue
        vs_fp = f"{r['ppl'] / fp['ppl'] - 1:+.1%}" if fp and r is not fp else "-"
        notes = "; ".join(
            f"{k}={v}" for k, v in {"eval_dtype": r["eval_dtype"], **r["settings"]}.items() if k != "scheme"
        )
        if r.get("kept_from"):
            notes = f"**kept from the run of {r['kept_from']['date']} at {r['kept_from']['git']}**; " + notes
        lines.append(
            f"| {r['peer']} | {peer_version(r)} | {r['ppl']:.3f} | {vs_fp} | {format_seconds(r['quantize_s'])} | "
            f"{format_seconds(r['total_s'])} | {cell(r.get('quantize_rss_gb'), '.2f')} | {r['peak_rss_gb']:.2f} | "
            f"{format_seconds(r['install_s'])} | {notes} |"
        )
    lines += [
        "",
        "quantize: the quantize call alone; total: the whole worker process (start-up, imports, load, quantize, "
        "evaluation); peak RSS: that process's maximum resident set size (to quantize: up to the end of load, "
        "quantize and any save and reload, before scoring); install: time to build the peer's venv in this run "
        "(- when reused). Single run: see docs/benchmarks.md on timing noise.",
        "",
        f"Command: `{report['command']}`",
        "",
        f"quantlm {report['quantlm_version']} at {report['git']}, {report['date']}"
        + (f" (run started {report['started']})." if report.get("started") else "."),
    ]
    if report.get("pending"):
        lines += ["", f"**Partial report**: this run had not yet run {', '.join(report['pending'])}."]
    return "\n".join(lines) + "\n"


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


def check_consistency(rows: list[dict], tokens: dict) -> None:
    """Every peer must have read the very tokens this script wrote."""
    for r in rows:
        if r.get("ok") and (
            r["calib_digest"] != tokens["calibration"]["digest"] or r["eval_digest"] != tokens["evaluation"]["digest"]
        ):
            r.update(ok=False, error="read different calibration or evaluation tokens than were written")


def with_kept_rows(rows: list[dict], args, tokens: dict) -> list[dict]:
    """``rows`` plus the rows of the previous report at ``args.out`` for peers not run now, when that report has the
    same setting, model, batch size and threads and read the same tokens; each kept row says which run it is from.
    The previous order is kept."""
    path = args.out.with_suffix(".json")
    if not path.is_file():
        return rows
    previous = json.loads(path.read_text())
    same = (
        previous.get("setting") == setting_label(args)
        and all(previous["args"].get(k) == getattr(args, k) for k in ("batch_size", "threads", "model"))
        and previous["calibration"]["digest"] == tokens["calibration"]["digest"]
        and previous["evaluation"]["digest"] == tokens["evaluation"]["digest"]
    )
    if not same:
        log(
            f"--keep-rows: {path} is for another setting, model, batch size, thread count or other tokens; "
            "keeping none of its rows"
        )
        return rows
    fresh = {r["peer"]: r for r in rows}
    merged = [
        fresh.pop(r["peer"])
        if r["peer"] in fresh
        else {
            **r,
            "kept_from": r.get("kept_from")
            or {"date": previous["date"], "git": previous["git"], "command": previous["command"]},
        }
        for r in previous["rows"]
    ]
    return merged + list(fresh.values())


def run_benchmark(args) -> None:
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    log(
        f"tokenizing: calibration {args.calib_samples} x {args.calib_seqlen}, "
        f"evaluation {args.eval_windows} x {args.eval_seqlen}"
    )
    tokens = prepare_tokens(args, work_dir)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows: list[dict] = []
    for peer in args.peers:
        rows.append(run_peer(peer, args, tokens, work_dir))
        # after every peer: a run stopped later still leaves the rows it measured (and says which are missing)
        table = write_report(args, tokens, rows, started, pending=args.peers[len(rows) :])
    print(table, end="")


def write_report(args, tokens: dict, rows: list[dict], started: str, pending: list[str]) -> str:
    """Write OUT.json and OUT.md for the rows measured so far; ``pending``: the peers of this run not run yet."""
    import quantlm

    check_consistency(rows, tokens)
    if args.keep_rows:
        rows = with_kept_rows(rows, args, tokens)
    report = {
        "setting": setting_label(args),
        "model": args.model,
        "model_dir": str(tokens["model_dir"]),
        "calibration": tokens["calibration"],
        "evaluation": tokens["evaluation"],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "command": shlex.join([os.path.relpath(sys.executable, REPO), *sys.argv]),
        "quantlm_version": quantlm.__version__,
        "git": git_revision(),
        "started": started,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "pending": list(pending),
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "rows": rows,
    }
    table = markdown_table(report)
    write_json_atomically(args.out.with_suffix(".json"), report)
    write_text_atomically(args.out.with_suffix(".md"), table)
    log(
        f"wrote {args.out.with_suffix('.md')} and .json" + (f" (still to run: {', '.join(pending)})" if pending else "")
    )
    return table


def parse_peers(text: str) -> list[str]:
    peers = [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(ALL_PEERS))
    if unknown or not peers:
        raise argparse.ArgumentTypeError(f"unknown peers {unknown}: choose from {', '.join(ALL_PEERS)}")
    return peers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--peers",
        type=parse_peers,
        default="gptqmodel,llmcompressor,quantlm",
        help=f"comma-separated, run one after another in this order; from {', '.join(ALL_PEERS)} "
        "(fp32 = the unquantized reference) [%(default)s]",
    )
    p.add_argument(
        "--model", default="smollm2-135m", help="quantlm model source: alias, HF directory or .gguf [%(default)s]"
    )
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows [%(default)s]")
    p.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration window [%(default)s]")
    p.add_argument("--eval-windows", type=int, default=32, help="evaluation windows [%(default)s]")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="tokens per evaluation window [%(default)s]")
    p.add_argument("--bits", type=int, default=4, help="weight bits [%(default)s]")
    p.add_argument("--group-size", type=int, default=64, help="-1 = one scale per output channel [%(default)s]")
    p.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (the default)")
    p.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid")
    p.add_argument(
        "--damp",
        type=float,
        default=0.05,
        help="damping as a fraction of the mean Hessian diagonal [%(default)s, GPTQModel's]",
    )
    p.add_argument("--act-order", action="store_true", help="quantize columns by descending Hessian diagonal")
    p.add_argument(
        "--static-groups",
        action="store_true",
        help="group grids from the original weights (quantlm, GPTQModel; llm-compressor always does this)",
    )
    p.add_argument("--gptqmodel-gar", action="store_true", help="GPTQModel: keep its group-aware reordering (GAR)")
    p.add_argument(
        "--batch-size", type=int, default=1, help="calibration windows per forward pass, for every peer [%(default)s]"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch/OpenMP threads of every worker [all cores, as the protocol says]",
    )
    p.add_argument(
        "--quantlm-mode",
        choices=("memory", "streamed"),
        default="memory",
        help="quantlm: the whole model in memory like the peers, or streamed block by block into a "
        "checkpoint [%(default)s]",
    )
    p.add_argument("--gptqmodel-version", default=PEER_VERSIONS["gptqmodel"], help="[%(default)s]")
    p.add_argument("--llmcompressor-version", default=PEER_VERSIONS["llmcompressor"], help="[%(default)s]")
    p.add_argument("--skip-install", action="store_true", help="use the peers' venvs as they are; never pip install")
    p.add_argument("--venv-root", type=Path, default=None, help="[$QUANTLM_HOME/peer-venvs]")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        help="token files, jobs, per-peer results and logs [out/gptq_peers]",
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="writes OUT.md and OUT.json [benchmarks/results/gptq_peers]"
    )
    p.add_argument(
        "--keep-rows",
        action="store_true",
        help="keep the rows of OUT.json for peers not run now, if it has the same setting and tokens "
        "(each kept row says which run it is from)",
    )
    p.add_argument("--worker", choices=ALL_PEERS, help=argparse.SUPPRESS)
    p.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        sys.exit(run_worker(args.worker, args.job))
    if args.venv_root is None:
        from quantlm.paths import quantlm_home

        args.venv_root = quantlm_home() / "peer-venvs"
    run_benchmark(args)


if __name__ == "__main__":
    main()
