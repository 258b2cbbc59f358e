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
- Every quantized model is scored by the same function (``peer_harness.perplexity_on_windows``, which
  calibration_free_peers.py uses too), in the peer's own process: each window runs once
  under ``torch.no_grad``, loss = cross entropy of logits[:-1] against ids[1:] summed over tokens, and
  ppl = exp(total / count). The table says in which dtype each model ran (GPTQModel has a float32 CPU kernel for
  4-bit only; other widths are scored in bfloat16).
- Each peer runs as a child process, so its peak RSS is its own (``os.wait4``).

Peers are never dependencies of quantlm: each one gets a throwaway virtualenv under
``$QUANTLM_HOME/peer-venvs/<peer>`` (torch==2.13.0 is installed first and stays pinned, so pip never pulls CUDA
packages), reused while its marker file matches the pinned versions. The peers' workers run this same file with
``--worker``; in that mode it imports neither quantlm nor anything outside the peer's venv. The venvs, the token
files, the scorer, the child processes and the report files are benchmarks/peer_harness.py's.

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
import json
import os
import platform
import shlex
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from peer_harness import (
    REPO,
    TORCH_PIN,
    PeerFailure,
    cell,
    cpu_info,
    cpu_line,
    ensure_venv,
    first_line,
    format_seconds,
    git_revision,
    kept_rows,
    load_fp32,
    log,
    package_versions,
    prepare_windows,
    quantized_module_types,
    run_job,
    run_worker,
    write_report_files,
)
from peer_harness import worker_env as harness_worker_env

DEFAULT_OUT = REPO / "benchmarks" / "results" / "gptq_peers"
DEFAULT_WORK_DIR = REPO / "out" / "gptq_peers"
PEER_VERSIONS = {"gptqmodel": "7.6.0", "llmcompressor": "0.14.0.1"}
# GPTQModel 7.6.0's setup.py builds no extension at install time (its kernels are compiled on first use);
# BUILD_CUDA_EXT=0 is the variable older releases read, kept so an older pin cannot start a CUDA build.
PEER_INSTALL_ENV = {"gptqmodel": {"BUILD_CUDA_EXT": "0"}, "llmcompressor": {}}
ALL_PEERS = ("fp32", "gptqmodel", "llmcompressor", "quantlm")
VENV_PEERS = ("gptqmodel", "llmcompressor")


# --------------------------------------------------------------------------------------------------------------
# Worker side: runs inside a peer's venv (or the project's venv for quantlm and fp32).


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


WORKERS = {
    "fp32": load_fp32,
    "gptqmodel": quantize_with_gptqmodel,
    "llmcompressor": quantize_with_llmcompressor,
    "quantlm": quantize_with_quantlm,
}


# --------------------------------------------------------------------------------------------------------------
# Orchestrator side: runs in the project's venv.


def worker_env(threads: int) -> dict[str, str]:
    """The environment for workers: ``threads`` for OpenMP and MKL, and GPTQModel's CPU worker pool.

    GPTQModel 7.6.0 sizes its "cpu" thread pool from GPTQMODEL_CPU_WORKERS (default: half the cores) and nests a
    "model_loader:cpu" pool of 2 workers inside it, which fails ("requests 2 workers but parent 'cpu' only has
    1") whenever the parent has fewer than 2: on a 2-core machine the variable must be set, to at least 2.
    """
    return harness_worker_env(threads, {"GPTQMODEL_CPU_WORKERS": str(max(2, threads))})


def peer_requirements(peer: str, args) -> list[str]:
    """What the peer's venv must hold, in install order: torch first, then the peer pinned with torch."""
    version = getattr(args, f"{peer}_version")
    return [TORCH_PIN, f"{peer}=={version}"]


def ensure_peer_venv(peer: str, args, work_dir: Path) -> tuple[Path, float | None]:
    """The python of the peer's venv, installing it first unless its marker matches; and the install time."""
    return ensure_venv(
        args.venv_root / peer,
        peer_requirements(peer, args),
        logs=work_dir / "logs",
        skip_install=args.skip_install,
        install_env=PEER_INSTALL_ENV[peer],
    )


def prepare_tokens(args, work_dir: Path) -> dict:
    """Compute the calibration and evaluation windows with quantlm's own code and save them for every peer."""
    return prepare_windows(
        args.model,
        work_dir,
        eval_windows=args.eval_windows,
        eval_seqlen=args.eval_seqlen,
        calibration=(args.calib_samples, args.calib_seqlen),
    )


def job_for(peer: str, args, tokens: dict) -> dict:
    """Everything a worker needs, as plain JSON."""
    return {
        "peer": peer,
        "model_dir": str(tokens["model_dir"]),
        "calib_path": str(tokens["calib_path"]),
        "eval_path": str(tokens["eval_path"]),
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
        log(f"{peer}: quantizing and scoring")
        job = job_for(peer, args, tokens)
        result = run_job(peer, peer, python, Path(__file__).resolve(), job, work_dir, worker_env(args.threads))
        row.update(total_s=result["total_s"], peak_rss_gb=result["peak_rss_gb"])
        if not result["ok"]:
            raise PeerFailure(result["error"])
        row.update(result)
        log(
            f"{peer}: ppl {result['ppl']:.3f}, quantize {format_seconds(result['quantize_s'])}, "
            f"total {result['total_s']:.1f}s, peak RSS {result['peak_rss_gb']:.2f} GB"
        )
    except (PeerFailure, OSError) as e:
        row.update(ok=False, error=str(e) if isinstance(e, PeerFailure) else f"{type(e).__name__}: {e}")
        log(f"{peer}: failed: {e}")
    return row


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
        *([f"CPU: {cpu_line(report['cpu'])}."] if report.get("cpu") else []),
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
    return kept_rows(rows, previous, "peer")


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
        "cpu": cpu_info(),
        "machine": platform.platform(),
        "rows": rows,
    }
    table = markdown_table(report)
    write_report_files(args.out, report, table)
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
        sys.exit(run_worker(args.worker, args.job, WORKERS))
    if args.venv_root is None:
        from quantlm.paths import quantlm_home

        args.venv_root = quantlm_home() / "peer-venvs"
    run_benchmark(args)


if __name__ == "__main__":
    main()
