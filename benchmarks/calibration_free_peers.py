"""Calibration-free weight quantization next to the libraries that introduced it: quantlm's RTN, HQQ, NF4, FP4 and
int8 rows against the hqq library (HQQ) and bitsandbytes (NF4, FP4, LLM.int8()), on one model, with the same
evaluation tokens and the same scorer, in one run.

What it measures, per row: the perplexity on the benchmark protocol's evaluation windows (docs/benchmarks.md) and
its ratio to the fp32 row; the wall time of the quantize call alone; the wall time of the whole worker process
(start-up, imports, load, quantize, save/reload where there is one, scoring); the process's peak resident set size;
the bits per weight of the decoder's Linears (quantlm: as written in its checkpoint; the peers: the tensors their
quantized modules hold in memory, lookup tables such as bitsandbytes' 16-entry codebooks left out); the size of
the checkpoint's weights (quantlm and the fp32 model; the peers are not saved, see below); and with ``--speed``
the decode (and prefill) tokens/s of quantlm's own measurement (``quantlm.eval.speed.measure_speed``: batch 1, a
128-token prompt, 128 greedy new tokens) for the fp32 and quantlm rows.

How it keeps the comparison fair (the machinery is benchmarks/peer_harness.py, shared with gptq_peers.py):
- The evaluation windows are cut once, by quantlm's own code, and saved to a file that every worker reads; each
  row reports a hash of the tokens it read (a row that read other tokens is marked failed).
- Every row loads the same fp32 Hugging Face directory, quantizes every Linear of the decoder blocks (the output
  projection, tied to the embeddings, stays fp32 everywhere) and runs in float32 on the CPU: hqq's HQQLinear with
  ``compute_dtype=float32``; bitsandbytes' Linear4bit with ``compute_dtype=float32`` and its AVX-512-BF16 fast path
  turned off (that path repacks the weights and multiplies in bfloat16; ``--bnb-cpu-path native`` keeps it).
  LLM.int8() is int8 x int8 by nature (bitsandbytes casts activations to fp16 before quantizing them and weights
  to fp16 before rounding them to int8); its row says so.
- One scorer for all (``peer_harness.perplexity_on_windows``, the one gptq_peers.py uses), in each row's own
  process: each window once under ``torch.no_grad``, cross entropy of logits[:-1] (fp32) against ids[1:].
- Each row is a child process, so its peak RSS is its own (``os.wait4``).
- quantlm rows quantize in memory (``quantlm.quantize`` on a loaded fp32 model: the timed call), then save the
  checkpoint (timed apart), load it back with ``quantlm.load`` (the kernels a user gets) and score that.
- The peers are scored in memory, never round-tripped through disk: bitsandbytes 0.50's checkpoint written after a
  CPU forward in fp32 is wrong, and hqq's serialization is not part of what is compared.
- The quantlm-llm-int8 row needs calibration windows (quantlm's LLM.int8() uses them only to report outlier counts):
  ``--calib-samples`` x ``--calib-seqlen`` from the enwiki calibration split (1 x 512 by default), so its quantize
  time includes one forward pass over them.

Peers are never dependencies of quantlm: each gets a throwaway virtualenv under ``$QUANTLM_HOME/peer-venvs/<peer>``
(torch==2.13.0 installed first and pinned on every later install, so pip never pulls CUDA packages; transformers
pinned to the project's version, so every row loads the model with the same code), reused while its marker file
matches the pins. hqq 0.2.8 is an sdist whose setup.py would try to build CUDA kernels: it is installed with
DISABLE_CUDA=1. The peers' workers run this same file with ``--worker``; in that mode it imports neither quantlm
nor anything outside the peer's venv.

Run (from the repository root, with the project's venv; progress goes to stderr):

    .venv/bin/python benchmarks/calibration_free_peers.py                   # every row, the protocol's 32 x 2048
    .venv/bin/python benchmarks/calibration_free_peers.py --speed           # and decode tok/s of fp32 + quantlm rows
    .venv/bin/python benchmarks/calibration_free_peers.py --rows fp32,quantlm --keep-rows   # rerun quantlm's rows
    .venv/bin/python benchmarks/calibration_free_peers.py --rows fp32,quantlm-rtn-w4g64,hqq-w4g64,bnb-nf4 \\
        --eval-windows 1 --eval-seqlen 128 --threads 1 --out /tmp/cfp --work-dir /tmp/cfp-work   # smoke test

``--rows`` takes row names and library names (fp32, quantlm, hqq, bitsandbytes: all of that library's rows);
``--list-rows`` prints them with the quantlm command line each quantlm row stands for. With ``--keep-rows`` the
rows of the previous OUT.json that were not rerun are kept (when it has the same model, tokens and threads).

How long (estimated from tiny runs, 1 x 128 tokens with --threads 1, on the 2-core AVX-512 machine this was written
on; nothing here was timed for real): a worker's start-up, load, quantize and save/reload take 8-16 s for the fp32,
RTN, NF4, FP4 and int8 rows of quantlm and bitsandbytes, 33-38 s for quantlm's HQQ rows and 41-52 s for the hqq
library's (both fit a grid per group iteratively); building the venvs took 46 s (hqq) and 62 s (bitsandbytes), mostly
downloads, once. Scoring 32 x 2048 tokens in fp32 takes about 2-3 min per row on 2 cores (the gptq_peers runs spent
about that on load plus scoring), somewhat more for the peers, which dequantize every Linear on every forward, and
for the LLM.int8() rows, which quantize the activations of every call. A full run of the 18 rows is therefore about
45-75 min; --speed adds about 0.5-1 min for each of the 11 fp32 and quantlm rows (prefill of 2048 tokens and 128
decoded tokens, each 3 timed runs after a warm-up, and a memory-bandwidth probe).

It writes benchmarks/results/calibration_free_peers.{md,json} (or ``--out``), again after every row, so a run that
is stopped keeps the rows it measured (the report names the rows still to run). A row that cannot be installed or
fails is recorded as ``failed: <reason>`` and the others still run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from peer_harness import (
    REPO,
    TORCH_PIN,
    PeerFailure,
    cell,
    cpu_info,
    cpu_line,
    decoder_linears,
    ensure_venv,
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
    set_module,
    worker_env,
    write_report_files,
)

DEFAULT_OUT = REPO / "benchmarks" / "results" / "calibration_free_peers"
DEFAULT_WORK_DIR = REPO / "out" / "calibration_free_peers"
PEER_VERSIONS = {"hqq": "0.2.8", "bitsandbytes": "0.50.2"}
# hqq 0.2.8's setup.py runs `python setup_cuda.py install` from egg_info unless DISABLE_CUDA=1
PEER_INSTALL_ENV = {"hqq": {"DISABLE_CUDA": "1"}, "bitsandbytes": {}}
LIBRARIES = ("fp32", "quantlm", "hqq", "bitsandbytes")


@dataclass(frozen=True)
class Row:
    """One row of the table: ``worker`` says which library runs it, ``params`` how."""

    name: str
    worker: str  # fp32 | quantlm | hqq | bitsandbytes
    method: str
    settings: str
    params: dict = field(default_factory=dict)


def quantlm_row(name: str, method: str, settings: str, options: dict, **extra) -> Row:
    """A quantlm row: ``options`` are the command line's settings (keys as in ``quantlm.methods.base.cli_settings``:
    bits, group_size, sym, double_quant, threshold), turned into a recipe by ``recipe_from_options`` as the CLI
    does."""
    return Row(name, "quantlm", method, settings, {"method": method, "options": options, **extra})


ROWS = [
    Row("fp32", "fp32", "fp32", "unquantized (the reference)"),
    quantlm_row("quantlm-rtn-w4g64", "rtn", "W4 g64 asym", {"bits": 4, "group_size": 64, "sym": False}),
    quantlm_row("quantlm-rtn-w3g64", "rtn", "W3 g64 asym", {"bits": 3, "group_size": 64, "sym": False}),
    quantlm_row("quantlm-hqq-w4g64", "hqq", "W4 g64", {"bits": 4, "group_size": 64}),
    Row("hqq-w4g64", "hqq", "HQQ", "W4 g64 axis=1", {"nbits": 4, "group_size": 64}),
    quantlm_row(
        "quantlm-hqq-w3g64", "hqq", "W3 g64 (integer zeros, the default below 4 bits)", {"bits": 3, "group_size": 64}
    ),
    quantlm_row(
        "quantlm-hqq-w3g64-float",
        "hqq",
        "W3 g64, float zeros (HQQ as published)",
        {"bits": 3, "group_size": 64, "zero_point": "float"},
    ),
    Row("hqq-w3g64", "hqq", "HQQ", "W3 g64 axis=1", {"nbits": 3, "group_size": 64}),
    quantlm_row("quantlm-hqq-w4g128", "hqq", "W4 g128", {"bits": 4, "group_size": 128}),
    Row("hqq-w4g128", "hqq", "HQQ", "W4 g128 axis=1", {"nbits": 4, "group_size": 128}),
    quantlm_row("quantlm-nf4-dq", "nf4", "block 64, double quant", {"group_size": 64, "double_quant": True}),
    Row(
        "bnb-nf4-dq",
        "bitsandbytes",
        "NF4",
        "block 64, double quant",
        {"kind": "4bit", "quant_type": "nf4", "blocksize": 64, "double_quant": True},
    ),
    quantlm_row("quantlm-nf4", "nf4", "block 64", {"group_size": 64, "double_quant": False}),
    Row(
        "bnb-nf4",
        "bitsandbytes",
        "NF4",
        "block 64",
        {"kind": "4bit", "quant_type": "nf4", "blocksize": 64, "double_quant": False},
    ),
    quantlm_row("quantlm-fp4", "fp4", "block 64", {"group_size": 64, "double_quant": False}),
    Row(
        "bnb-fp4",
        "bitsandbytes",
        "FP4",
        "block 64",
        {"kind": "4bit", "quant_type": "fp4", "blocksize": 64, "double_quant": False},
    ),
    quantlm_row("quantlm-int8-weight-only", "int8-weight-only", "int8 per-channel sym, weight-only", {}),
    quantlm_row(
        "quantlm-llm-int8", "llm-int8", "int8 per-channel, outliers abs(x)>=6", {"threshold": 6.0}, calibration=True
    ),
    Row("bnb-llm-int8", "bitsandbytes", "LLM.int8()", "threshold 6", {"kind": "int8", "threshold": 6.0}),
]
ROWS_BY_NAME = {r.name: r for r in ROWS}
# the command line's flag for each option key of quantlm_row (what the lead's CLI must accept)
OPTION_FLAGS = {
    "bits": "--bits",
    "group_size": "--group-size",
    "threshold": "--threshold",
    "zero_point": "--zero-point",
}


def quantlm_cli(row: Row, model: str = "smollm2-135m") -> str:
    """The `quantlm quantize` command a quantlm row stands for."""
    parts = ["quantlm", "quantize", model, "--method", row.params["method"]]
    for key, value in row.params["options"].items():
        if key == "sym":
            parts.append("--sym" if value else "--asym")
        elif key == "double_quant":
            parts += ["--double-quant"] if value else []
        else:
            parts += [OPTION_FLAGS[key], f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join([*parts, "--out", "OUT"])


# --------------------------------------------------------------------------------------------------------------
# Worker side: runs inside a peer's venv (or the project's venv for quantlm and fp32).


def tree_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    """Bytes of the files under ``path`` that match ``pattern``."""
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


def safetensors_sizes(path: Path) -> dict[str, int]:
    """{tensor name: bytes} of every *.safetensors file under ``path``, read from the files' headers (the format: an
    8-byte little-endian header length, then a JSON header with each tensor's data offsets)."""
    sizes: dict[str, int] = {}
    for file in sorted(Path(path).rglob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for key, info in header.items():
            if key != "__metadata__":
                start, end = info["data_offsets"]
                sizes[key] = end - start
    return sizes


def bits_per_weight(module_bytes: dict[str, int], weights: dict[str, int]) -> float | None:
    """8 x (bytes held for the modules) / (their weights): the storage cost of the decoder's Linears per weight."""
    n = sum(weights.values())
    return 8 * sum(module_bytes.values()) / n if n else None


def checkpoint_module_bytes(path: Path, weights: dict[str, int]) -> dict[str, int]:
    """{module name: bytes of its tensors in the checkpoint at ``path``} for the modules of ``weights``."""
    sizes = safetensors_sizes(path)
    return {name: sum(b for key, b in sizes.items() if key.startswith(name + ".")) for name in weights}


def size_fields(module_bytes: dict[str, int], weights: dict[str, int]) -> dict:
    return {"bits_per_weight": bits_per_weight(module_bytes, weights), "quantized_weights": sum(weights.values())}


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def float_model(job: dict):
    """The fp32 HF model and its load time."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    return model, time.perf_counter() - t0


def linear_weights(model) -> dict[str, int]:
    """{name: in_features x out_features} of the decoder's Linears (those every row quantizes)."""
    return {name: m.in_features * m.out_features for name, m in decoder_linears(model).items()}


def speed_hook(job: dict):
    """With --speed: a function that measures the model's prefill and decode speed with quantlm's own measurement
    (a failure is recorded in the row, not raised); else None."""
    if not job.get("speed"):
        return None

    def measure(model) -> dict:
        try:
            from quantlm.eval.speed import measure_speed
            from quantlm.models.sources import load_tokenizer

            log(f"{job['name']}: measuring speed")
            report = measure_speed(model, load_tokenizer(job["model_dir"]), **job["speed"])
            keep = ("prefill_tokens", "prefill_tok_s", "prefill_runs", "decode_prompt", "decode_tokens")
            keep += ("decode_tok_s", "decode_runs", "bandwidth_gb_s", "decode_bound_tok_s", "dtype", "threads")
            return {"speed": {k: v for k, v in report.to_dict().items() if k in keep}}
        except Exception as e:  # the row's quality figures stand without it
            return {"speed_error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}

    return measure


def run_fp32(job: dict, calib) -> dict:
    """The unquantized model (the reference row), with its checkpoint's size and, with --speed, its speed."""
    outcome = load_fp32(job, calib)
    weights = linear_weights(outcome["model"])
    module_bytes = checkpoint_module_bytes(Path(job["model_dir"]), weights)
    outcome["extra"] = {
        "checkpoint_bytes": tree_bytes(Path(job["model_dir"])),
        "bits_per_weight": bits_per_weight(module_bytes, weights),
        "quantized_weights": sum(weights.values()),
    }
    outcome["after_scoring"] = speed_hook(job)
    return outcome


def quantize_with_quantlm(job: dict, calib) -> dict:
    """quantlm: ``quantlm.quantize`` on the loaded fp32 model (timed), the checkpoint saved (timed apart), loaded
    back with ``quantlm.load`` and scored; bits per weight as the checkpoint stores them."""
    import quantlm
    from quantlm.methods.recipe import recipe_from_options
    from quantlm.nn.inference import kernel_summary

    params = job["params"]
    recipe = recipe_from_options(params["method"], params["options"])
    t0 = time.perf_counter()
    model = quantlm.load(job["model_dir"])
    load_s = time.perf_counter() - t0
    weights = linear_weights(model)
    t0 = time.perf_counter()
    quantlm.quantize(model, recipe, calib if recipe.needs_calibration else None, batch_size=1, progress=False)
    quantize_s = time.perf_counter() - t0
    checkpoint = Path(job["work_dir"]) / f"checkpoint-{job['name']}"
    shutil.rmtree(checkpoint, ignore_errors=True)
    t0 = time.perf_counter()
    quantlm.save(model, checkpoint)
    save_s = time.perf_counter() - t0
    del model
    gc.collect()
    t0 = time.perf_counter()
    model = quantlm.load(checkpoint)
    reload_s = time.perf_counter() - t0
    module_bytes = checkpoint_module_bytes(checkpoint, weights)
    return {
        "model": model.eval(),
        "load_s": load_s,
        "quantize_s": quantize_s,
        "versions": {"quantlm": quantlm.__version__, **package_versions("torch", "transformers")},
        "settings": {
            "recipe": recipe.describe(),
            "save_s": round(save_s, 1),
            "reload_s": round(reload_s, 1),
            "module": quantized_module_types(model),
            "kernels": kernel_summary(getattr(model, "quantlm_kernels", None) or {}),
        },
        "extra": {
            "recipe": recipe.to_config(),
            "checkpoint_bytes": tree_bytes(checkpoint),
            "bits_per_weight": bits_per_weight(module_bytes, weights),
            "quantized_weights": sum(weights.values()),
        },
        "after_scoring": speed_hook(job),
    }


def quantize_with_hqq(job: dict, calib) -> dict:
    """hqq: every Linear of the decoder blocks replaced by an ``HQQLinear`` (``BaseQuantizeConfig(nbits, group_size,
    axis=1)``, the library's defaults otherwise: its half-quadratic optimizer on, zero points rounded at 4 bits),
    computing in fp32 on the CPU with the PYTORCH backend (dequantize, then matmul). The timed part is the loop that
    builds them. Scale and zero are held in the compute dtype (fp32), which the bits per weight count."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    params = job["params"]
    model, load_s = float_model(job)
    linears = decoder_linears(model)
    weights = linear_weights(model)
    config = BaseQuantizeConfig(nbits=params["nbits"], group_size=params["group_size"], axis=1)
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    t0 = time.perf_counter()
    for name, linear in linears.items():
        set_module(model, name, HQQLinear(linear, config, del_orig=True, compute_dtype=torch.float32, device="cpu"))
    quantize_s = time.perf_counter() - t0
    module_bytes = {}
    for name in weights:
        layer = model.get_submodule(name)
        meta_tensors = [v for v in layer.meta.values() if isinstance(v, torch.Tensor)]
        module_bytes[name] = tensor_bytes(layer.W_q, layer.bias, *meta_tensors)
    first = model.get_submodule(next(iter(weights)))
    return {
        "model": model,
        "load_s": load_s,
        "quantize_s": quantize_s,
        "versions": package_versions("hqq", "torch", "transformers"),
        "eval_dtype": "float32",
        "settings": {
            "weight_quant_params": {k: v for k, v in config["weight_quant_params"].items() if k != "view_as_float"},
            "packing": first.meta.get("packing"),
            "meta_dtype": str(first.meta["scale"].dtype).removeprefix("torch."),
            "backend": "PYTORCH",
            "module": quantized_module_types(model),
        },
        "extra": {
            "bits_per_weight": bits_per_weight(module_bytes, weights),
            "quantized_weights": sum(weights.values()),
        },
    }


def quantize_with_bitsandbytes(job: dict, calib) -> dict:
    """bitsandbytes: every Linear of the decoder blocks replaced by a ``Linear4bit`` (NF4/FP4, blocksize 64,
    ``compress_statistics`` = double quant, uint8 storage, ``compute_dtype=float32``) or a ``Linear8bitLt``
    (LLM.int8(): ``has_fp16_weights=False``, outlier threshold), quantized in memory on the CPU by moving its
    weight to the CPU (``Params4bit.to`` / ``Int8Params.to``, as transformers' loader does). The timed part is the
    loop that builds them.

    On CPUs with AVX-512 BF16, Linear4bit's forward repacks its weight on first use and then multiplies in
    bfloat16 (absmax in bf16 too); unless ``--bnb-cpu-path native``, that path is turned off so the layer
    dequantizes to fp32 and runs ``F.linear`` in fp32, like every other row. LLM.int8() casts weights (when
    quantizing) and activations (on every call) to fp16 before rounding them to int8; outlier columns are
    multiplied in fp16.
    """
    import logging

    import bitsandbytes as bnb
    import torch

    params = job["params"]
    native = job["bnb_cpu_path"] == "native"
    model, load_s = float_model(job)
    linears = decoder_linears(model)
    weights = linear_weights(model)
    t0 = time.perf_counter()
    for name, linear in linears.items():
        bias = linear.bias is not None
        if params["kind"] == "4bit":
            layer = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=bias,
                compute_dtype=torch.float32,
                compress_statistics=params["double_quant"],
                quant_type=params["quant_type"],
                quant_storage=torch.uint8,
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(
                linear.weight.data,
                requires_grad=False,
                blocksize=params["blocksize"],
                compress_statistics=params["double_quant"],
                quant_type=params["quant_type"],
                quant_storage=torch.uint8,
                module=layer,
            ).to("cpu")
            if not native:
                layer.support_avx512bf16_for_cpu = False
        else:
            layer = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias=bias,
                has_fp16_weights=False,
                threshold=params["threshold"],
                device="meta",
            )
            layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False).to("cpu")
        if bias:
            layer.bias = linear.bias
        set_module(model, name, layer)
    quantize_s = time.perf_counter() - t0
    # "MatMul8bitLt: inputs will be cast from torch.float32 to float16" is logged on every call
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    module_bytes = {}
    for name in weights:
        layer = model.get_submodule(name)
        if params["kind"] == "4bit":
            state = layer.weight.quant_state
            nested = [state.offset, state.state2.absmax] if state.nested else []
            module_bytes[name] = tensor_bytes(layer.weight.data, state.absmax, *nested, layer.bias)
        else:
            module_bytes[name] = tensor_bytes(layer.weight.data, layer.weight.SCB, layer.bias)
    if params["kind"] == "4bit":
        settings = {
            "quant_type": params["quant_type"],
            "blocksize": params["blocksize"],
            "compress_statistics": params["double_quant"],
            "compute_dtype": "float32",
            "cpu_path": "native (AVX-512 BF16 repack, bf16 matmul)"
            if native and bnb.functional.has_avx512bf16()
            else "dequantize to fp32 + F.linear",
        }
        eval_dtype = "bfloat16" if native and bnb.functional.has_avx512bf16() else "float32"
    else:
        settings = {"threshold": params["threshold"], "weights": "int8 per row (rounded from fp16)"}
        eval_dtype = "int8 (fp16 activations and outliers)"
    settings["module"] = quantized_module_types(model)
    return {
        "model": model,
        "load_s": load_s,
        "quantize_s": quantize_s,
        "versions": package_versions("bitsandbytes", "torch", "transformers"),
        "eval_dtype": eval_dtype,
        "settings": settings,
        "extra": {
            "bits_per_weight": bits_per_weight(module_bytes, weights),
            "quantized_weights": sum(weights.values()),
        },
    }


WORKERS = {
    "fp32": run_fp32,
    "quantlm": quantize_with_quantlm,
    "hqq": quantize_with_hqq,
    "bitsandbytes": quantize_with_bitsandbytes,
}


# --------------------------------------------------------------------------------------------------------------
# Orchestrator side: runs in the project's venv.


def peer_requirements(peer: str, args) -> list[str]:
    """What the peer's venv must hold, in install order: torch first, then the peer and transformers (the project's
    version, so every row loads the model with the same code), torch pinned again."""
    return [TORCH_PIN, f"{peer}=={getattr(args, f'{peer}_version')}", f"transformers=={args.peer_transformers}"]


def job_for(row: Row, args, tokens: dict) -> dict:
    """Everything a worker needs, as plain JSON."""
    job = {
        "row": row.name,
        "model_dir": str(tokens["model_dir"]),
        "eval_path": str(tokens["eval_path"]),
        "params": row.params,
        "threads": args.threads,
        "bnb_cpu_path": args.bnb_cpu_path,
        "speed": None,
    }
    if row.params.get("calibration"):
        job["calib_path"] = str(tokens["calib_path"])
    if args.speed and row.worker in ("fp32", "quantlm"):
        job["speed"] = {
            "prefill_tokens": args.prefill_tokens,
            "decode_prompt": args.decode_prompt,
            "decode_tokens": args.decode_tokens,
            "repeats": args.speed_repeats,
        }
    return job


def run_row(row: Row, args, tokens: dict, work_dir: Path) -> dict:
    """Install the row's peer if needed and run the row in its own process; a row for the table, failures included."""
    record: dict = {"row": row.name, "library": row.worker, "method": row.method, "settings_label": row.settings}
    record["install_s"] = None
    if row.worker == "quantlm":
        record["cli"] = quantlm_cli(row, args.model)
    try:
        if row.worker in PEER_VERSIONS:
            record["pinned"] = getattr(args, f"{row.worker}_version")
            python, record["install_s"] = ensure_venv(
                args.venv_root / row.worker,
                peer_requirements(row.worker, args),
                logs=work_dir / "logs",
                skip_install=args.skip_install,
                install_env=PEER_INSTALL_ENV[row.worker],
            )
        else:
            python = Path(sys.executable)
        job = job_for(row, args, tokens)
        env = worker_env(args.threads, {"HF_HUB_OFFLINE": "1"})  # nothing is fetched from a hub at run time
        result = run_job(row.name, row.worker, python, Path(__file__).resolve(), job, work_dir, env)
        record.update(result)
        if not result["ok"]:
            raise PeerFailure(result["error"])
        log(
            f"{row.name}: ppl {result['ppl']:.3f}, quantize {format_seconds(result['quantize_s'])}, "
            f"total {result['total_s']:.1f}s, peak RSS {result['peak_rss_gb']:.2f} GB"
        )
    except (PeerFailure, OSError) as e:
        record.update(ok=False, error=str(e) if isinstance(e, PeerFailure) else f"{type(e).__name__}: {e}")
        log(f"{row.name}: failed: {record['error']}")
    return record


def row_version(record: dict) -> str:
    """The version of the library that ran the row: reported by the worker, else the pin."""
    name = {"fp32": "torch"}.get(record["library"], record["library"])
    return (record.get("versions") or {}).get(name) or record.get("pinned") or "-"


def notes(record: dict) -> str:
    settings = dict(record.get("settings") or {})
    for key in ("module",):
        settings.pop(key, None)
    parts = [f"{k}={v}" for k, v in settings.items()]
    if record.get("speed_error"):
        parts.append(f"speed failed: {record['speed_error']}")
    if record.get("kept_from"):
        parts.insert(0, f"**kept from the run of {record['kept_from']['date']} at {record['kept_from']['git']}**")
    return "; ".join(parts)


def table_row(cells: list) -> str:
    """One markdown table row; a '|' inside a cell (an error message, a setting) is escaped."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def markdown_table(report: dict) -> str:
    """The results as markdown: a header on the setup, one row per row, then the quantlm commands."""
    rows = report["rows"]
    fp = next((r for r in rows if r["row"] == "fp32" and r.get("ok")), None)
    evaluation = report["evaluation"]
    lines = [
        f"Calibration-free quantization on `{report['model']}`: quantlm next to hqq and bitsandbytes, every Linear "
        "of the decoder blocks quantized (the tied output projection stays fp32), every model scored in float32 "
        "on the CPU unless its dtype column says otherwise, by one scorer.",
        f"Evaluation: {evaluation['windows']} x {evaluation['seqlen']} tokens (enwiki eval split, digest "
        f"{evaluation['digest']}); {report['args']['threads']} threads per worker.",
        f"CPU: {report['cpu_line']}; {report['machine']}.",
    ]
    if report.get("calibration"):
        calib = report["calibration"]
        lines.append(
            f"Calibration (quantlm-llm-int8 only, for its outlier report): {calib['n_samples']} x {calib['seqlen']} "
            f"tokens (enwiki calibration split, seed {calib['seed']}, digest {calib['digest']})."
        )
    lines += [
        "",
        "| row | library | version | method | settings | perplexity | vs fp32 | quantize | total | peak RSS (GB) "
        "| checkpoint (MB) | bits/weight | decode tok/s | dtype | eval digest | install | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = [r["row"], r["library"], row_version(r), r["method"], r["settings_label"]]
        install = format_seconds(r.get("install_s"))
        if not r.get("ok"):
            total, rss = format_seconds(r.get("total_s")), cell(r.get("peak_rss_gb"), ".2f")
            lines.append(table_row([*head, f"failed: {r['error']}", "-", "-", total, rss, *["-"] * 5, install, ""]))
            continue
        size = r.get("checkpoint_bytes")
        measured = [
            f"{r['ppl']:.3f}",
            f"{r['ppl'] / fp['ppl']:.3f}x" if fp else "-",
            format_seconds(r["quantize_s"]),
            format_seconds(r["total_s"]),
            f"{r['peak_rss_gb']:.2f}",
            cell(None if size is None else size / 1e6, ".1f"),
            cell(r.get("bits_per_weight"), ".3f"),
            cell((r.get("speed") or {}).get("decode_tok_s"), ".1f"),
            r["eval_dtype"],
            r["eval_digest"],
        ]
        lines.append(table_row([*head, *measured, install, notes(r)]))
    speed = report["args"]
    lines += [
        "",
        "quantize: the quantize call alone (quantlm: `quantlm.quantize` on the loaded model; peers: the loop that "
        "replaces the Linears); total: the whole worker process (start-up, imports, load, quantize, quantlm's save "
        "and reload, scoring, and --speed where measured); peak RSS: that process's maximum resident set size; "
        "checkpoint: bytes of the *.safetensors written (quantlm; fp32: the model directory's; the peers are scored "
        "in memory and not saved); bits/weight: storage of the decoder's Linears per weight (quantlm: as in its "
        "checkpoint; peers: the tensors their modules hold, lookup tables excluded); decode tok/s: "
        f"`quantlm.eval.speed.measure_speed` (batch 1, {speed['decode_prompt']}-token prompt, "
        f"{speed['decode_tokens']} greedy new tokens, median of {speed['speed_repeats']} timed runs after a warm-up), "
        "for the fp32 and quantlm rows with --speed; install: time to build the peer's venv in this run (- "
        "when reused). Single run: see docs/benchmarks.md on timing noise.",
    ]
    commands = [r for r in rows if r.get("cli")]
    if commands:
        lines += ["", "The quantlm rows as commands (the same settings through `recipe_from_options`):", ""]
        lines += [f"- {r['row']}: `{r['cli']}`" for r in commands]
    lines += [
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
    """Every row must have read the very tokens this script wrote."""
    for r in rows:
        if r.get("ok") and r.get("eval_digest") != tokens["evaluation"]["digest"]:
            r.update(ok=False, error="read different evaluation tokens than were written")


def with_kept_rows(rows: list[dict], args, tokens: dict) -> list[dict]:
    """``rows`` plus the rows of the previous report at ``args.out`` not run now, when it is for the same model and
    threads and read the same evaluation tokens."""
    path = args.out.with_suffix(".json")
    if not path.is_file():
        return rows
    previous = json.loads(path.read_text())
    same = (
        all(previous["args"].get(k) == getattr(args, k) for k in ("model", "threads"))
        and previous["evaluation"]["digest"] == tokens["evaluation"]["digest"]
    )
    if not same:
        log(f"--keep-rows: {path} is for another model, thread count or other tokens; keeping none of its rows")
        return rows
    order = {name: i for i, name in enumerate(ROWS_BY_NAME)}
    return sorted(kept_rows(rows, previous, "row"), key=lambda r: order.get(r["row"], len(order)))


def write_report(args, tokens: dict, rows: list[dict], started: str, pending: list[str], cpu: dict) -> str:
    """Write OUT.json and OUT.md for the rows measured so far; ``pending``: the rows of this run not run yet."""
    import quantlm

    check_consistency(rows, tokens)
    if args.keep_rows:
        rows = with_kept_rows(rows, args, tokens)
    report = {
        "model": args.model,
        "model_dir": str(tokens["model_dir"]),
        "evaluation": tokens["evaluation"],
        "calibration": tokens.get("calibration"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "command": shlex.join([os.path.relpath(sys.executable, REPO), *sys.argv]),
        "quantlm_version": quantlm.__version__,
        "git": git_revision(),
        "started": started,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "pending": list(pending),
        "cpu": cpu,
        "cpu_line": cpu_line(cpu),
        "machine": platform.platform(),
        "rows": rows,
    }
    table = markdown_table(report)
    write_report_files(args.out, report, table)
    log(
        f"wrote {args.out.with_suffix('.md')} and .json" + (f" (still to run: {', '.join(pending)})" if pending else "")
    )
    return table


def run_benchmark(args) -> None:
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    rows = [ROWS_BY_NAME[name] for name in args.rows]
    calibration = (args.calib_samples, args.calib_seqlen) if any(r.params.get("calibration") for r in rows) else None
    log(f"tokenizing: evaluation {args.eval_windows} x {args.eval_seqlen}")
    tokens = prepare_windows(
        args.model, work_dir, eval_windows=args.eval_windows, eval_seqlen=args.eval_seqlen, calibration=calibration
    )
    cpu = cpu_info()
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    records: list[dict] = []
    table = ""
    for row in rows:
        records.append(run_row(row, args, tokens, work_dir))
        # after every row: a run stopped later still leaves the rows it measured (and says which are missing)
        table = write_report(args, tokens, records, started, [r.name for r in rows[len(records) :]], cpu)
    print(table, end="")


def parse_rows(text: str) -> list[str]:
    """Row names and library names (all of that library's rows), in the order given, each row once."""
    names: list[str] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if token in ROWS_BY_NAME:
            chosen = [token]
        elif token in LIBRARIES:
            chosen = [r.name for r in ROWS if r.worker == token]
        else:
            raise argparse.ArgumentTypeError(
                f"unknown row {token!r}: choose from {', '.join(LIBRARIES)} (libraries) or "
                f"{', '.join(ROWS_BY_NAME)} (see --list-rows)"
            )
        names += [n for n in chosen if n not in names]
    if not names:
        raise argparse.ArgumentTypeError("no rows given")
    return names


def list_rows() -> str:
    lines = []
    for r in ROWS:
        how = quantlm_cli(r) if r.worker == "quantlm" else json.dumps(r.params) if r.params else ""
        lines.append(f"{r.name:26} {r.worker:13} {r.method} {r.settings}" + (f"\n{'':41}{how}" if how else ""))
    return "\n".join(lines)


def project_transformers() -> str:
    import importlib.metadata

    return importlib.metadata.version("transformers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rows",
        type=parse_rows,
        default=",".join(r.name for r in ROWS),
        help=f"comma-separated rows or libraries ({', '.join(LIBRARIES)}), run in this order [all; see --list-rows]",
    )
    p.add_argument("--list-rows", action="store_true", help="print the rows (and quantlm's commands) and exit")
    p.add_argument(
        "--model", default="smollm2-135m", help="quantlm model source: alias, HF directory or .gguf [%(default)s]"
    )
    p.add_argument("--eval-windows", type=int, default=32, help="evaluation windows [%(default)s]")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="tokens per evaluation window [%(default)s]")
    p.add_argument("--calib-samples", type=int, default=1, help="quantlm-llm-int8's calibration windows [%(default)s]")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window [%(default)s]")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch/OpenMP threads of every worker [all cores, as the protocol says]",
    )
    p.add_argument(
        "--speed", action="store_true", help="also measure prefill and decode tok/s of the fp32 and quantlm rows"
    )
    p.add_argument("--speed-repeats", type=int, default=3, help="timed runs after a warm-up, with --speed [3]")
    p.add_argument("--prefill-tokens", type=int, default=2048, help="with --speed [%(default)s]")
    p.add_argument("--decode-prompt", type=int, default=128, help="with --speed [%(default)s]")
    p.add_argument("--decode-tokens", type=int, default=128, help="with --speed [%(default)s]")
    p.add_argument(
        "--bnb-cpu-path",
        choices=("fp32", "native"),
        default="fp32",
        help="bitsandbytes 4-bit: dequantize and multiply in fp32, or keep its AVX-512-BF16 path (bf16 matmul) "
        "[%(default)s]",
    )
    p.add_argument("--hqq-version", default=PEER_VERSIONS["hqq"], help="[%(default)s]")
    p.add_argument("--bitsandbytes-version", default=PEER_VERSIONS["bitsandbytes"], help="[%(default)s]")
    p.add_argument("--peer-transformers", default=None, help="transformers in the peers' venvs [the project's]")
    p.add_argument("--skip-install", action="store_true", help="use the peers' venvs as they are; never pip install")
    p.add_argument("--venv-root", type=Path, default=None, help="[$QUANTLM_HOME/peer-venvs]")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        help="token files, jobs, checkpoints, per-row results and logs [out/calibration_free_peers]",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="writes OUT.md and OUT.json [benchmarks/results/calibration_free_peers]",
    )
    p.add_argument(
        "--keep-rows",
        action="store_true",
        help="keep the rows of OUT.json not run now, if it is for the same model, tokens and threads "
        "(each kept row says which run it is from)",
    )
    p.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if isinstance(args.rows, str):  # the default goes through type= as well, but be explicit
        args.rows = parse_rows(args.rows)
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        sys.exit(run_worker(args.worker, args.job, WORKERS))
    if args.list_rows:
        print(list_rows())
        return
    if args.venv_root is None:
        from quantlm.paths import quantlm_home

        args.venv_root = quantlm_home() / "peer-venvs"
    if args.peer_transformers is None:
        args.peer_transformers = project_transformers()
    run_benchmark(args)


if __name__ == "__main__":
    main()
