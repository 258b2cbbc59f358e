"""Exports of SmolLM2-135M loaded by the real clients: does each client compute the logits quantlm computes?

For each checkpoint (RTN W4 g64 sym and asym, RTN W8 per-channel, GPTQ W4 g64 asym with act-order, SmoothQuant
W8A8), export to each format that holds it, run each client on a fixed prompt in its own venv (the same venvs as
tests/test_export_clients.py, under $QUANTLM_HOME/client-venvs), and compare with quantlm's fp32 logits of the
checkpoint: max |difference| / max |logit| (target: <= 1e-3). Rows also show the clients' default CPU kernels,
which are not exact (reported, not a target).

    .venv/bin/python benchmarks/export_clients.py [--out benchmarks/results/export_clients_smollm2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import quantlm
from peer_harness import REPO, TORCH_PIN, ensure_venv, log, run_streamed, worker_env
from quantlm.api import Calibration, export, quantize_to_checkpoint
from quantlm.formats.native import load_checkpoint
from quantlm.hardware import describe_cpu
from quantlm.paths import quantlm_home

CLIENTS = {
    "compressed-tensors": [TORCH_PIN, "compressed-tensors==0.20.0", "transformers==5.25.0"],
    "gptqmodel": [TORCH_PIN, "gptqmodel==7.6.0", "optimum==2.3.0", "transformers==5.25.0"],
}
INSTALL_ENV = {"compressed-tensors": {}, "gptqmodel": {"BUILD_CUDA_EXT": "0"}}
SCRIPT = REPO / "tests" / "clients" / "logits.py"
PROMPT = "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure in"
CHECKPOINTS = {
    "RTN W4 g64 sym": {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True},
    "RTN W4 g64 asym": {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False},
    "RTN W8 per-channel sym": {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True},
    "GPTQ W4 g64 asym act-order": {
        "method": "gptq",
        "bits": 4,
        "group_size": 64,
        "symmetric": False,
        "act_order": True,
        "static_groups": False,
    },
    "SmoothQuant W8A8": [{"method": "smoothquant"}, {"method": "rtn", "bits": 8, "group_size": -1, "act_bits": 8}],
}
# (format, client venv, mode, label); which checkpoints a format holds is the exporter's to say
RUNS = [
    ("gptq", "gptqmodel", "gptqmodel-torch", "GPTQModel 7.6.0, torch kernel"),
    ("gptq", "gptqmodel", "transformers-gptq-torch", "transformers 5.25 GPTQ (GPTQModel), backend=torch"),
    ("gptq", "gptqmodel", "gptqmodel", "GPTQModel 7.6.0, default fp32 CPU kernel"),
    ("gptq", "gptqmodel", "transformers", "transformers 5.25 GPTQ, default kernel"),
    ("compressed-tensors", "compressed-tensors", "transformers", "transformers 5.25 + compressed-tensors 0.20.0"),
    ("compressed-tensors", "compressed-tensors", "transformers-dequantize", "same, run_compressed=False"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/export_clients_smollm2")
    parser.add_argument("--work", type=Path, default=quantlm_home() / "export-clients-work")
    parser.add_argument("--calib-samples", type=int, default=16, help="GPTQ calibration windows of 512 tokens.")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ids = quantlm.load_tokenizer("smollm2-135m")(PROMPT).input_ids
    jobs: dict[str, list[dict]] = {client: [] for client in CLIENTS}
    rows = []
    for name, recipe in CHECKPOINTS.items():
        path = args.work / name.replace(" ", "-")
        if not path.is_dir():
            log(f"quantizing {name}")
            calibration = Calibration(n_samples=args.calib_samples, seqlen=512)
            quantize_to_checkpoint("smollm2-135m", recipe, path, calibration=calibration, progress=False)
        with torch.no_grad():
            reference = load_checkpoint(path)(torch.tensor([ids])).logits
        for fmt, client, mode, label in RUNS:
            target = args.work / f"{path.name}.{fmt}"
            try:
                export(path, target, format=fmt, overwrite=True)
            except quantlm.QuantlmError as e:
                rows.append({"checkpoint": name, "format": fmt, "client": label, "result": f"refused: {e}"})
                continue
            out = args.work / f"{path.name}.{fmt}.{mode}.safetensors"
            for stale in (out, Path(f"{out}.error")):
                stale.unlink(missing_ok=True)
            jobs[client].append({"model": str(target), "mode": mode, "ids": ids, "out": str(out)})
            rows.append({"checkpoint": name, "format": fmt, "client": label, "out": str(out), "reference": reference})
    for client, client_jobs in jobs.items():
        root = quantlm_home() / "client-venvs"
        python, _ = ensure_venv(root / client, CLIENTS[client], logs=root / "logs", install_env=INSTALL_ENV[client])
        job_file = args.work / f"{client}-jobs.json"
        job_file.write_text(json.dumps(client_jobs))
        t0 = time.perf_counter()
        env = worker_env(2, {"GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"})
        command = [str(python), str(SCRIPT), str(job_file)]
        run = run_streamed(command, args.work / f"{client}.log", env=env, cwd=args.work)  # GPTQModel logs to its cwd
        log(f"{client}: {len(client_jobs)} loads in {time.perf_counter() - t0:.0f}s, rc {run['rc']}")
    for row in rows:
        if "out" not in row:
            continue
        reference = row.pop("reference")
        out = Path(row.pop("out"))
        error = Path(f"{out}.error")
        if not out.is_file():
            row["result"] = f"fails: {error.read_text().strip()}" if error.is_file() else "no output (see its log)"
            continue
        got = load_file(str(out))["logits"]
        rel = (got - reference).abs().max().item() / reference.abs().max().item()
        row["max_diff_rel"] = rel
        row["result"] = f"{rel:.1e} {'ok' if rel <= 1e-3 else 'over 1e-3'}"
    cpu = describe_cpu()
    lines = [
        f"# Exports of SmolLM2-135M in the real clients ({time.strftime('%Y-%m-%d')}, CPU: {cpu})",
        "",
        f"Prompt of {len(ids)} tokens; max |client logit - quantlm logit| / max |quantlm logit|, fp32 "
        "(target <= 1e-3).",
        "",
        "| checkpoint | format | client | result |",
        "|---|---|---|---|",
        *(f"| {r['checkpoint']} | {r['format']} | {r['client']} | {r['result']} |" for r in rows),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps({"cpu": cpu, "prompt_tokens": len(ids), "rows": rows}, indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
