"""quantlm's GGUF exports in llama.cpp, beside llama.cpp's own quantizer, all scored by llama-perplexity in one run.

Rows (SmolLM2-135M): the float model as an F32 GGUF; quantlm RTN and GPTQ on the Q4_0 grid (W4 g32 sym), RTN on
Q8_0, and RTN and GPTQ on the Q4_K_M mix (``--target-format gguf-q4_k_m``), exported with ``quantlm export --format
gguf``; ``llama-quantize`` of the F32 GGUF to Q4_0 and Q4_K_M (without and with ``llama-imatrix`` on the calibration
split) and to Q8_0. The Q4_K_M files are checked to hold every tensor in the same type. Every GGUF keeps token_embd
in F32 (llama-quantize ``--token-embedding-type f32``), so only the Linears differ. For each: llama-perplexity (``-c
2048 --chunks 32``: the protocol's first 32 windows of the eval split as plain text; llama.cpp scores the second
half of each window), llama-bench's decode tokens/s (tg128, 2 threads), the file size; and quantlm's own perplexity
of the same weights scored the way llama-perplexity scores (the same 32 windows, second halves), quantlm reading the
GGUF itself for llama.cpp's rows. Target: llama.cpp and quantlm within 0.5% on every row.

llama.cpp is built from the source inside the llama-cpp-python sdist (``vendor/llama.cpp``; about 5-9 minutes on
2 cores, once), under $QUANTLM_HOME/llama.cpp.

    .venv/bin/python benchmarks/gguf_llama_cpp.py [--calib-samples 32] [--chunks 32] [--rows Q4_K_M --out ...]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

import quantlm
from peer_harness import REPO, log
from quantlm.api import Calibration, export, parse_recipe, quantize_to_checkpoint, target_recipe
from quantlm.data import load_text
from quantlm.hardware import describe_cpu
from quantlm.paths import quantlm_home

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
TOOLS = ("llama-perplexity", "llama-quantize", "llama-imatrix", "llama-bench")
CHECKPOINTS = {
    "quantlm RTN W4 g32 sym -> Q4_0": {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True},
    "quantlm GPTQ W4 g32 sym -> Q4_0": {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True},
    "quantlm GPTQ W4 g32 sym, MSE + Hessian clip -> Q4_0": {
        "method": "gptq",
        "bits": 4,
        "group_size": 32,
        "symmetric": True,
        "clip": "mse",
        "hessian_clip": True,
    },
    "quantlm RTN W8 g32 sym -> Q8_0": {"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True},
    # each Linear on the grid of the type llama-quantize's Q4_K_M gives it (quantize --target-format gguf-q4_k_m)
    "quantlm RTN -> Q4_K_M": {"method": "rtn", "target_format": "gguf-q4_k_m"},
    "quantlm GPTQ -> Q4_K_M": {"method": "gptq", "target_format": "gguf-q4_k_m"},
    "quantlm GPTQ, MSE + Hessian clip -> Q4_K_M": {
        "method": "gptq",
        "clip": "mse",
        "hessian_clip": True,
        "target_format": "gguf-q4_k_m",
    },
}
LLAMA_QUANTS = {
    "llama-quantize Q4_0": ("Q4_0", False),
    "llama-quantize Q4_0 + imatrix": ("Q4_0", True),
    "llama-quantize Q8_0": ("Q8_0", False),
    "llama-quantize Q4_K_M": ("Q4_K_M", False),
    "llama-quantize Q4_K_M + imatrix": ("Q4_K_M", True),
}


def run(command: list[str], log_file: Path) -> str:
    """Run a tool; its output (stdout and stderr) goes to ``log_file`` and is returned."""
    done = subprocess.run(command, capture_output=True, text=True)
    log_file.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed (exit {done.returncode}): see {log_file}")
    return done.stdout + done.stderr


def llama_cpp_tools(home: Path) -> Path:
    """The bin directory of llama.cpp's tools, built from the llama-cpp-python sdist once."""
    root = home / "llama.cpp" / LLAMA_CPP_PYTHON.split("==")[1]
    bin_dir = root / "build" / "bin"
    if all((bin_dir / tool).is_file() for tool in TOOLS):
        return bin_dir
    root.mkdir(parents=True, exist_ok=True)
    log(f"building llama.cpp's tools from the {LLAMA_CPP_PYTHON} sdist into {root} (minutes, once)")
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(root)]
    run([*pip, LLAMA_CPP_PYTHON], root / "download.log")
    (sdist,) = root.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(root, filter="data")
    source = next(root.glob("llama_cpp_python-*/vendor/llama.cpp"))
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
    run(["cmake", "-S", str(source), "-B", str(root / "build"), *flags], root / "configure.log")
    run(["cmake", "--build", str(root / "build"), "-j2", "--target", *TOOLS], root / "build.log")
    return bin_dir


