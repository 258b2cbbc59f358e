"""``quantlm finetune`` end to end: a quantized base (or, asked for, a float one), the domain text split into
training and held-out parts, peft LoRA adapters trained with the QAT trainer's loop (label cross-entropy, resume,
DDP), the adapters written in peft's format, and optionally a merged model (``quantlm.finetune.merge``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantlm.allocator import trim_freed_memory
from quantlm.errors import InvalidSpecError, QuantlmError
from quantlm.finetune.adapters import LoraSettings, attach_adapters, check_adapter_output, write_adapter_info
from quantlm.finetune.lora_init import INIT_WINDOWS, initialize_adapters, recorded_float_source, resolve_init
from quantlm.finetune.merge import check_merge_base, check_merge_mode, merge_adapters
from quantlm.qat.trainer import TrainResult, TrainSettings, train, training_record

log = logging.getLogger(__name__)
MERGED_DIR = "merged"  # the merged checkpoint's folder inside the adapter directory
LORA_INIT_FILE = "lora_init.json"  # in the work directory: how a resumable run's adapters started
# fine-tuning's own training defaults (LoRA's usual learning rate: QLoRA used 1e-4 to 2e-4); the rest as QAT's
DEFAULT_TRAINING = TrainSettings(steps=200, lr=2e-4, loss="ce")
DEFAULT_SEQLEN = 512


@dataclass
class FinetuneResult:
    out: Path
    merged: Path | None
    training: TrainResult
    held_out: dict[str, float] = field(default_factory=dict)  # held-out perplexity: "adapter" and "merged"
    lora_init: dict = field(default_factory=dict)  # how the adapters started (quantlm.finetune.lora_init)


def domain_texts(data: str) -> tuple[str, str]:
    """(training text, held-out text): a built-in text's calibration and eval splits, or a local file's first 90% and
    last 10% of characters (``quantlm.data.texts.holdout_split``)."""
    from quantlm.data.texts import BUILTIN_TEXTS, holdout_split, load_text

    if data in BUILTIN_TEXTS or str(data).startswith("hf:"):
        return load_text(data, "calibration"), load_text(data, "eval")
    text = load_text(str(data))
    return holdout_split(text, "calibration", str(data)), holdout_split(text, "eval", str(data))


def text_windows(tokenizer, text: str, seqlen: int, what: str) -> Tensor:
    from quantlm.data import tokenize_text

    tokens = tokenize_text(tokenizer, text)
    if tokens.numel() < seqlen:
        raise InvalidSpecError(
            f"the {what} text has {tokens.numel()} tokens, fewer than one --seqlen {seqlen} window: give more text "
            "or a shorter --seqlen"
        )
    n = tokens.numel() // seqlen
    return tokens[: n * seqlen].view(n, seqlen)


def load_base(source: str | os.PathLike, float_base: bool) -> tuple[nn.Module, Any]:
    """The model adapters train on (fp32 compute, its kernels) and its QuantizationRecord (None for a float base)."""
    from quantlm import api
    from quantlm.formats.native import is_quantlm_checkpoint, read_record

    path = Path(str(source)).expanduser()
    if is_quantlm_checkpoint(path):
        if float_base:
            raise InvalidSpecError(f"{source} is a quantized checkpoint: drop --float-base")
        model = api.load(path, dtype=torch.float32)
        if not api.quantized_modules(model):
            raise QuantlmError(f"{source} holds no quantized layer: fine-tune the float model with --float-base")
        return model, read_record(path)
    if not float_base:
        raise InvalidSpecError(
            f"{source} is not a quantized quantlm checkpoint: quantize it first (quantlm quantize), or pass "
            "--float-base for plain LoRA on the float model"
        )
    return api.load(source, dtype=torch.float32), None


def base_fingerprint(model_dir: Path) -> str:
    """What identifies the base in a resumable run's signature: a checkpoint's recorded weights checksum (so a base
    re-quantized into the same path does not pick up the old adapters), else the model directory."""
    from quantlm.formats.native import CHECKSUMS_FILE, WEIGHTS_FILE

    try:
        sums = json.loads((model_dir / CHECKSUMS_FILE).read_text(encoding="utf-8"))
        return f"{model_dir}:{sums[WEIGHTS_FILE]}"
    except (OSError, ValueError, KeyError, TypeError):
        return str(model_dir)


def saved_start(work: Path, resume: bool) -> dict | None:
    """The record of how a resumable run's adapters started, when the run will resume from ``work`` (its saved
    adapters then replace any start, so the start is not made again)."""
    from quantlm.formats.nested_state import has_nested
    from quantlm.qat.trainer import STATE_STEM

    saved = work / LORA_INIT_FILE
    if not resume or not has_nested(work, STATE_STEM) or not saved.is_file():
        return None
    try:
        record = json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def start_adapters(
    peft_model: nn.Module,
    start: tuple[str, str | None],
    float_source: str | None,
    windows: Tensor,
    work: Path,
    progress: bool,
    quantized: bool,
) -> dict:
    """Start the adapters as ``start`` = (mode, why auto fell back) says (``quantlm.finetune.lora_init``), save
    the record of it in ``work`` and return it. Under torchrun only rank 0 computes it; DDP copies rank 0's
    parameters to every process when it wraps the model."""
    from quantlm.paths import atomic_write_text

    mode, why = start
    if why is not None and quantized:  # a float base has nothing to correct: no news
        log.warning("the adapters start at zero (peft's start): %s", why)
    began = time.perf_counter()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    made = initialize_adapters(peft_model, mode, float_source, windows, progress=progress) if rank0 else {}
    trim_freed_memory()  # the float weights and input sums: else training's first forward lands on top of them
    record = {
        "init": mode,
        "why": why,
        **made,
        "float_model": float_source if mode != "default" else None,
        "windows": min(INIT_WINDOWS, windows.shape[0]) if mode == "cloq" else 0,
        "seconds": round(time.perf_counter() - began, 1),
    }
    if rank0:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work / LORA_INIT_FILE, json.dumps(record, indent=1) + "\n")
    return record


def held_out_perplexity(model: nn.Module, windows: Tensor, progress: bool) -> float:
    from quantlm.eval.perplexity import perplexity_of_windows

    model.eval()
    return round(perplexity_of_windows(model, windows, progress=progress).ppl, 4)


def finetune(
    source: str | os.PathLike,
    data: str,
    out: str | os.PathLike,
    lora: LoraSettings | None = None,
    settings: TrainSettings = DEFAULT_TRAINING,
    *,
    seqlen: int = DEFAULT_SEQLEN,
    max_windows: int | None = None,
    merge: str = "none",
    float_base: bool = False,
    float_model: str | os.PathLike | None = None,
    resume: bool = True,
    overwrite: bool = False,
    keep_work_dir: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Train LoRA adapters on the quantized checkpoint ``source`` (frozen, packed) on ``data``'s training part and
    write them to ``out`` in peft's format, with the held-out perplexity; ``merge`` (float, requant, exact) also
    writes the merged model as a quantlm checkpoint in ``out/merged``. The training state is kept in ``.{out}.work``
    beside ``out`` every ``save_every`` steps; rerunning the same command resumes there (``resume=False``: starts
    over, discarding it). Adapters on quantized layers start as ``lora.init`` says (``quantlm.finetune.lora_init``),
    from the float weights of ``float_model`` (default: the model the checkpoint records it was made from)."""
    from quantlm import api
    from quantlm.formats.record import QuantizationRecord
    from quantlm.models.context import check_context
    from quantlm.models.sources import load_tokenizer, resolve_model_dir
    from quantlm.paths import atomic_directory, check_output_paths, default_work_dir, output_lock

    lora = LoraSettings() if lora is None else lora
    if settings.loss != "ce":
        raise InvalidSpecError("fine-tuning trains on the text's own next tokens: use loss='ce'")
    check_merge_mode(merge, lora.pooled)
    if seqlen < 2:
        raise InvalidSpecError(f"--seqlen must be at least 2 tokens, got {seqlen}")
    out = Path(out)
    is_main = int(os.environ.get("RANK", "0")) == 0
    with output_lock(out) if is_main else contextlib.nullcontext():
        check_adapter_output(out, overwrite)
        train_text, held_text = domain_texts(data)  # bad data fails before any model is loaded
        model_dir = resolve_model_dir(source)
        work = default_work_dir(out)
        check_output_paths(model_dir, out, work)
        model, record = load_base(source, float_base)
        check_merge_base(merge, record)  # before training, not after it
        if float_base and float_model is not None:
            raise InvalidSpecError("--float-model is what a quantized base was made from: drop it with --float-base")
        float_source = str(float_model) if float_model is not None else None
        if record is not None and float_source is None:
            float_source = recorded_float_source(model_dir)
        resumed_start = saved_start(work, resume)  # a resumed run needs neither the float model nor a new start
        start = None if resumed_start is not None else resolve_init(lora.init, record, float_source)
        check_context(model.config, seqlen, f"--seqlen {seqlen}")
        tokenizer = load_tokenizer(model_dir)
        windows = text_windows(tokenizer, train_text, seqlen, "training")
        if max_windows is not None:
            windows = windows[:max_windows]
        held_windows = text_windows(tokenizer, held_text, seqlen, "held-out")
        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(settings.seed)  # the adapters' initialization
        peft_model = attach_adapters(model, lora)
        if not resume and is_main:  # the other processes wait for rank 0 in the trainer's first collective
            shutil.rmtree(work, ignore_errors=True)
        lora_init = resumed_start or start_adapters(
            peft_model, start, float_source, windows, work, progress, quantized=record is not None
        )
        signature = {
            "lora": lora.to_dict(),
            "base": base_fingerprint(model_dir),
            "data": str(data),
            "seqlen": seqlen,
        }
        result = train(
            peft_model,
            None,
            windows,
            settings,
            state_dir=work,
            signature=signature,
            progress=progress,
            frozen_base=True,
            desc="finetune",
        )
        if not is_main:
            return FinetuneResult(out, None, result, lora_init=lora_init)
        held_out = {"adapter": held_out_perplexity(peft_model, held_windows, progress)}
        info = {
            "base": str(source),
            "base_recipe": None if record is None else record.recipe,
            "lora": lora.to_dict(),
            "lora_init": lora_init,
            "training": training_record(settings, result, data, windows),
            "merge": merge,
            "held_out_perplexity": held_out,
            "held_out_windows": list(held_windows.shape),
        }
        merged_path = None
        with atomic_directory(out, overwrite=overwrite) as tmp:
            peft_model.save_pretrained(str(tmp))
            if merge != "none":
                merged = merge_adapters(peft_model, merge, record=record, tokenizer=tokenizer, progress=progress)
                base_record = record or QuantizationRecord()
                made = getattr(merged, "quantlm_record", None) if merge == "requant" else None
                merged_record = QuantizationRecord(
                    recipe=[] if merge == "float" else (made or base_record).recipe,
                    calibration=None if merge == "float" else (made or base_record).calibration,
                    log=[] if merge == "float" else (made or base_record).log,
                    kv_cache=None if merge == "float" else base_record.kv_cache,
                    training={"finetune": {k: info[k] for k in ("base", "lora", "lora_init", "training", "merge")}},
                )
                api.save(merged, tmp / MERGED_DIR, record=merged_record, tokenizer=tokenizer)
                merged_path = out / MERGED_DIR
                ready = api.load(tmp / MERGED_DIR, dtype=torch.float32)
                held_out["merged"] = held_out_perplexity(ready, held_windows, progress)
            write_adapter_info(tmp, info)
        if not keep_work_dir:
            shutil.rmtree(work, ignore_errors=True)
        return FinetuneResult(out, merged_path, result, held_out, lora_init)
