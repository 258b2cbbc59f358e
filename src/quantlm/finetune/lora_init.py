"""Adapters that start as a correction of the base's quantization error, instead of as nothing.

peft starts every adapter with B = 0, so training starts from the quantized base and must first undo what
rounding did. With the float weights W the base was made from, the residual R = W − Q (Q: the base's dequantized
weight) is known before training, and the adapters can start as its best rank-r approximation:

- ``loftq`` (LoftQ, Li et al. 2023, one step: the base is already quantized and stays as it is): B A = the rank-r
  truncated SVD of R, the smallest ‖R − B A‖_F.
- ``cloq`` (CLoQ, Deng et al. 2025): the smallest error of the layer's output on calibration inputs X (here the
  first training windows), ‖X (R − B A)ᵀ‖_F. With H = XᵀX = L Lᵀ that is ‖(R − B A) L‖_F, so B A is the rank-r SVD
  of R L, times L⁻¹.
- ``default``: peft's own (A random, B zero).
- ``auto`` (what ``quantlm finetune`` does unless told): ``cloq`` where the base's weights are the float model's
  rounded (:func:`start_problem`), else ``default``, saying why.

Group-pooled adapters (QA-LoRA, ``LoraSettings.pooled``) update the dense weight by E P, where E = B A · scale is
[out, groups] and P [groups, in] averages each group's columns. The closed form still holds: the least-squares
E* = R H Pᵀ G⁻¹ with G = P H Pᵀ, and since ‖(R − E P) L‖² = ‖(R − E* P) L‖² + ‖(E* − E) L_G‖² (G = L_G L_Gᵀ), the
best rank-r E is the rank-r SVD of E* L_G, times L_G⁻¹. Plain adapters are the case P = I; ``loftq`` is H = I.

Only adapters on quantized layers are initialized this way: a float layer has no residual and keeps peft's start.
A base whose recipe changed the float weights before rounding them (SmoothQuant's and AWQ's folded scales), or
whose weights were trained (QAT, a merged fine-tune), has no residual against the float model: R would undo the
scales or the training. Such a base starts at ``default`` under ``auto`` and is refused for ``cloq`` and ``loftq``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantlm.errors import InvalidSpecError, QuantlmError
from quantlm.nn.qlinear import QuantLinear

LORA_INITS = ("auto", "cloq", "loftq", "default")
DAMP = 0.01  # added to H's diagonal, times its mean: calibration inputs rarely span every direction
INIT_WINDOWS = 16  # training windows whose layer inputs weight the cloq correction (8192 tokens at --seqlen 512)


def check_lora_init(init: str) -> str:
    if init not in LORA_INITS:
        raise InvalidSpecError(f"--lora-init is one of {', '.join(LORA_INITS)}, got {init!r}")
    return init


# ---------------------------------------------------------------------------------------------- the closed form
def low_rank_correction(
    residual: Tensor,
    rank: int,
    gram: Tensor | None = None,
    pooling: Tensor | None = None,
    damp: float = DAMP,
) -> tuple[Tensor, Tensor]:
    """(B [out, k], A [k, cols]), k = min(rank, out, cols): the rank-k E = B A closest to ``residual`` [out, in]
    in ‖(R − E P) L‖_F, with H = ``gram`` [in, in] + ``damp`` · mean(diag H) · I = L Lᵀ (None: H = I) and
    P = ``pooling`` [cols, in] (None: P = I, cols = in). B and A share the singular values' square roots
    (B = U √S, A = √S Vᵀ L_G⁻¹: balanced in the metric of the inputs). float64 inside, float32 out."""
    r = residual.double()
    n_in = r.shape[1]
    if gram is None:
        h = torch.eye(n_in, dtype=torch.float64, device=r.device)
    else:
        h = gram.double().clone()
        h.diagonal().add_(damp * h.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
    if pooling is None:
        target, lower = r, _cholesky(h)
    else:
        p = pooling.double()
        lower = _cholesky(p @ h @ p.T)  # G = P H Pᵀ = L_G L_Gᵀ
        target = torch.cholesky_solve(p @ h @ r.T, lower).T  # E* = R H Pᵀ G⁻¹ (H and G symmetric)
    u, s, vh = torch.linalg.svd(target @ lower, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = u[:, :k] * root
    a = torch.linalg.solve_triangular(lower.T, (root[:, None] * vh[:k]).T, upper=True).T  # (√S Vᵀ) L_G⁻¹
    return b.float(), a.float()


def _cholesky(g: Tensor) -> Tensor:
    lower, info = torch.linalg.cholesky_ex(g)
    if info.item() != 0 or not bool(torch.isfinite(lower).all()):
        raise QuantlmError(
            "the adapters' starting correction met a singular or non-finite input covariance (the calibration "
            "windows gave degenerate or overflowing inputs): pass --lora-init default"
        )
    return lower


def pooling_matrix(group_of_column: Tensor, groups: int) -> Tensor:
    """P [groups, in]: row g averages the input columns of group g (what a pooled adapter's A reads)."""
    p = torch.zeros(groups, group_of_column.numel(), dtype=torch.float64)
    p[group_of_column.long(), torch.arange(group_of_column.numel())] = 1.0
    return p / p.sum(dim=1, keepdim=True).clamp_min(1.0)


# ---------------------------------------------------------------------------------------------- the model
def recorded_float_source(checkpoint: str | os.PathLike) -> str | None:
    """The float model a quantlm checkpoint was made from, as its config records it, if that directory exists."""
    from quantlm.formats.interchange import read_config

    config = read_config(Path(str(checkpoint)).expanduser())
    origin = config.get("_name_or_path") if isinstance(config, dict) else None
    if not isinstance(origin, str) or not Path(origin).is_absolute():  # a relative path meant another directory
        return None
    return origin if Path(origin).is_dir() else None


def start_problem(record, float_source: str | None) -> str | None:
    """Why adapters on the base recorded by ``record`` (a QuantizationRecord) cannot start from its residual
    against ``float_source`` (None when they can)."""
    from quantlm.methods.recipe import parse_recipe

    if record.training:
        return "the base's weights were trained (QAT or a merged fine-tune), so its residual would undo that"
    if record.recipe:
        folding = [s.name for s in parse_recipe(record.recipe).steps if not getattr(s, "quantizes_weights", True)]
        if folding:
            return f"the base's {folding[0]} step folded scales into its weights before rounding them"
    if float_source is None:
        return "the float model the checkpoint was made from is not on this machine (pass --float-model PATH)"
    return None


def float_weights(source: str | os.PathLike, names: list[str]) -> dict[str, Tensor]:
    """The fp32 weights of the layers ``names`` in the float model ``source`` (the rest of it is not kept)."""
    from quantlm.errors import ModelSourceError
    from quantlm.models.blocks import linear_weight
    from quantlm.models.sources import load_float_model

    try:
        model = load_float_model(source, dtype=torch.float32)
    except ModelSourceError as e:
        raise InvalidSpecError(
            f"{e}: pass --float-model PATH (the model the checkpoint was made from), or --lora-init default"
        ) from None
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise InvalidSpecError(
            f"the float model {source} has no layer {missing[0]}: pass --float-model PATH, the model the "
            "checkpoint was made from"
        )
    return {n: linear_weight(modules[n]).detach().float() for n in names}  # the rest of the model is dropped


def input_grams(peft_model: nn.Module, layers: dict[str, nn.Module], windows: Tensor, progress: bool) -> dict:
    """2 XᵀX / tokens of every adapter layer's input over ``windows`` (the base model alone: adapters disabled).
    Layers that read the same tensor (q/k/v, gate/up) share one sum: which do is seen in the first window."""
    from quantlm.methods.gptq import HessianAccumulator

    device = next(peft_model.parameters()).device
    sums: dict[str, HessianAccumulator] = {}
    owners: set[str] = set()  # the layers whose hook adds: the first of each group reading one tensor
    last: dict = {"x": None, "sum": None}  # the tensor the previous hook saw (held: its address is not reused)

    def add(name: str, x: Tensor) -> None:
        if name not in sums:  # the first window: a layer called on the very tensor its predecessor had shares
            if x is last["x"]:
                sums[name] = last["sum"]
            else:
                sums[name] = HessianAccumulator(x.shape[-1], device)
                owners.add(name)
        if name in owners:
            sums[name].add(x)
        last.update(x=x, sum=sums[name])

    hooks = [
        layer.get_base_layer().register_forward_pre_hook(lambda _m, args, n=n: add(n, args[0]))
        for n, layer in layers.items()
    ]
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter(), torch.no_grad():
            for i in tqdm(range(windows.shape[0]), desc="lora init", unit="window", disable=not progress):
                peft_model(windows[i : i + 1].to(device))
    finally:
        for hook in hooks:
            hook.remove()
        last.clear()
        peft_model.train(was_training)
    matrices: dict[int, Tensor] = {}  # one per shared sum
    for acc in sums.values():
        if id(acc) not in matrices:
            matrices[id(acc)] = acc.hessian()  # 2/n XᵀX: the factor 2 does not move the minimum
    return {n: matrices[id(acc)] for n, acc in sums.items()}


def resolve_init(init: str, record, float_source: str | None) -> tuple[str, str | None]:
    """(the start to make, why ``auto`` fell back to ``default``) for a base recorded by ``record`` (None: a float
    base); an explicit cloq or loftq that cannot be made is refused."""
    check_lora_init(init)
    if init == "default":
        return "default", None
    why = "a float base has no rounding error" if record is None else start_problem(record, float_source)
    if why is None:
        return ("cloq" if init == "auto" else init), None
    if init == "auto":
        return "default", why
    raise InvalidSpecError(f"--lora-init {init}: {why}; start with --lora-init default")


def initialize_adapters(
    peft_model: nn.Module,
    init: str,
    float_source: str | os.PathLike | None,
    windows: Tensor,
    *,
    progress: bool = True,
) -> dict:
    """Start the adapters of ``peft_model``'s quantized layers as ``init`` (cloq, loftq or default) says, from the
    float model ``float_source``'s weights and, for cloq, the inputs of ``windows``' first ``INIT_WINDOWS``.
    Returns {"layers": how many started, "weights_only": how many of them had no input in the windows (an expert
    no token reached: they start as loftq)}. The caller checks that the base's weights are the float model's
    rounded (:func:`resolve_init`)."""
    from quantlm.finetune.adapters import adapter_layers, is_pooled_lora_layer

    if init not in ("cloq", "loftq", "default"):
        raise InvalidSpecError(f"the adapters start as cloq, loftq or default, got {init!r}")
    layers = {n: m for n, m in adapter_layers(peft_model).items() if isinstance(m.get_base_layer(), QuantLinear)}
    if init == "default" or not layers:
        return {"layers": 0, "weights_only": 0}
    if float_source is None:
        raise InvalidSpecError(
            f"--lora-init {init} starts the adapters from the float weights the checkpoint was made from: pass "
            "--float-model PATH, or --lora-init default"
        )
    adapters = {name: [a for a in layer.active_adapters if a in layer.lora_A] for name, layer in layers.items()}
    if any(len(names) > 1 for names in adapters.values()):
        raise QuantlmError("the rounding error is corrected once: start one active adapter at a time")
    weights = float_weights(float_source, list(layers))
    for name, layer in layers.items():
        base = layer.get_base_layer()
        if weights[name].shape != (base.out_features, base.in_features):
            raise InvalidSpecError(
                f"the float model's {name} is {tuple(weights[name].shape)}, the checkpoint's is "
                f"{(base.out_features, base.in_features)}: pass --float-model PATH, the model it was made from"
            )
    grams = input_grams(peft_model, layers, windows[:INIT_WINDOWS], progress) if init == "cloq" else {}
    for name, layer in layers.items():
        base = layer.get_base_layer()
        target = weights.pop(name)
        residual = target - base.dequantize_weight(torch.float32).to(target.device)
        pooling = pooling_matrix(layer.group_of_column.cpu(), layer._groups) if is_pooled_lora_layer(layer) else None
        for adapter in adapters[name]:
            _set_adapter(layer, adapter, residual, grams.get(name), pooling)
    unseen = [n for n in layers if n not in grams] if init == "cloq" else []
    return {"layers": len(layers), "weights_only": len(unseen)}


def _set_adapter(layer: nn.Module, adapter: str, residual: Tensor, gram: Tensor | None, pooling: Tensor | None):
    lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    b, a = low_rank_correction(residual.cpu(), lora_a.shape[0], None if gram is None else gram.cpu(), pooling)
    root = layer.scaling[adapter] ** 0.5  # the adapter adds B A · scaling: each factor carries 1/√scaling
    k = a.shape[0]
    with torch.no_grad():
        lora_b.zero_()  # ranks beyond k (a layer narrower than r) keep A's random rows and B's zero columns
        lora_b[:, :k].copy_(b / root)
        lora_a[:k].copy_(a / root)