def llama_perplexity(tools: Path, model: Path, text: Path, chunks: int, log_file: Path) -> float:
    out = run(
        [str(tools / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", "2048", "-b", "2048"]
        + ["--chunks", str(chunks), "-t", "2"],
        log_file,
    )
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out).group(1))


def llama_decode_speed(tools: Path, model: Path, log_file: Path) -> float:
    out = run([str(tools / "llama-bench"), "-m", str(model), "-p", "0", "-n", "128", "-t", "2", "-o", "json"], log_file)
    (entry,) = json.loads(out[out.index("[") : out.rindex("]") + 1])
    return float(entry["avg_ts"])


def tensor_types_agree(files: list[Path]) -> bool | None:
    """Whether the GGUF files hold every tensor in the same block type (None: fewer than two files)."""
    import gguf

    types = [{t.name: t.tensor_type.name for t in gguf.GGUFReader(str(f)).tensors} for f in files]
    return None if len(types) < 2 else all(t == types[0] for t in types[1:])


def quantlm_perplexity(source: Path | str, ids: torch.Tensor, chunks: int) -> float:
    """Perplexity as llama-perplexity computes it: consecutive windows of 2048, no BOS (SmolLM2's GGUF says
    add_bos false), each window's second half scored (logits at 1024..2046 predict tokens 1025..2047)."""
    model = quantlm.load(source, dtype="float32")
    n_ctx, first = 2048, 1024
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(chunks):
            window = ids[i * n_ctx : (i + 1) * n_ctx].unsqueeze(0)
            logp = torch.log_softmax(model(window).logits[0].float(), dim=-1)
            targets = window[0, first + 1 :]
            nll -= logp[first : n_ctx - 1].gather(1, targets.unsqueeze(1)).sum().item()
            count += targets.numel()
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gguf_llama_cpp_smollm2")
    parser.add_argument("--work", type=Path, default=quantlm_home() / "gguf-llama-cpp-work")
    parser.add_argument("--calib-samples", type=int, default=32, help="GPTQ calibration windows of 2048 tokens.")
    parser.add_argument("--chunks", type=int, default=32, help="Windows of 2048 tokens scored.")
    parser.add_argument("--rows", default="", help="Score only the rows whose name contains one of these (commas).")
    args = parser.parse_args()
    wanted = [w.strip() for w in args.rows.split(",") if w.strip()]

    def chosen(name: str) -> bool:
        return not wanted or any(w in name for w in wanted)

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    tools = llama_cpp_tools(quantlm_home())
    texts = {split: work / f"{split}.txt" for split in ("eval", "calibration")}
    for split, path in texts.items():
        path.write_text(load_text("enwiki", split))
    tokenizer = quantlm.load_tokenizer("smollm2-135m")
    ids = torch.tensor(tokenizer(texts["eval"].read_text(), add_special_tokens=False).input_ids)

    f32 = work / "float.f32.gguf"
    if not f32.is_file():
        export("smollm2-135m", f32, format="gguf", gguf_type="f32")
    rows = [{"row": "float (F32 GGUF)", "gguf": f32, "quantlm_source": "smollm2-135m"}]
    rows = [r for r in rows if chosen(r["row"])]
    for name, recipe in CHECKPOINTS.items():
        if not chosen(name):
            continue
        checkpoint = work / re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
        if not checkpoint.is_dir():
            log(f"quantizing: {name}")
            t0 = time.perf_counter()
            calibration = Calibration(n_samples=args.calib_samples, seqlen=2048)
            step = dict(recipe)
            target = step.pop("target_format", None)
            steps = parse_recipe([step])
            if target is not None:
                steps = target_recipe(steps, "smollm2-135m", target)
            quantize_to_checkpoint("smollm2-135m", steps, checkpoint, calibration=calibration, progress=False)
            log(f"{name}: {time.perf_counter() - t0:.0f}s")
        gguf_file = checkpoint.with_suffix(".gguf")
        gguf_file.unlink(missing_ok=True)  # this benchmark's own file, written again from the checkpoint
        export(checkpoint, gguf_file, format="gguf", gguf_type="f32")
        rows.append({"row": name, "gguf": gguf_file, "quantlm_source": checkpoint})
    imatrix = work / "imatrix.gguf"
    if not imatrix.is_file() and any(chosen(name) for name in LLAMA_QUANTS):
        log("llama-imatrix on the calibration split")
        run(
            [str(tools / "llama-imatrix"), "-m", str(f32), "-f", str(texts["calibration"]), "-c", "2048"]
            + ["--chunks", str(args.calib_samples), "-t", "2", "-o", str(imatrix)],
            work / "imatrix.log",
        )
    for name, (kind, with_imatrix) in LLAMA_QUANTS.items():
        if not chosen(name):
            continue
        target = work / f"llama-{kind}{'-imatrix' if with_imatrix else ''}.gguf"
        command = [str(tools / "llama-quantize"), "--token-embedding-type", "f32"]
        command += ["--imatrix", str(imatrix)] if with_imatrix else []
        run([*command, str(f32), str(target), kind, "2"], work / f"{target.stem}.quantize.log")
        rows.append({"row": name, "gguf": target, "quantlm_source": target})
    same_types = tensor_types_agree([r["gguf"] for r in rows if "Q4_K_M" in r["row"]])

    for row in rows:
        gguf_file = row.pop("gguf")
        stem = gguf_file.stem
        log(f"scoring {row['row']}")
        row["llama_ppl"] = llama_perplexity(tools, gguf_file, texts["eval"], args.chunks, work / f"{stem}.ppl.log")
        row["llama_decode_tok_s"] = llama_decode_speed(tools, gguf_file, work / f"{stem}.bench.log")
        row["gguf_mb"] = gguf_file.stat().st_size / 1e6
        row["quantlm_ppl"] = quantlm_perplexity(row.pop("quantlm_source"), ids, args.chunks)
        row["diff_pct"] = 100 * (row["llama_ppl"] / row["quantlm_ppl"] - 1)
        log(f"{row}")
    cpu = describe_cpu()
    lines = [
        f"# quantlm GGUF exports and llama.cpp's quantizer, SmolLM2-135M ({time.strftime('%Y-%m-%d')})",
        "",
        f"CPU: {cpu}; llama.cpp from {LLAMA_CPP_PYTHON} (vendor/llama.cpp), 2 threads. llama-perplexity -c 2048 "
        f"--chunks {args.chunks} on the protocol's enwiki eval split; GPTQ and llama-imatrix on the calibration "
        f"split ({args.calib_samples} windows of 2048). token_embd F32 in every file.",
        "",
        *(
            [f"Every Q4_K_M file holds each tensor in the type llama-quantize's Q4_K_M gives it: {same_types}.", ""]
            if same_types is not None
            else []
        ),
        "| row | llama.cpp ppl | quantlm ppl (same weights, windows) | difference | llama.cpp decode tok/s | GGUF MB |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['row']} | {r['llama_ppl']:.4f} | {r['quantlm_ppl']:.4f} | {r['diff_pct']:+.2f}% | "
            f"{r['llama_decode_tok_s']:.1f} | {r['gguf_mb']:.0f} |"
            for r in rows
        ),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"cpu": cpu, "chunks": args.chunks, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
