"""LLM-QAT end to end: training windows, a fake-quantized student and its teacher, training, conversion, checkpoint."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from quantlm.core.quantizer import expand_to_columns, quantize
from quantlm.errors import InvalidSpecError
from quantlm.formats.native import check_output
from quantlm.formats.record import QuantizationRecord
from quantlm.models.context import check_context
from quantlm.paths import check_output_paths, default_work_dir, output_lock
from quantlm.qat.convert import convert_qat_model, convertible
from quantlm.qat.data import pack_samples, read_samples
from quantlm.qat.fake_quant import (
    FakeQuantLinear,
    QATConfig,
    calibrate_act_steps,
    fake_quant_linears,
    prepare_qat,
)
from quantlm.qat.trainer import TrainResult, TrainSettings, train, training_record

LSQ_CALIBRATION_WINDOWS = 4  # LSQ's starting steps come from these first windows, whatever the batch or process count
SMOOTH_CALIBRATION_WINDOWS = 64  # SmoothQuant's activation statistics (and α search) come from these first windows
# `quantlm qat`'s training defaults: activations recomputed in backward (about half the peak memory; no number changes)
DEFAULT_TRAINING = TrainSettings(gradient_checkpointing=True)
# where a PTQ start (--init) puts each trained weight inside its code's bin (see start_weight); float: from GPTQ W4A8KV4
# per channel, 40 steps reach 25.55 against 30.38 from the bins' centres (docs/qat.md)
INIT_OFFSETS = ("centre", "float")
DEFAULT_INIT_OFFSETS = "float"


def smooth_model(model: nn.Module, config: QATConfig, windows: Tensor, progress: bool = True) -> dict | None:
    """Apply the SmoothQuant step of ``config`` (if any) to the float ``model`` in place, calibrated on the first
    ``SMOOTH_CALIBRATION_WINDOWS`` training windows (generated text in the data-free setting). The folds leave the
    float model's function unchanged (checked per block); only where the outliers sit moves. Returns what the
    training record keeps (the step and the α of each group), or None without smoothing."""
    from quantlm.pipeline.runner import run_pipeline

    step = config.smoothing()
    if step is None:
        return None
    calibration = windows[:SMOOTH_CALIBRATION_WINDOWS].to(next(model.parameters()).device)
    records = run_pipeline(model, [step], calibration, progress=progress and int(os.environ.get("RANK", "0")) == 0)
    return {
        "step": step.describe(),
        "windows": int(calibration.shape[0]),
        "alpha": {r.module: r.details["alpha"] for r in records},
    }


def training_windows(data: str, tokenizer, seqlen: int, max_windows: int | None = None) -> Tensor:
    """Training windows ``[n, seqlen]`` from a generated jsonl file, or from a text source's calibration split
    (``enwiki``, a local text file, ...), cut end to end."""
    from quantlm.data import load_text, tokenize_text
    from quantlm.eval.perplexity import eval_windows

    if seqlen < 2:
        raise InvalidSpecError(f"--seqlen must be at least 2 tokens, got {seqlen}")
    if str(data).endswith(".jsonl"):
        windows = pack_samples(read_samples(data), seqlen)
    else:
        windows = eval_windows(tokenize_text(tokenizer, load_text(data, "calibration")), seqlen, None)
    return windows if max_windows is None else windows[:max_windows]


def _grid_shape(spec) -> tuple:
    """What must agree between a PTQ grid and a QAT grid (how the PTQ grid was searched, e.g. MSE clipping, need
    not)."""
    return (spec.bits, spec.symmetric, spec.granularity, spec.group_size)


def _checked_offsets(offsets: str) -> str:
    if offsets not in INIT_OFFSETS:
        raise InvalidSpecError(f"--init-offsets must be one of {', '.join(INIT_OFFSETS)}, got {offsets!r}")
    return offsets


def start_weight(float_weight: Tensor, centre: Tensor, scale: Tensor, spec, offsets: str) -> Tensor:
    """The trained weight a PTQ start gives one layer, from the PTQ model's dequantized weight ``centre`` (each
    weight in the middle of its code's bin) and its grid's ``scale``. Both choices keep the PTQ model's codes.

    - ``centre``: the dequantized weight itself. Every weight is half a step from either neighbouring bin, so no
      code changes until an update has moved a weight that far.
    - ``float``: the float weight moved into its code's bin: the point of the bin nearest to it, at most 0.49 of a
      step from the centre. A weight whose code the PTQ method kept where round-to-nearest puts it starts at its
      float value; one whose code it moved starts at the edge of its bin nearest to the float value.
    """
    if _checked_offsets(offsets) == "centre":
        return centre
    centre = centre.float()
    half = 0.49 * expand_to_columns(scale.float().to(centre.device), spec, centre.shape[-1])
    offset = float_weight.detach().float().to(centre.device) - centre
    return centre + torch.maximum(torch.minimum(offset, half), -half)


def init_from_quantized(student: nn.Module, quantized: nn.Module, offsets: str = DEFAULT_INIT_OFFSETS) -> int:
    """Start QAT from a post-training-quantized model: each FakeQuantLinear takes the PTQ layer's codes and its
    grid (scales and zeros), so step 0 computes exactly what the PTQ model computes; where inside each code's bin
    the trained weight starts is ``offsets`` (:func:`start_weight`). The grid is trained with learnable clipping
    and kept fixed otherwise. Returns the number of layers initialised."""
    from quantlm.nn.qlinear import QuantLinear

    targets = fake_quant_linears(student)
    n = 0
    for name, q in quantized.named_modules():
        if not isinstance(q, QuantLinear) or name not in targets:
            continue
        fq: FakeQuantLinear = targets[name]
        if fq.spec is not None and fq.spec.clip == "stats":
            raise InvalidSpecError(
                "--init keeps the start checkpoint's grid fixed, --clip stats recomputes it on every step: drop one"
            )
        if q.zeros is None or q.zeros.dtype != torch.uint8:
            raise InvalidSpecError(
                f"{name}: QAT starts from integer grids with integer zero points (RTN, GPTQ, HQQ below 4 bits), not "
                f"{q.describe()}: quantize the initial checkpoint with one of those"
            )
        if fq.spec is None or _grid_shape(q.spec) != _grid_shape(fq.spec) or q.g_idx is not None:
            raise InvalidSpecError(
                f"{name}: the initial checkpoint's grid ({q.describe()}) differs from the QAT weight grid "
                f"({fq.spec.describe() if fq.spec else 'w16'}): quantize it with the same bits, group size and "
                "symmetry, without act-order"
            )
        centre = q.dequantize_weight().float()
        fq.set_grid(q.scales.float(), q.zeros.float(), learnable=fq.learnable_clip)
        weight = start_weight(fq.weight, centre, q.scales, fq.spec, offsets)
        _place(fq, weight, centre, q.codes(), name)
        n += 1
    if n == 0:
        raise InvalidSpecError("the initial checkpoint has no quantized layer where the QAT model has one")
    return n


def _place(fq: FakeQuantLinear, weight: Tensor, centre: Tensor, codes: Tensor, name: str) -> None:
    """Copy ``weight`` into ``fq`` so that its grid, as the forward pass rounds it (scales in their storage dtype,
    weights in the student's dtype), gives back ``codes``; a weight that rounding would move to another code starts
    at its bin's centre instead."""
    device = fq.weight.device
    codes = codes.to(device)

    def rounded() -> Tensor:
        scale, zero = (t.detach() for t in fq.grid())
        return quantize(fq.weight.detach().float(), scale, zero, fq.spec)

    with torch.no_grad():
        fq.weight.copy_(weight.to(device, fq.weight.dtype))
        moved = rounded() != codes
        if moved.any():
            fq.weight[moved] = centre.to(device, fq.weight.dtype)[moved]
            if (rounded() != codes).any():
                raise InvalidSpecError(
                    f"{name}: the start checkpoint's codes do not survive the QAT weight dtype "
                    f"({fq.weight.dtype}): start from a float32 student"
                )


def check_start(config: QATConfig, from_checkpoint: bool, init_offsets: str | None = None) -> None:
    """A PTQ start (``--init``) and smoothing are one or the other: the checkpoint was quantized unsmoothed. Where its
    weights start in their bins (``--init-offsets``) only means something with a start."""
    if from_checkpoint and config.smooth_alpha is not None:
        raise InvalidSpecError(
            "--init starts from a checkpoint quantized without smoothing; smoothing would change its weights: drop one"
        )
    if init_offsets is not None:
        if not from_checkpoint:
            raise InvalidSpecError("--init-offsets needs --init CHECKPOINT: add --init or drop --init-offsets")
        _checked_offsets(init_offsets)


def run_qat(
    model: nn.Module,
    tokenizer,
    windows: Tensor,
    config: QATConfig,
    settings: TrainSettings,
    *,
    init: nn.Module | None = None,
    init_offsets: str | None = None,
    state_dir: str | os.PathLike | None = None,
    progress: bool = True,
    teacher_disposable: bool = False,
) -> tuple[nn.Module, TrainResult]:
    """Fake-quantize a copy of ``model`` (the teacher), optionally start it from the PTQ model ``init`` (each
    weight placed in its bin by ``init_offsets``, default ``DEFAULT_INIT_OFFSETS``; see :func:`start_weight`), and train
    it by distillation on ``windows``; returns the (still fake-quantized) student. ``model`` is left untouched
    unless ``teacher_disposable`` (the caller drops it after: its Linear weights may then be stored in the
    compute dtype for the run)."""
    teacher = model if settings.loss == "kd" else None
    check_start(config, init is not None, init_offsets)
    offsets = init_offsets or DEFAULT_INIT_OFFSETS
    smoothing = None

    def new_student(calibrate: bool = True) -> nn.Module:
        nonlocal smoothing
        # .float(): a rebuild after FSDP copies a teacher whose Linear weights may be in the compute dtype by now
        student = copy.deepcopy(model).float()
        if calibrate:  # a rebuild loads trained weights (smoothed norms included) over it
            smoothing = smooth_model(student, config, windows, progress)
        student = prepare_qat(student, config)
        if init is not None:
            init_from_quantized(student, init, offsets)
        if calibrate:
            calibrate_act_steps(student, windows[:LSQ_CALIBRATION_WINDOWS].to(next(student.parameters()).device))
        return student

    student = new_student()
    signature = {"qat": config.to_config(), "init": init is not None}
    if init is not None and offsets != "centre":  # the start before --init-offsets: older work dirs still resume
        signature["init_offsets"] = offsets
    result = train(
        student,
        teacher,
        windows,
        settings,
        state_dir=state_dir,
        signature=signature,
        progress=progress,
        teacher_disposable=teacher_disposable,
    )
    if result.full_state:  # FSDP left the student sharded: rebuild it whole from the gathered weights
        student = new_student(calibrate=False)
        student.load_state_dict(result.full_state)
        student.eval()
    result.smoothing = smoothing
    return student, result


def qat_to_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    config: QATConfig,
    settings: TrainSettings,
    *,
    data: str = "enwiki",
    seqlen: int = 512,
    max_windows: int | None = None,
    init: str | os.PathLike | None = None,
    init_offsets: str | None = None,
    overwrite: bool = False,
    keep_work_dir: bool = False,
    progress: bool = True,
) -> Path:
    """Train the model at ``source`` with QAT and write the converted quantized model to ``out``.

    The training state is kept in ``.{out}.work`` beside ``out`` every ``save_every`` steps; rerunning the same
    command after an interruption resumes there. ``init`` is a quantlm checkpoint (RTN or GPTQ of the same model
    and weight grid) to start from instead of the float weights, each weight placed in its bin by ``init_offsets``."""
    from quantlm import api
    from quantlm.models.sources import load_float_model, load_model_config, load_tokenizer, resolve_model_dir

    out = Path(out)
    is_main = int(os.environ.get("RANK", "0")) == 0
    # the main process holds the output lock for the whole run: a second run into OUT stops before it trains
    with output_lock(out) if is_main else contextlib.nullcontext():
        check_output(out, overwrite)
        convertible(config)
        check_start(config, init is not None, init_offsets)
        model_dir = resolve_model_dir(source)
        work = default_work_dir(out)
        check_output_paths(model_dir, out, work)
        check_context(load_model_config(model_dir), seqlen, f"--seqlen {seqlen}")
        tokenizer = load_tokenizer(model_dir)
        windows = training_windows(data, tokenizer, seqlen, max_windows)
        init_model = api.load(init) if init is not None else None
        model = load_float_model(model_dir, dtype=torch.float32)
        student, result = run_qat(
            model,
            tokenizer,
            windows,
            config,
            settings,
            init=init_model,
            init_offsets=init_offsets,
            state_dir=work,
            progress=progress,
            teacher_disposable=True,
        )
        if not is_main:
            return out
        convert_qat_model(student)
        record = QuantizationRecord(
            recipe=[config.to_config()],
            seconds=result.seconds,
            kv_cache=config.kv_config,
            training={
                **training_record(settings, result, data, windows),
                "init": None if init is None else str(init),
                "init_offsets": None if init is None else init_offsets or DEFAULT_INIT_OFFSETS,
                "smoothing": result.smoothing,
            },
        )
        api.save(student, out, record=record, tokenizer=tokenizer, overwrite=overwrite)
        if not keep_work_dir:
            shutil.rmtree(work, ignore_errors=True)
        return out
