"""What a report shows, gathered into plain frozen dataclasses: one ``Run`` per model or checkpoint, from its
directory (recipe, quant log, size on disk) and from the JSON that ``quantlm eval --json`` and ``quantlm bench
--json`` printed about it.

A JSON file names the model it measured (``"model"``, as given on that command line). It belongs to the run whose
model resolves to the same directory (aliases through ``resolve_model_dir``, directories by their resolved path);
a JSON whose model is not among the runs becomes a run of its own, read from that model's directory when it still
exists, else labelled by the model as written. Several JSON files of one run are merged: perplexity from one,
zero-shot tasks from another, speed from a third (a later file wins where two say the same thing).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantlm.errors import QuantlmError
from quantlm.methods.base import method_quantizes_weights

EVAL_COMMAND = "quantlm eval MODEL --json"
BENCH_COMMAND = "quantlm bench MODEL --json"
_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


class ReportInputError(QuantlmError):
    """A run or JSON file given to ``quantlm report`` cannot be used."""


@dataclass(frozen=True)
class LayerError:
    """One quant-log entry of a weight-quantizing step: the module's relative weight error."""

    module: str
    block: int | None  # decoder block index parsed from the module name (None: outside the blocks, e.g. lm_head)
    kind: str  # the module's name inside its block, e.g. "self_attn.q_proj"
    error: float
    method: str


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    tokens: int | None = None
    windows: int | None = None
    seqlen: int | None = None
    data: str | None = None  # the text measured on, where the JSON says so
    split: str | None = None
    dtype: str | None = None
    source: str = ""

    def setting(self) -> str:
        """What was measured, e.g. ``enwiki, 32 x 2048 tokens`` (a split other than eval is named)."""
        parts = []
        if self.data:
            parts.append(self.data if self.split in (None, "eval") else f"{self.data} ({self.split} split)")
        if self.windows and self.seqlen:
            parts.append(f"{self.windows} x {self.seqlen} tokens")
        elif self.tokens:
            parts.append(f"{self.tokens} tokens")
        return ", ".join(parts)


@dataclass(frozen=True)
class TaskScore:
    task: str
    acc: float
    acc_norm: float | None = None
    n: int | None = None
    source: str = ""


@dataclass(frozen=True)
class Speed:
    prefill_tok_s: float
    decode_tok_s: float
    prefill_tokens: int | None = None
    decode_prompt: int | None = None
    decode_tokens: int | None = None
    dtype: str | None = None
    threads: int | None = None
    peak_rss_gb: float | None = None
    weight_bytes: int | None = None
    kernels: str | None = None
    source: str = ""


@dataclass(frozen=True)
class Measurement:
    """What one eval or bench JSON says about one model."""

    model: str
    source: str
    perplexity: Perplexity | None = None
    tasks: tuple[TaskScore, ...] = ()
    speed: Speed | None = None


@dataclass(frozen=True)
class Run:
    label: str
    model: str  # as given: a RUN argument, or the "model" of a JSON file
    kind: str  # "checkpoint", "float model" or "measured only" (no directory to read)
    directory: str | None = None
    made_from: str | None = None  # a checkpoint's source model, as its config records it
    recipe: tuple[Mapping[str, Any], ...] = ()
    method: str | None = None  # the recipe's methods, e.g. "smoothquant -> rtn"
    bits: str | None = None  # e.g. "w4", "w8 a8", "fp32"
    size_bytes: int | None = None
    size_from: str | None = None
    quantize_seconds: float | None = None
    seconds_from: str | None = None
    calibration: Mapping[str, Any] | None = None
    training: Mapping[str, Any] | None = None
    kv_cache: str | None = None
    layers: tuple[LayerError, ...] = ()
    perplexity: Perplexity | None = None
    tasks: tuple[TaskScore, ...] = ()
    speed: Speed | None = None
    sources: tuple[str, ...] = ()  # the JSON files merged into the run

    @property
    def size_mb(self) -> float | None:
        return None if self.size_bytes is None else self.size_bytes / 1e6

    @property
    def has_quant_log(self) -> bool:
        return bool(self.layers)


# ---------------------------------------------------------------------------------------------- JSON files
def _not_quantlm_json(source: str, why: str) -> ReportInputError:
    return ReportInputError(
        f"{source} is not a quantlm eval or bench JSON ({why}): pass what `{EVAL_COMMAND}` or `{BENCH_COMMAND}` printed"
    )


def _number(data: Mapping[str, Any], key: str, source: str, *, required: bool = True) -> float | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _not_quantlm_json(source, f'"{key}" is {json.dumps(value)}, not a number')
    return float(value)


