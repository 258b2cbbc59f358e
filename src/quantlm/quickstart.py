"""The main job of a fresh checkout: quantize the bundled default model with the best recipe, measure it.

Prints a table: method, bits, group size, model size, perplexity and time, for the full-precision model and the
quantized one, and the command that reproduces the quantized row. Two presets of the same recipe: ``fast`` (the
default: a first result within minutes on 2 CPU cores) calibrates on fewer windows and scores fewer; ``full`` is
the benchmark protocol's 128 x 2048 calibration and 32 x 2048 evaluation. The full-precision perplexity is cached
(it depends only on the model, the windows and the dtype).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from quantlm import api
from quantlm._version import __version__
from quantlm.core import QuantSpec
from quantlm.methods import GPTQ
from quantlm.models.sources import DEFAULT_MODEL, resolve_model_dir
from quantlm.paths import atomic_write_text, quantlm_home


@dataclass(frozen=True)
class Preset:
    name: str
    calib_samples: int  # calibration windows of 2048 tokens
    max_windows: int  # evaluation windows of 2048 tokens
    note: str


PRESETS = {
    p.name: p
    for p in (
        Preset("fast", 16, 8, "a first result in about 5 minutes on 2 CPU cores"),
        Preset("full", 128, 32, "about 30 minutes on 2 CPU cores"),
    )
}


def best_recipe() -> list:
    """The project's best recipe for 4-bit weights today: GPTQ W4 g64 asymmetric with the default options."""
    return [GPTQ(QuantSpec(bits=4, group_size=64, symmetric=False))]


def recipe_command(model: str, out: str | Path, calib_samples: int) -> str:
    """The ``quantlm quantize`` command line that makes the quickstart's checkpoint."""
    (step,) = best_recipe()
    spec = step.spec
    grid = f"--bits {spec.bits} --group-size {spec.group_size} {'--sym' if spec.symmetric else '--asym'}"
    return f"quantlm quantize {model} --method {step.name} {grid} --calib-samples {calib_samples} --out {out}"


def _stage(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Row:
    method: str
    bits: str
    group_size: str
    size_mb: float
    ppl: float
    quantize_s: float
    eval_s: float
    dtype: str = ""  # the compute dtype perplexity was measured in


def dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.suffix == ".safetensors") / 1e6


def _evaluate(model_source, max_windows: int, seqlen: int, dtype) -> dict:
    model = api.load(model_source, dtype=dtype)
    tokenizer = api.load_tokenizer(model_source)
    t0 = time.perf_counter()
    result = api.evaluate(model, tokenizer=tokenizer, seqlen=seqlen, max_windows=max_windows)
    return {"ppl": result.ppl, "eval_s": time.perf_counter() - t0}


def _cached_fp_eval(model_dir: Path, max_windows: int, seqlen: int, dtype) -> dict:
    key = f"{model_dir.resolve()}|enwiki|eval|{seqlen}|{max_windows}|{dtype}|{__version__}"
    cache = quantlm_home() / "evals" / f"fp-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    data = _evaluate(model_dir, max_windows, seqlen, dtype)
    atomic_write_text(cache, json.dumps(data))
    return data


def run(
    model: str = DEFAULT_MODEL,
    out: str | Path = "out/quickstart",
    max_windows: int = PRESETS["fast"].max_windows,
    seqlen: int = 2048,
    calib_samples: int = PRESETS["fast"].calib_samples,
    dtype: str = "auto",
) -> list[Row]:
    """Quantize ``model`` into ``out`` (streamed: an interrupted run resumes) and evaluate it and its fp original,
    both in ``dtype`` (``auto``: the faster of bf16 and fp32 for windows of ``seqlen`` on this machine)."""
    model_dir = resolve_model_dir(model)
    compute = api.choose_dtype(dtype, rows=seqlen).dtype
    _stage(f"[1/3] full-precision perplexity, {max_windows} x {seqlen} tokens (cached after the first run)")
    fp = _cached_fp_eval(model_dir, max_windows, seqlen, compute)
    name = str(compute).removeprefix("torch.")
    rows = [Row("fp32", "32", "-", dir_size_mb(model_dir), fp["ppl"], 0.0, fp["eval_s"], name)]

    recipe = best_recipe()
    _stage(f"[2/3] quantizing: {recipe[0].describe()}, {calib_samples} x {seqlen} calibration tokens")
    t0 = time.perf_counter()
    api.quantize_to_checkpoint(
        model_dir, recipe, out, calibration=api.Calibration(n_samples=calib_samples), overwrite=True
    )
    quantize_s = time.perf_counter() - t0
    _stage(f"[3/3] perplexity of the quantized model, {max_windows} x {seqlen} tokens")
    quantized = _evaluate(out, max_windows, seqlen, compute)
    spec = recipe[-1].spec
    rows.append(
        Row(
            recipe[-1].name,
            str(spec.bits),
            str(spec.group_size if spec.group_size > 0 else "channel"),
            dir_size_mb(Path(out)),
            quantized["ppl"],
            quantize_s,
            quantized["eval_s"],
            name,
        )
    )
    return rows


def format_table(rows: list[Row]) -> str:
    header = "| method | bits | group size | model size (MB) | perplexity | quantize (s) | eval (s) |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.bits} | {r.group_size} | {r.size_mb:.1f} | {r.ppl:.2f} | {r.quantize_s:.1f} "
            f"| {r.eval_s:.1f} |"
        )
    return "\n".join(lines)


def rows_to_json(rows: list[Row]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)
