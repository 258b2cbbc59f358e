"""The main job of a fresh checkout: quantize the bundled default model with the best recipe, measure it.

Prints a table: method, bits, group size, model size, perplexity and time, for the full-precision model and the
quantized one. The full-precision perplexity is cached (it depends only on the model and the protocol).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from quantlm import api
from quantlm._version import __version__
from quantlm.core import QuantSpec
from quantlm.methods import GPTQ
from quantlm.models.sources import DEFAULT_MODEL, resolve_model_dir
from quantlm.paths import atomic_write_text, quantlm_home


def best_recipe() -> list:
    """The project's best recipe for 4-bit weights today: GPTQ W4 g64 asymmetric with the default options."""
    return [GPTQ(QuantSpec(bits=4, group_size=64, symmetric=False))]


@dataclass
class Row:
    method: str
    bits: str
    group_size: str
    size_mb: float
    ppl: float
    quantize_s: float
    eval_s: float


def dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.suffix == ".safetensors") / 1e6


def _cached_fp_eval(model_dir: Path, max_windows: int, seqlen: int):
    key = f"{model_dir.resolve()}|enwiki|eval|{seqlen}|{max_windows}|{__version__}"
    cache = quantlm_home() / "evals" / f"fp-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    model = api.load(model_dir)
    tokenizer = api.load_tokenizer(model_dir)
    t0 = time.perf_counter()
    result = api.evaluate(model, tokenizer=tokenizer, seqlen=seqlen, max_windows=max_windows)
    data = {"ppl": result.ppl, "eval_s": time.perf_counter() - t0}
    atomic_write_text(cache, json.dumps(data))
    return data


def run(
    model: str = DEFAULT_MODEL,
    out: str | Path = "out/quickstart",
    max_windows: int = 32,
    seqlen: int = 2048,
    calib_samples: int = 128,
) -> list[Row]:
    """Quantize ``model`` into ``out`` (streamed: an interrupted run resumes) and evaluate it and its fp original."""
    model_dir = resolve_model_dir(model)
    fp = _cached_fp_eval(model_dir, max_windows, seqlen)
    rows = [Row("fp32", "32", "-", dir_size_mb(model_dir), fp["ppl"], 0.0, fp["eval_s"])]

    recipe = best_recipe()
    t0 = time.perf_counter()
    api.quantize_to_checkpoint(
        model_dir, recipe, out, calibration=api.Calibration(n_samples=calib_samples), overwrite=True
    )
    quantize_s = time.perf_counter() - t0
    qmodel = api.load(out)
    tokenizer = api.load_tokenizer(out)
    t0 = time.perf_counter()
    result = api.evaluate(qmodel, tokenizer=tokenizer, seqlen=seqlen, max_windows=max_windows)
    spec = recipe[-1].spec
    rows.append(
        Row(
            recipe[-1].name,
            str(spec.bits),
            str(spec.group_size if spec.group_size > 0 else "channel"),
            dir_size_mb(Path(out)),
            result.ppl,
            quantize_s,
            time.perf_counter() - t0,
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
