"""The public Python API: quantize, save, load, evaluate. The CLI is a thin layer over these."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlm._version import __version__
from quantlm.data import calibration_windows, load_text, tokenize_text
from quantlm.errors import QuantlmError
from quantlm.eval.perplexity import PerplexityResult, perplexity
from quantlm.formats import gguf_targets
from quantlm.formats.exchange import export_checkpoint, foreign_config, read_foreign, read_gguf
from quantlm.formats.native import (
    WEIGHTS_FILE,
    check_output,
    checksum_problems,
    is_quantlm_checkpoint,
    load_checkpoint,
    quantized_modules,
    read_record,
    save_checkpoint,
)
from quantlm.formats.record import QuantizationRecord
from quantlm.hardware import DTYPE_CHOICES, TRAIN_DTYPES, choose_dtype, describe_cpu
from quantlm.methods.base import registered_methods
from quantlm.methods.head import head_step
from quantlm.methods.recipe import Recipe, add_head_step, offered_methods, parse_recipe, recipe_from_options
from quantlm.models.context import check_context
from quantlm.models.sources import load_float_model, load_model_config, load_tokenizer, resolve_model_dir
from quantlm.paths import check_output_paths, default_work_dir, output_lock
from quantlm.pipeline.activations import OffloadDirectory
from quantlm.pipeline.runner import run_pipeline

ModelLike = "nn.Module | str | os.PathLike"


@dataclass(frozen=True)
class Calibration:
    """Where calibration windows come from (the benchmark protocol's defaults)."""

    source: str = "enwiki"
    split: str = "calibration"
    n_samples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def check(self) -> None:
        """Fail fast on settings or sources that cannot work, before any model is loaded."""
        if self.n_samples < 1 or self.seqlen < 2:
            raise QuantlmError(
                f"calibration needs at least 1 window of at least 2 tokens, got {self.n_samples} x {self.seqlen}"
            )
        load_text(self.source, self.split)

    def windows(self, tokenizer) -> torch.Tensor:
        tokens = tokenize_text(tokenizer, load_text(self.source, self.split))
        return calibration_windows(tokens, self.n_samples, self.seqlen, self.seed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "split": self.split,
            "n_samples": self.n_samples,
            "seqlen": self.seqlen,
            "seed": self.seed,
        }


def _calibration_windows(recipe: Recipe, calibration, tokenizer) -> tuple[torch.Tensor | None, dict | None]:
    """The calibration windows a recipe needs (None if it needs none), and how they were made."""
    if not recipe.needs_calibration:
        return None, None
    if calibration is None:
        calibration = Calibration()
    if isinstance(calibration, Calibration):
        if tokenizer is None:
            raise QuantlmError("calibration from text needs the model's tokenizer: pass tokenizer=")
        return calibration.windows(tokenizer), calibration.to_dict()
    return calibration, None


def _parse_pipeline_recipe(recipe) -> Recipe:
    recipe = parse_recipe(recipe)
    if recipe.trained:
        raise QuantlmError(f"{recipe.describe()} trains the whole model: run it with quantlm qat (quantlm.qat)")
    return recipe


def _run_record(recipe: Recipe, records, calib_info: dict | None, seconds: float, kv_cache) -> QuantizationRecord:
    return QuantizationRecord(
        recipe=recipe.to_config(),
        calibration=calib_info,
        log=[r.to_dict() for r in records],
        seconds=seconds,
        kv_cache=kv_cache,
    )


def load(
    source: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | None = None,
    kernel: str = "auto",
    attention: str = "auto",
    kernel_cache: bool = True,
    verify: bool | None = None,
    quantize: str | Any | None = None,
    progress: bool = True,
) -> nn.Module:
    """A quantlm checkpoint, a GPTQ or compressed-tensors checkpoint, or a GGUF file whose Linears are llama.cpp
    blocks of Q4_0 ... Q5_1 and Q2_K ... Q6_K (``quantlm.formats.exchange``), as a quantized model ready to run;
    any other model source as a full-precision model (with ``quantize``, quantized as it loads).

    ``dtype`` is the compute dtype (a torch dtype or its name; ``"auto"``: the fastest this machine runs natively,
    ``quantlm.hardware.choose_dtype``): the float parts of the model (embeddings, norms, unquantized Linears) are cast
    to it and the quantized Linears take activations in it. Every quantized Linear runs on ``kernel`` (``auto``: the
    fastest that can run it on ``device``; see ``quantlm.nn.kernels``); ``model.quantlm_kernels`` maps each one to
    the kernel it got. ``attention`` is the attention implementation (``quantlm.nn.attention``; ``auto``: decode
    steps of a bf16/fp16 SDPA model on the CPU in fp32, any other model as it loads). ``kernel_cache``: reuse the
    kernels' packed weights from an earlier load of the same checkpoint (``quantlm.nn.kernel_cache``; off also with
    ``QUANTLM_KERNEL_CACHE=0``). ``verify``: check every file of a checkpoint against its recorded checksum first
    (default: yes, unless ``QUANTLM_VERIFY=0``; about 0.1 s per 100 MB). ``quantize``: a calibration-free method
    name (``load_time_methods()``: rtn, hqq, nf4, fp4, int8-weight-only, with their default settings) or recipe
    (anything ``parse_recipe`` takes) applied to a float model in fp32 as it loads, before it is cast to ``dtype``:
    what transformers users get from a quantization config at load time, with nothing written to disk.
    """
    from quantlm.nn.attention import check_attention_name

    check_attention_name(attention)
    dtype = choose_dtype(dtype, device).dtype
    path = Path(str(source)).expanduser()
    recipe = None if quantize is None else load_time_recipe(quantize)
    if is_quantlm_checkpoint(path):
        if recipe is not None:
            raise QuantlmError(f"{source} is a quantized checkpoint already: load it without --quantize/quantize=")
        model = load_checkpoint(path, device=device, verify=verify)
        return _ready(model, dtype, kernel, attention, cache_for=path / WEIGHTS_FILE if kernel_cache else None)
    if foreign_config(path) is not None:  # GPTQ or compressed-tensors, quantlm's export or another tool's
        if recipe is not None:
            raise QuantlmError(f"{source} is a quantized checkpoint already: load it without --quantize/quantize=")
        model = read_foreign(path)
        return _ready(model if device is None else model.to(device), dtype, kernel, attention)
    if path.suffix == ".gguf" and path.is_file() and recipe is None:  # its llama.cpp blocks as QuantLinears
        model = read_gguf(path)
        return _ready(model if device is None else model.to(device), dtype, kernel, attention)
    if recipe is None:
        return _ready(load_float_model(source, dtype=dtype, device=device), dtype, kernel, attention)
    model = _quantize_model(load_float_model(source, dtype=torch.float32, device=device), recipe, progress)
    return _ready(model, dtype, kernel, attention)


# quantlm.export: a quantlm checkpoint (for gguf also any float model) in another runtime's format
export = export_checkpoint


def load_time_methods() -> tuple[str, ...]:
    """The methods ``load(..., quantize=NAME)`` takes by name: those of ``quantlm quantize`` that quantize weights
    with their default settings and need no calibration data."""
    return tuple(
        name for name, cls in offered_methods().items() if cls.quantizes_weights and not cls().needs_calibration
    )


def load_time_recipe(quantize) -> Recipe:
    """The recipe ``load(..., quantize=...)`` applies: a method name of ``load_time_methods()`` or a recipe file
    (``str``), or any recipe; it must need no calibration data."""
    names = load_time_methods()
    if isinstance(quantize, str) and quantize in registered_methods():
        if quantize not in names:
            cls = registered_methods()[quantize]
            why = (
                "trains the model"
                if not cls.pipeline
                else "needs calibration data"
                if cls.offered
                else "is a step of other recipes, not a method of its own"
            )
            raise QuantlmError(
                f"{quantize} {why}: quantize at load time with one of {', '.join(names)}, or run quantlm quantize "
                "(or quantlm qat) first"
            )
        quantize = {"method": quantize}
    elif isinstance(quantize, str) and not Path(quantize).suffix:
        raise QuantlmError(
            f"unknown method '{quantize}' to quantize at load time: use one of {', '.join(names)}, or a JSON/YAML "
            "recipe file"
        )
    recipe = parse_recipe(quantize)
    if any(not getattr(step, "pipeline", True) for step in recipe.steps):
        raise QuantlmError("QAT trains the model: run quantlm qat, then load its checkpoint")
    if recipe.needs_calibration:
        raise QuantlmError(
            "this recipe needs calibration data: quantize at load time only with calibration-free steps, or run "
            "quantlm quantize first"
        )
    return recipe


def _quantize_model(model: nn.Module, recipe: Recipe, progress: bool) -> nn.Module:
    return quantize(model, recipe, progress=progress)


def recast(model: nn.Module, dtype: torch.dtype | str, *, kernel: str = "auto", attention: str = "auto") -> nn.Module:
    """Switch a loaded model (float or quantized) to another compute dtype in place, as ``load`` would have loaded
    it: float parts cast, the quantized Linears' kernels prepared for the new activations, attention chosen again.
    (``bench`` times prefill and decoding each in its own dtype on CPUs where they differ.)"""
    return _ready(model, choose_dtype(dtype).dtype, kernel, attention)


def _ready(model: nn.Module, dtype: torch.dtype, kernel: str, attention: str, cache_for: Path | None = None):
    from quantlm.nn.attention import use_attention
    from quantlm.nn.inference import cast_float_parts, prepare_kernels

    cast_float_parts(model, dtype)
    if quantized_modules(model):
        model.quantlm_kernels = prepare_kernels(model, kernel, dtype, cache_for=cache_for)
    use_attention(model, attention)
    return model


def quantize(
    model: nn.Module,
    recipe,
    calibration: torch.Tensor | Calibration | None = None,
    *,
    tokenizer=None,
    batch_size: int = 8,
    progress: bool = True,
    kv_cache=None,
) -> nn.Module:
    """Apply ``recipe`` to ``model`` in place, layer by layer, and return it.

    ``calibration`` is a LongTensor [n, seqlen] of token ids, or a ``Calibration`` (then ``tokenizer`` is needed);
    calibration-free recipes ignore it. ``kv_cache`` (a ``quantlm.nn.kv_cache.KVQuantConfig``) also quantizes the
    KV cache at run time. ``model.quantlm_record`` then says how the model was made (what ``save`` writes).
    """
    from quantlm.nn.kv_cache import enable_kv_quantization

    recipe = _parse_pipeline_recipe(recipe)
    if quantized_modules(model):
        raise QuantlmError("this model is quantized already: quantize the float model it was made from instead")
    windows, calib_info = _calibration_windows(recipe, calibration, tokenizer)
    t0 = time.perf_counter()
    records = run_pipeline(model, recipe.steps, windows, batch_size=batch_size, progress=progress)
    model.quantlm_record = _run_record(recipe, records, calib_info, time.perf_counter() - t0, kv_cache)
    return enable_kv_quantization(model, kv_cache)


def quantize_to_checkpoint(
    source: str | os.PathLike,
    recipe,
    out: str | os.PathLike,
    *,
    calibration: Calibration | torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    work_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    keep_work_dir: bool = False,
    offload_activations: bool = False,
    progress: bool = True,
    kv_cache=None,
) -> Path:
    """Quantize the model at ``source`` into a checkpoint at ``out`` with memory near one decoder block.

    The model is built without weights and each block is read from disk when its turn comes. Every finished block
    is written to ``work_dir`` (default: ``.{out}.work`` beside ``out``); if the run is interrupted, the same call
    resumes at the next block and writes a byte-identical checkpoint. The work directory is removed at the end.
    With ``offload_activations`` the calibration activations are kept in files under the work directory instead
    of in memory (about 0.6 GB less for 128 x 2048 tokens of a 576-wide model, for some disk traffic).
    ``kv_cache`` (a ``KVQuantConfig``) is recorded in the checkpoint: the loaded model quantizes its KV cache.
    """
    import shutil

    from quantlm.pipeline.store import BlockStore
    from quantlm.pipeline.streaming import streamed_model

    out = Path(out)
    if batch_size < 1:
        raise QuantlmError(f"--batch-size must be at least 1, got {batch_size}")
    with output_lock(out):  # a second run into the same output stops here, before touching the work directory
        check_output(out, overwrite)
        recipe = _parse_pipeline_recipe(recipe)
        model_dir = resolve_model_dir(source)
        if is_quantlm_checkpoint(model_dir):
            made = read_record(model_dir).recipe
            how = parse_recipe(made).describe() if made else "quantized"
            raise QuantlmError(
                f"{source} is already a quantlm checkpoint ({how}): quantize the float model it was made from instead"
            )
        work = Path(work_dir) if work_dir is not None else default_work_dir(out)
        check_output_paths(model_dir, out, work)
        if recipe.needs_calibration and isinstance(calibration, Calibration):
            check_context(load_model_config(model_dir), calibration.seqlen, f"--calib-seqlen {calibration.seqlen}")
        tokenizer = load_tokenizer(model_dir)
        windows, calib_info = _calibration_windows(recipe, calibration, tokenizer)
        streamed = streamed_model(model_dir, dtype)
        if streamed is None:
            model, weights = load_float_model(model_dir, dtype=dtype), None
        else:
            model, weights = streamed
        signature = {
            "quantlm": __version__,
            "model": str(model_dir.resolve()),
            "dtype": str(dtype),
            "recipe": recipe.to_config(),
            "calibration": calib_info if calib_info is not None else (None if windows is None else list(windows.shape)),
        }
        store = BlockStore(work, signature)
        t0 = time.perf_counter()
        offloading = OffloadDirectory(work) if offload_activations and windows is not None else contextlib.nullcontext()
        with offloading as offload_dir:
            records = run_pipeline(
                model,
                recipe.steps,
                windows,
                batch_size=batch_size,
                progress=progress,
                weights=weights,
                store=store,
                offload_dir=offload_dir,
            )
        record = _run_record(recipe, records, calib_info, time.perf_counter() - t0, kv_cache)
        save(model, out, record=record, tokenizer=tokenizer, overwrite=overwrite, blocks=store)
        if not keep_work_dir:
            shutil.rmtree(work, ignore_errors=True)
        return out


def verify(path: str | os.PathLike) -> list[str]:
    """Every problem of the checkpoint at ``path``, one line each ([]: none): files that differ from their
    recorded checksums or are missing, tensors that do not match the config, non-finite scales, a model that does
    not load."""
    path = Path(path)
    if not is_quantlm_checkpoint(path):
        return [f"{path} is not a quantlm checkpoint (no config.json with a quantlm quantization_config)"]
    problems = checksum_problems(path)
    try:
        load_checkpoint(path, verify=False)
    except QuantlmError as e:
        problems.append(str(e))
    return problems


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    record: QuantizationRecord | None = None,
    tokenizer=None,
    overwrite: bool = False,
    format: str = "quantlm",
    blocks=None,
) -> Path:
    """Write ``model`` to ``path`` (a directory, written atomically) with ``record``: how it was made (default: the
    one ``quantize`` or ``load`` left on the model as ``model.quantlm_record``, with the KV-cache setting the model
    runs with now)."""
    if format != "quantlm":
        raise QuantlmError(f"unknown format '{format}': this version writes 'quantlm'")
    if record is None:
        record = getattr(model, "quantlm_record", None) or QuantizationRecord()
        if hasattr(model, "quantlm_kv_config"):  # the KV-cache setting the model runs with now
            record = dataclasses.replace(record, kv_cache=model.quantlm_kv_config)
    return save_checkpoint(model, path, record=record, tokenizer=tokenizer, overwrite=overwrite, blocks=blocks)


