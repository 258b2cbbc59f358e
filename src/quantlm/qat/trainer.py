"""The distillation trainer of LLM-QAT: a fake-quantized student learns the frozen full-precision teacher's
next-token distribution.

Loss (``loss="kd"``, the paper's): at every position, the cross-entropy of the student's log-softmax against the
teacher's softmax, averaged over positions (KL divergence plus the teacher's entropy, a constant). ``loss="ce"``
is plain next-token cross-entropy on the training text, for the ablation. Both are computed over the output layer
a chunk of positions at a time (``quantlm.qat.losses``), never on the whole ``[batch, seq, vocab]`` logits, and
a teacher the caller drops keeps its Linear weights in the autocast dtype (:func:`teacher_in_dtype`). AdamW, linear
warmup then cosine decay to zero, gradient accumulation, gradient-norm clipping, autocast to the dtype the machine is
fast in (bf16 only where the CPU runs it natively: ``quantlm.hardware.choose_dtype``) and gradient checkpointing.

Data order is a function of the step alone: epoch ``e`` visits the windows in ``randperm(seed + e)`` order, and
optimizer step ``s``, micro-batch ``m`` of rank ``r`` takes the ``batch_size`` windows at position
``((s * accum + m) * world + r) * batch_size`` of that order. So a resumed run sees exactly the windows it would
have seen, and N processes with batch b train on the same global batches as one process with batch N * b.

Randomness (dropout) is seeded from ``seed``, the step and the process's rank at the start of every optimizer step,
so a resumed run draws what the uninterrupted run drew. ``frozen_base=True`` (adapter training:
``quantlm.finetune``) saves and restores only the trainable parameters and their optimizer state, and DDP does not
broadcast the frozen buffers on every forward (it still does once, when it wraps the model).

Scale-out: under ``torchrun`` (``WORLD_SIZE`` > 1) the student is wrapped in DistributedDataParallel (gloo on
CPU, nccl on CUDA) and gradients are averaged across processes; rank 0 writes the checkpoints. With ``fsdp`` the
student is sharded instead (FSDP2 ``fully_shard`` per decoder block, then the whole model): each process holds a
slice of the parameters, gradients and optimizer state, for models that do not fit one device; checkpoints are
gathered into full state dicts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantlm.allocator import trim_freed_memory
from quantlm.errors import CheckpointError, InvalidSpecError
from quantlm.formats.nested_state import has_nested, load_nested, save_nested
from quantlm.hardware import TRAIN_DTYPES, DTypeChoice, choose_dtype
from quantlm.qat.losses import TrainingLoss, output_layer

LOSSES = ("kd", "ce")
STATE_STEM = "train_state"  # train_state.json + train_state.*.safetensors (quantlm.formats.nested_state)


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 300
    batch_size: int = 4  # windows per micro-batch and process
    grad_accum: int = 1
    lr: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loss: str = "kd"
    dtype: str = "auto"  # autocast dtype of the forward passes: auto, bfloat16 or float32 (no autocast)
    gradient_checkpointing: bool = False
    save_every: int = 50
    seed: int = 0
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise InvalidSpecError("--steps, --batch-size and --grad-accum must be at least 1")
        if not self.lr > 0:
            raise InvalidSpecError(f"the learning rate must be positive, got {self.lr}")
        if self.loss not in LOSSES:
            raise InvalidSpecError(
                f"the loss is 'kd' (logit distillation) or 'ce' (label cross-entropy), got {self.loss!r}"
            )
        if not 0 <= self.warmup_steps < self.steps:
            raise InvalidSpecError(f"warmup steps must be between 0 and the number of steps, got {self.warmup_steps}")
        if self.dtype not in TRAIN_DTYPES:
            raise InvalidSpecError(f"the training dtype is one of {', '.join(TRAIN_DTYPES)}, got {self.dtype!r}")
        if self.save_every < 1:
            raise InvalidSpecError(f"--save-every must be at least 1, got {self.save_every}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step (this run's steps)
    seconds: float = 0.0
    tokens: int = 0  # tokens trained on in this run, all processes
    resumed_from: int = 0
    dtype: str = ""  # the autocast dtype and why it was taken
    loss: str = ""  # how the loss was computed (quantlm.qat.losses.TrainingLoss.describe)
    full_state: dict | None = None  # FSDP: the whole trained state dict (rank 0, CPU); the student stays sharded
    smoothing: dict | None = None  # set by quantlm.qat.run: the SmoothQuant step the student started from


def training_record(settings: TrainSettings, result: TrainResult, data: str, windows: Tensor) -> dict:
    """What a trained model records of its training: the settings, the data, and how the run went (losses of this
    run: after a resume, its first loss is the first after resuming)."""
    return {
        **settings.to_dict(),
        "data": str(data),
        "seqlen": windows.shape[1],
        "windows": windows.shape[0],
        "tokens": result.tokens,
        "seconds": round(result.seconds, 1),
        "compute_dtype": result.dtype,
        "loss_computed": result.loss,
        "first_loss": result.losses[0] if result.losses else None,
        "last_loss": result.losses[-1] if result.losses else None,
        "resumed_from": result.resumed_from,
    }


# ---------------------------------------------------------------------------------------------- pieces
def teacher_in_dtype(teacher: nn.Module, dtype: torch.dtype) -> None:
    """Store the teacher's Linear weights (not its output layer, whose weight may be the embeddings') in the
    autocast dtype ``dtype``, in place: autocast casts them to it on every call anyway, so the teacher computes
    the same numbers and holds half the bytes for them. Nothing changes when ``dtype`` is fp32."""
    if dtype == torch.float32:
        return
    head = output_layer(teacher)
    for module in teacher.modules():
        if isinstance(module, nn.Linear) and module is not head:
            module.to(dtype)


def cosine_lr(step: int, settings: TrainSettings) -> float:
    """The learning-rate factor at optimizer step ``step`` (0-based): linear warmup, then cosine to zero."""
    if step < settings.warmup_steps:
        return (step + 1) / (settings.warmup_steps + 1)
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def window_indices(n_windows: int, step: int, micro: int, rank: int, world: int, settings: TrainSettings) -> Tensor:
    """The windows (indices into the training set) of one micro-batch; see the module docstring."""
    start = ((step * settings.grad_accum + micro) * world + rank) * settings.batch_size
    idx = []
    for pos in range(start, start + settings.batch_size):
        epoch, offset = divmod(pos, n_windows)
        order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(settings.seed + epoch))
        idx.append(int(order[offset]))
    return torch.tensor(idx, dtype=torch.long)


class _Distributed:
    """The process group under torchrun (or none): rank, world size, and gradient averaging through DDP."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        self.owned = False
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)
            self.owned = True

    def agree_on(self, choice: DTypeChoice) -> DTypeChoice:
        """Every process takes the main process's choice (each probes on its own and could land either side)."""
        if self.world == 1:
            return choice
        code = torch.tensor([choice.dtype == torch.bfloat16], dtype=torch.int32, device=self.device)
        torch.distributed.broadcast(code, src=0)
        if bool(code.item()) == (choice.dtype == torch.bfloat16):
            return choice
        return DTypeChoice(torch.bfloat16 if code.item() else torch.float32, "as the main process chose")

    def broadcast_from_main(self, model: nn.Module) -> None:
        """Every process takes the main process's parameters and buffers. DDP does this when it wraps the model;
        before FSDP2 shards it, this makes sure the shards come from one model, whatever each process's own
        preparation (smoothing's α search, LSQ's calibration) found."""
        if self.world > 1:
            for tensor in model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)

    def shard(self, model: nn.Module) -> None:
        """FSDP2: shard every decoder block, then the rest of the model (in place)."""
        from torch.distributed.fsdp import fully_shard

        from quantlm.models.blocks import find_decoder_blocks

        for block in find_decoder_blocks(model).blocks:
            fully_shard(block)
        fully_shard(model)

    def wrap(self, model: nn.Module, device: torch.device, sharded: bool, broadcast_buffers: bool = True) -> nn.Module:
        if self.world == 1 or sharded:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=broadcast_buffers)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owned:
            torch.distributed.destroy_process_group()


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Turn activation (gradient) checkpointing of a transformers model on or off, under either of its names
    (transformers 5 renamed ``gradient_checkpointing_*`` to ``activation_checkpointing_*``)."""
    for prefix in ("activation_checkpointing", "gradient_checkpointing"):
        method = getattr(model, f"{prefix}_{'enable' if on else 'disable'}", None)
        if callable(method):
            method(**({f"{prefix}_kwargs": {"use_reentrant": False}} if on else {}))
            return


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


def _trainable_state(student: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in student.named_parameters() if p.requires_grad}


def _full_state(student: nn.Module, optimizer, sharded: bool, frozen_base: bool = False) -> tuple[dict, dict]:
    """Model and optimizer state dicts (``frozen_base``: of the trainable parameters only), gathered whole onto the
    CPU when sharded (a collective call)."""
    if frozen_base and not sharded:
        return _trainable_state(student), optimizer.state_dict()
    if not sharded:
        return student.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _save_state(directory: Path, model_state: dict, optim_state: dict, scheduler, step: int, signature: dict) -> None:
    state = {
        "step": step,
        "model": model_state,
        "optimizer": optim_state,
        "scheduler": scheduler.state_dict(),
        "signature": signature,
    }
    save_nested(directory, STATE_STEM, state)


def _load_state(
    directory: Path, student: nn.Module, optimizer, scheduler, signature: dict, sharded: bool, frozen_base: bool
) -> int:
    """Resume from the saved training state (safetensors + JSON: reading it runs no code, unlike a pickle)."""
    state = load_nested(directory, STATE_STEM)
    if not isinstance(state, dict) or state.get("signature") != json.loads(json.dumps(signature)):
        raise CheckpointError(
            f"{directory / STATE_STEM}.json belongs to a run with other settings: delete it (or choose another --out) "
            "to start over"
        )
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            student,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
    elif frozen_base:
        expected = _trainable_state(student)
        if set(state["model"]) != set(expected):
            raise CheckpointError(
                f"{directory / STATE_STEM}.json holds other trainable tensors: delete it (or choose another --out) "
                "to start over"
            )
        student.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
    else:
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


# ---------------------------------------------------------------------------------------------- the loop
def train(
    student: nn.Module,
    teacher: nn.Module | None,
    windows: Tensor,
    settings: TrainSettings,
    *,
    state_dir: str | os.PathLike | None = None,
    signature: dict | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    frozen_base: bool = False,
    desc: str = "qat",
    teacher_disposable: bool = False,
) -> TrainResult:
    """Train ``student`` in place on ``windows [n, seqlen]`` (token ids) for ``settings.steps`` optimizer steps.

    ``teacher`` (frozen, same vocabulary) is needed for ``loss="kd"``. With ``state_dir`` the training state is
    saved there every ``save_every`` steps and a run that finds one resumes from it (``signature`` must match).
    ``frozen_base``: only the parameters that require grad are saved (adapters on a frozen model). ``desc`` names
    the progress bar.
    ``teacher_disposable``: the caller has no further use for ``teacher``, so
    its Linear weights may be stored in the compute dtype for the run (:func:`teacher_in_dtype`; half their memory
    under bf16).
    """
    if settings.loss == "kd" and teacher is None:
        raise InvalidSpecError("logit distillation needs the full-precision teacher model")
    device = next(student.parameters()).device
    dist = _Distributed(device)
    compute = dist.agree_on(
        choose_dtype(settings.dtype, device, rows=settings.batch_size * windows.shape[1], training=True)
    )
    torch.manual_seed(settings.seed)
    if teacher is not None:
        teacher.eval()  # run under no_grad below; its parameters' flags are left as they are
    if settings.gradient_checkpointing:
        _checkpointing(student, True)
    student.train()
    sharded = settings.fsdp and dist.world > 1
    if sharded and frozen_base:
        raise InvalidSpecError("adapter training shards nothing: run it under torchrun without --fsdp (DDP)")
    # the probe runs before sharding: an FSDP2 forward leaves the root's parameters gathered
    loss_of = TrainingLoss(settings.loss, student, teacher, compute.dtype, windows[:1, :16].to(device))
    if sharded:
        dist.broadcast_from_main(student)
        dist.shard(student)
    if teacher is not None and teacher_disposable:
        teacher_in_dtype(teacher, compute.dtype)
    params = [p for p in student.parameters() if p.requires_grad]
    # the fused AdamW: one pass over each parameter, no full-size temporaries (10x faster than the loop on a CPU
    # for the 49k x 576 embedding); FSDP2's sharded parameters take the default implementation
    fused = not sharded and device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(
        params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.95), fused=fused or None
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, settings))
    signature = {
        # checkpointing recomputes the same numbers: a run may resume with it switched
        "settings": {k: v for k, v in settings.to_dict().items() if k != "gradient_checkpointing"},
        "compute_dtype": compute.name,  # what "auto" resolved to: a resumed run must train in the same dtype
        "windows": list(windows.shape),
        "world": dist.world,
        **(signature or {}),
    }
    state_dir = Path(state_dir) if state_dir is not None else None
    start = 0
    if state_dir is not None and has_nested(state_dir, STATE_STEM):
        start = _load_state(state_dir, student, optimizer, scheduler, signature, sharded, frozen_base)
    model = dist.wrap(student, device, sharded, broadcast_buffers=not frozen_base)
    result = TrainResult(steps=settings.steps, resumed_from=start, dtype=compute.describe(), loss=loss_of.describe())
    t0 = time.perf_counter()
    bar = tqdm(total=settings.steps, initial=start, desc=desc, unit="step", disable=not progress or dist.rank != 0)
    model_state = None  # the state gathered at the latest step, if it was saved
    try:
        for step in range(start, settings.steps):
            # dropout draws depend on the step (and the process) alone
            torch.manual_seed((settings.seed * 1_000_003 + step) * 64 + dist.rank)
            step_loss = 0.0
            for micro in range(settings.grad_accum):
                ids = windows[window_indices(windows.shape[0], step, micro, dist.rank, dist.world, settings)].to(device)
                sync = micro == settings.grad_accum - 1
                if sharded:
                    model.set_requires_gradient_sync(sync)
                    ctx = contextlib.nullcontext()
                else:
                    ctx = model.no_sync() if dist.world > 1 and not sync else contextlib.nullcontext()
                with ctx:
                    with _autocast(device, compute.dtype):
                        loss = loss_of(model, teacher, ids)
                    if device.type == "cpu":  # the teacher's and the loss's temporaries, before backward allocates
                        trim_freed_memory()
                    (loss / settings.grad_accum).backward()
                step_loss += loss.item() / settings.grad_accum
                result.tokens += ids.numel() * dist.world
                del loss
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cpu":  # the step's activations and gradients: else resident memory creeps up
                trim_freed_memory()
            result.losses.append(step_loss)
            bar.update(1)
            elapsed = time.perf_counter() - t0
            bar.set_postfix(
                loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", tok_s=f"{result.tokens / elapsed:.0f}"
            )
            if on_step is not None:
                on_step(step, step_loss)
            done = step + 1
            model_state = None
            if state_dir is not None and (done % settings.save_every == 0 or done == settings.steps):
                model_state, optim_state = _full_state(student, optimizer, sharded, frozen_base)
                if dist.rank == 0:
                    _save_state(state_dir, model_state, optim_state, scheduler, done, signature)
                dist.barrier()
        if sharded:  # the last step's gathered state when it was just saved, else gather it now
            result.full_state = model_state if model_state is not None else _full_state(student, optimizer, sharded)[0]
    finally:
        bar.close()
        if settings.gradient_checkpointing:
            _checkpointing(student, False)
        student.eval()
        dist.close()
    result.seconds = time.perf_counter() - t0
    return result