def _integer(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) and value else None


def _perplexity_from(data: Mapping[str, Any], source: str) -> Perplexity | None:
    if "ppl" not in data:
        return None
    return Perplexity(
        ppl=_number(data, "ppl", source),
        tokens=_integer(data, "tokens"),
        windows=_integer(data, "windows"),
        seqlen=_integer(data, "seqlen"),
        data=_text(data, "data"),
        split=_text(data, "split"),
        dtype=_text(data, "dtype"),
        source=source,
    )


def _tasks_from(data: Mapping[str, Any], source: str) -> tuple[TaskScore, ...]:
    tasks = data.get("tasks")
    if tasks is None:
        return ()
    if not isinstance(tasks, dict):
        raise _not_quantlm_json(source, '"tasks" is not an object of task name -> {"acc": ...}')
    scores = []
    for name, entry in tasks.items():
        if not isinstance(entry, dict):
            raise _not_quantlm_json(source, f'task "{name}" is not an object with "acc"')
        where = f"{source} (task {name})"
        scores.append(
            TaskScore(
                task=str(name),
                acc=_number(entry, "acc", where),
                acc_norm=_number(entry, "acc_norm", where, required=False),
                n=_integer(entry, "n"),
                source=source,
            )
        )
    return tuple(scores)


def _speed_from(data: Mapping[str, Any], source: str) -> Speed | None:
    if "prefill_tok_s" not in data and "decode_tok_s" not in data:
        return None
    extra = data.get("extra") if isinstance(data.get("extra"), dict) else {}
    weights = data.get("weight_bytes") if isinstance(data.get("weight_bytes"), dict) else {}
    return Speed(
        prefill_tok_s=_number(data, "prefill_tok_s", source),
        decode_tok_s=_number(data, "decode_tok_s", source),
        prefill_tokens=_integer(data, "prefill_tokens"),
        decode_prompt=_integer(data, "decode_prompt"),
        decode_tokens=_integer(data, "decode_tokens"),
        dtype=_text(data, "dtype"),
        threads=_integer(data, "threads"),
        peak_rss_gb=_number(data, "peak_rss_gb", source, required=False),
        weight_bytes=_integer(weights, "total"),
        kernels=_text(extra, "kernels"),
        source=source,
    )


def measurement_from_dict(data: Any, source: str) -> Measurement:
    """A measurement from the parsed output of ``quantlm eval --json`` (perplexity and/or zero-shot tasks) or
    ``quantlm bench --json``; ``source`` names where it came from in messages and in the report."""
    if not isinstance(data, dict):
        raise _not_quantlm_json(source, f"it holds a JSON {type(data).__name__}, not an object")
    if not {"ppl", "tasks", "prefill_tok_s", "decode_tok_s"} & set(data):
        raise _not_quantlm_json(source, "it has none of the keys ppl, tasks, prefill_tok_s")
    extra = data.get("extra") if isinstance(data.get("extra"), dict) else {}
    model = _text(data, "model") or _text(extra, "model")  # bench JSON of earlier versions: extra.model
    if model is None:
        raise ReportInputError(
            f'{source} does not say which model it measured (no "model" key; quantlm eval --json before this '
            'version wrote none): add "model": "<the checkpoint or model it measured>" to it, or rerun the command'
        )
    return Measurement(
        model=model,
        source=source,
        perplexity=_perplexity_from(data, source),
        tasks=_tasks_from(data, source),
        speed=_speed_from(data, source),
    )


def read_measurement(path: Path) -> Measurement:
    """The eval or bench JSON file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _not_quantlm_json(str(path), "it is not UTF-8 text") from None
    except IsADirectoryError:
        raise ReportInputError(f"{path} is a directory, not a JSON file: pass the file itself") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ReportInputError(
            f"{path} is not valid JSON ({e}): pass what `{EVAL_COMMAND}` or `{BENCH_COMMAND}` printed"
        ) from None
    return measurement_from_dict(data, str(path))


# ---------------------------------------------------------------------------------------------- model directories
def block_index(module: str) -> int | None:
    """The decoder block a module belongs to: the first number between dots of its name
    (``model.layers.7.self_attn.q_proj`` -> 7); None for modules outside the blocks (``lm_head``)."""
    match = _BLOCK_INDEX.search(f"{module}.")
    return int(match.group(1)) if match else None


def layer_kind(module: str) -> str:
    """A module's name inside its block (``model.layers.7.self_attn.q_proj`` -> ``self_attn.q_proj``)."""
    match = _BLOCK_INDEX.search(f"{module}.")
    return module[match.end() :] if match else module