def _model_and_tokenizer(model, tokenizer):
    """A model object and its tokenizer, from a model object (its tokenizer given) or any model source."""
    if not isinstance(model, nn.Module):
        if tokenizer is None:
            tokenizer = load_tokenizer(model)
        model = load(model)
    if tokenizer is None:
        raise QuantlmError("evaluating a model object needs its tokenizer: pass tokenizer=")
    return model, tokenizer


def evaluate(
    model: nn.Module | str | os.PathLike,
    *,
    tokenizer=None,
    data: str = "enwiki",
    split: str = "eval",
    seqlen: int = 2048,
    max_windows: int | None = 32,
    add_bos: bool | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity per the benchmark protocol, of a model object (with its tokenizer) or of any model source."""
    text = load_text(data, split)  # bad text sources fail before any model is loaded
    model, tokenizer = _model_and_tokenizer(model, tokenizer)
    return perplexity(
        model, tokenizer, text, seqlen=seqlen, max_windows=max_windows, add_bos=add_bos, progress=progress
    )


def evaluate_tasks(
    model: nn.Module | str | os.PathLike,
    tasks: str | list[str] = "all",
    *,
    tokenizer=None,
    limit: int | None = None,
    batch_tokens: int | None = None,
    progress: bool = True,
):
    """Zero-shot accuracy on multiple-choice tasks (``"piqa,hellaswag"``, a list of names, or ``"all"``: the
    LLM-QAT paper's eight), scored as lm-eval scores them, on the first ``limit`` documents of each; of a model
    object (with its tokenizer) or of any model source. Returns {task: TaskResult}."""
    from quantlm.eval import tasks as task_data
    from quantlm.eval import zeroshot

    names = task_data.parse_task_names(tasks if isinstance(tasks, str) else ",".join(tasks))
    task_data.task_data_root()  # missing task data fails before any model is loaded
    model, tokenizer = _model_and_tokenizer(model, tokenizer)
    return zeroshot.evaluate_tasks(
        model,
        tokenizer,
        names,
        limit=limit,
        batch_tokens=batch_tokens or zeroshot.DEFAULT_BATCH_TOKENS,
        progress=progress,
    )


# The rest of the public surface (what the command line runs), imported when first used so that ``import
# quantlm`` stays light: ``quantlm.api.NAME`` for each name below.
_ON_DEMAND = {
    "GenerationSettings": "quantlm.qat.data",
    "generate_training_data": "quantlm.qat.data",
    "parse_greedy_tokens": "quantlm.qat.data",
    "read_samples": "quantlm.qat.data",
    "TrainSettings": "quantlm.qat.trainer",
    "qat_to_checkpoint": "quantlm.qat.run",
    "finetune": "quantlm.finetune.run",
    "LoraSettings": "quantlm.finetune.adapters",
    "load_adapters": "quantlm.finetune.adapters",
    "merge_adapters": "quantlm.finetune.merge",
    "QATConfig": "quantlm.methods.qat",
    "QAT_WEIGHT_CLIPS": "quantlm.methods.qat",
    "QAT_ACT_CLIPS": "quantlm.methods.qat",
    "generate_text": "quantlm.generation",
    "check_generation_request": "quantlm.generation",
    "measure_speed": "quantlm.eval.speed",
    "format_task_table": "quantlm.eval.zeroshot",
    "TaskResult": "quantlm.eval.zeroshot",
    "TASKS": "quantlm.eval.tasks",
    "kernel_summary": "quantlm.nn.inference",
    "KERNEL_CHOICES": "quantlm.nn.kernels",
    "KVQuantConfig": "quantlm.nn.kv_cache",
    "enable_kv_quantization": "quantlm.nn.kv_cache",
    "ALIASES": "quantlm.models.sources",
    "EXPORT_FORMAT_NAMES": "quantlm.formats.exchange",
    "load_float_model": "quantlm.models.sources",
    "BUILTIN_TEXTS": "quantlm.data.texts",
    "catalog": "quantlm.methods.catalog",
    "catalog_markdown": "quantlm.methods.catalog",
    "cli_settings": "quantlm.methods.base",
    "registered_methods": "quantlm.methods.base",
    "offered_methods": "quantlm.methods.recipe",
}


def __getattr__(name: str):
    module = _ON_DEMAND.get(name)
    if module is None:
        raise AttributeError(f"module 'quantlm.api' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


GRID_OPTIONS = ("bits", "sym", "group_size", "scale_bits", "codebook")  # grid flags a target format sets
GGUF_TARGETS = tuple(gguf_targets.TARGETS)  # --target-format values


def target_recipe(recipe: Recipe, source: str | os.PathLike, target: str) -> Recipe:
    """``recipe`` (one rtn or gptq weight step) with every Linear of the model at ``source`` on the grid of the
    llama.cpp block type ``target`` (``GGUF_TARGETS``) gives it, so that a GGUF export holds the codes as they
    are."""
    from quantlm.models.skeleton import empty_model

    gguf_targets.target_name(target)
    return gguf_targets.target_recipe(recipe, empty_model(load_model_config(resolve_model_dir(source))), target)


def describe_target(source: str | os.PathLike, target: str) -> str:
    """One line on the llama.cpp types ``target`` gives the Linears of the model at ``source`` (fallbacks for rows
    that are not whole super-blocks named)."""
    from quantlm.models.skeleton import empty_model

    return gguf_targets.describe_target(empty_model(load_model_config(resolve_model_dir(source))), target)


def kv_cache_setting(bits: int | None):
    """The KV-cache setting for ``bits`` (8, 4, ...; None or 16: a float cache)."""
    from quantlm.nn.kv_cache import KVQuantConfig

    return None if bits is None or bits == 16 else KVQuantConfig(bits=bits)


__all__ = [
    "evaluate_tasks",
    "add_head_step",
    "choose_dtype",
    "describe_cpu",
    "DTYPE_CHOICES",
    "TRAIN_DTYPES",
    "Calibration",
    "QuantizationRecord",
    "Recipe",
    "evaluate",
    "head_step",
    "kv_cache_setting",
    "load_text",
    "load",
    "load_tokenizer",
    "parse_recipe",
    "quantized_modules",
    "read_record",
    "recast",
    "quantize",
    "quantize_to_checkpoint",
    "recipe_from_options",
    "resolve_model_dir",
    "save",
    "verify",
]