def layer_errors(log: Iterable[Mapping[str, Any]]) -> tuple[LayerError, ...]:
    """The quant log's weight errors (steps that only smooth float weights log no weight error and are left out)."""
    errors = []
    for entry in log:
        error, module, method = entry.get("error"), entry.get("module"), str(entry.get("method", ""))
        if not isinstance(error, (int, float)) or not isinstance(module, str) or not method_quantizes_weights(method):
            continue
        errors.append(LayerError(module, block_index(module), layer_kind(module), float(error), method))
    return tuple(errors)


def safetensors_bytes(directory: Path) -> int | None:
    """The size of a model directory's weights: its .safetensors files (None: there are none)."""
    files = list(Path(directory).glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ReportInputError(f"cannot read {directory / 'config.json'}: {e}") from None
    return config if isinstance(config, dict) else {}


_DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _float_dtype(config: Mapping[str, Any]) -> str:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return _DTYPE_SHORT.get(str(name).replace("torch.", ""), str(name))


def describe_bits(modules: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The weight (and activation) bits of a checkpoint's quantized modules, most common first:
    ``w4``, ``w8 a8``, ``w4/w8`` (a w8 head)."""
    weights: dict[int, int] = {}
    acts = set()
    for entry in modules.values():
        if not isinstance(entry, dict) or not isinstance(entry.get("bits"), int):
            continue
        count = int(entry.get("in_features", 1)) * int(entry.get("out_features", 1))
        weights[entry["bits"]] = weights.get(entry["bits"], 0) + count
        if entry.get("act_bits"):
            acts.add(entry["act_bits"])
    if not weights:
        return None
    text = "/".join(f"w{b}" for b in sorted(weights, key=lambda b: -weights[b]))
    return text + "".join(f" a{a}" for a in sorted(acts))


def describe_recipe(recipe: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """(the recipe's label, e.g. ``gptq(w4 g64 asym)``, its methods, e.g. ``smoothquant -> rtn``)."""
    from quantlm.methods.recipe import parse_recipe

    methods = " -> ".join(str(step.get("method", "?")) for step in recipe) or "none"
    try:
        return parse_recipe([dict(step) for step in recipe]).describe(), methods
    except QuantlmError:  # a method this version does not know
        return methods, methods


def _checkpoint_run(model: str, directory: Path) -> Run:
    from quantlm.formats.native import read_record

    record = read_record(directory)
    config = _read_config(directory)
    label, methods = describe_recipe(record.recipe)
    kv = record.kv_cache
    layers = layer_errors(record.log)
    seconds = record.seconds
    if seconds is None and record.log:
        seconds = sum(float(entry.get("seconds") or 0.0) for entry in record.log)
    bits = describe_bits(config.get("quantization_config", {}).get("modules", {}))
    return Run(
        label=label + (f" kv{kv.bits}" if kv else ""),
        model=model,
        kind="checkpoint",
        directory=str(directory),
        made_from=_text(config, "_name_or_path"),
        recipe=tuple(record.recipe),
        method=methods,
        bits=bits + (f" kv{kv.bits}" if kv and bits else ""),
        size_bytes=safetensors_bytes(directory),
        size_from="its .safetensors files",
        quantize_seconds=seconds,
        seconds_from=None if seconds is None else "the sum of the quant log's per-layer times",
        calibration=record.calibration,
        training=record.training,
        kv_cache=kv.describe() if kv else None,
        layers=layers,
    )


def _float_run(model: str, directory: Path) -> Run:
    from quantlm.models.sources import ALIASES

    dtype = _float_dtype(_read_config(directory))
    name = model if model in ALIASES else directory.name
    return Run(
        label=f"{dtype} ({name})",
        model=model,
        kind="float model",
        directory=str(directory),
        method="none (float weights)",
        bits=dtype,
        size_bytes=safetensors_bytes(directory),
        size_from="its .safetensors files",
    )


def _measured_run(model: str) -> Run:
    return Run(label=model, model=model, kind="measured only")


def _missing_run(model: str) -> ReportInputError:
    from quantlm.models.sources import ALIASES

    path = Path(model).expanduser()
    if path.is_dir():
        what = "is a directory without config.json, neither a checkpoint nor a model"
    else:
        what = "is a file, not a directory" if path.exists() else "does not exist"
    return ReportInputError(
        f"run '{model}' {what}: pass a checkpoint directory, a model directory, a model alias "
        f"({', '.join(sorted(ALIASES))}) or a .json file from `{EVAL_COMMAND}` / `{BENCH_COMMAND}`"
    )


def _model_directory(model: str) -> Path | None:
    """The directory ``model`` (an alias or a path, as a command line was given it) names; None if it names none
    here (a hub id is not looked up: a report never downloads)."""
    from quantlm.models.sources import ALIASES, resolve_model_dir

    if model in ALIASES or Path(model).expanduser().is_dir():
        return resolve_model_dir(model)
    return None


def read_run(model: str) -> Run:
    """The run of a RUN argument: a quantlm checkpoint, a float model directory or a model alias."""
    from quantlm.formats.native import is_quantlm_checkpoint

    path = Path(model).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise _missing_run(model)
    directory = _model_directory(model)
    if directory is None:
        raise _missing_run(model)
    if is_quantlm_checkpoint(directory):
        return _checkpoint_run(model, directory)
    return _float_run(model, directory)


def _run_of_measured_model(model: str) -> Run:
    """A run for a JSON's model that no RUN argument named: read from its directory if it exists here."""
    try:
        return read_run(model)
    except QuantlmError:
        return _measured_run(model)


def model_key(model: str) -> str:
    """What two mentions of one model have in common: the resolved directory, or the text itself."""
    try:
        directory = _model_directory(model)
    except QuantlmError:
        directory = None
    return str(directory.resolve()) if directory is not None else f"name:{model}"


# ---------------------------------------------------------------------------------------------- merging
def merge_measurement(run: Run, measured: Measurement) -> Run:
    """``run`` with what ``measured`` adds (a later measurement replaces the same task or kind of number)."""
    tasks = {score.task: score for score in run.tasks}
    tasks.update({score.task: score for score in measured.tasks})
    speed = measured.speed or run.speed
    size, size_from = run.size_bytes, run.size_from
    if size is None and speed is not None and speed.weight_bytes:
        size, size_from = speed.weight_bytes, f"the weight bytes {speed.source} reports"
    return dataclasses.replace(
        run,
        perplexity=measured.perplexity or run.perplexity,
        tasks=tuple(tasks.values()),
        speed=speed,
        size_bytes=size,
        size_from=size_from,
        sources=(*run.sources, measured.source),
    )


def _unique_labels(runs: list[Run]) -> list[Run]:
    """Runs whose labels collide get their directory's (or model's) name added."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    return [
        dataclasses.replace(run, label=f"{run.label} [{Path(run.directory or run.model).name}]")
        if counts[run.label] > 1
        else run
        for run in runs
    ]


def _apply_labels(runs: list[Run], keys: list[str], labels: Mapping[str, str]) -> list[Run]:
    by_key = {}
    for model, text in labels.items():
        key = model_key(model)
        if key not in keys:
            raise ReportInputError(
                f"--label names {model}, which is none of the runs: use a RUN argument or a JSON file's model "
                f"({', '.join(run.model for run in runs)})"
            )
        by_key[key] = text
    return [dataclasses.replace(run, label=by_key.get(key, run.label)) for run, key in zip(runs, keys)]


def _is_json_argument(argument: str) -> bool:
    return argument.lower().endswith(".json")


def gather_runs(
    arguments: Sequence[str], *, measurements: Sequence[Measurement] = (), labels: Mapping[str, str] | None = None
) -> list[Run]:
    """The runs of ``quantlm report RUN...``: every argument that is not a .json file is a run, in the order given;
    every .json file (and every one of ``measurements``) is merged into the run of its model, or becomes a run of
    its own after them. ``labels`` (model as given -> text) replace the labels of those runs."""
    if not arguments and not measurements:
        raise ReportInputError(
            "no runs given: pass checkpoint directories, model directories or aliases, and/or .json files from "
            f"`{EVAL_COMMAND}` / `{BENCH_COMMAND}`"
        )
    for argument in arguments:
        if not Path(argument).expanduser().exists() and _is_json_argument(argument):
            raise ReportInputError(f"JSON file not found: {argument}")
    runs: dict[str, Run] = {}
    for argument in arguments:
        if not _is_json_argument(argument):
            run = read_run(argument)
            runs.setdefault(model_key(argument), run)
    measured = [read_measurement(Path(a).expanduser()) for a in arguments if _is_json_argument(a)]
    for measurement in [*measured, *measurements]:
        key = model_key(measurement.model)
        if key not in runs:
            runs[key] = _run_of_measured_model(measurement.model)
        runs[key] = merge_measurement(runs[key], measurement)
    ordered = _unique_labels(list(runs.values()))
    return _apply_labels(ordered, list(runs), labels or {})


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
