"""Where a decoder block can be smoothed: which scale a Linear's input channels can hand to the module before it.

SmoothQuant divides input channel j of some Linears by s_j and multiplies their weight column j by s_j; that is
free (the float model's output does not change) only when the module producing that input can absorb the 1/s_j
exactly. Three such producers are known:
- ``norm``: a normalization layer (RMSNorm, LayerNorm, Gemma's (1 + w) RMSNorm) whose output feeds only these
  Linears: its weight (and bias) are divided by s. Found generically: the block is run once and a norm whose output
  tensor *is* the input of some Linears feeds them (q/k/v after input_layernorm, gate/up after
  post_attention_layernorm, GPT-2's c_attn after ln_1, OPT's fc1 after final_layer_norm, ...).
- ``v-o``: the value projection feeds the output projection through the attention's weighted sum, which is linear
  per channel, so v's output rows can be divided by s and o's columns multiplied; with grouped KV heads every query
  head that reads a KV head shares that head's scales.
- ``up-down``: in a gated MLP, down(act(gate(x)) · up(x)), up's output rows can absorb 1/s; so can fc1 before a
  ReLU (relu(z / s) = relu(z) / s for s > 0) in OPT-style MLPs.
The linear-to-linear pairs come from a small table of module names (``LINEAR_PAIRS``). Every fold is checked by
running the block before and after (``quantlm.methods.smoothquant``), so a wrong guess is an error, never a
silently changed model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantlm.errors import InvalidSpecError, QuantlmError
from quantlm.models.blocks import is_linear, linear_weight, tensor_key

FOLD_KINDS = ("norm", "v-o", "up-down")

# (kind, producer, consumer) by module names relative to the block; a producer may be a row range of a fused Linear
LINEAR_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("v-o", "self_attn.v_proj", "self_attn.o_proj"),  # Llama, Mistral, Qwen2/3, Gemma
    ("v-o", "self_attn.v_proj", "self_attn.out_proj"),  # OPT
    ("up-down", "mlp.up_proj", "mlp.down_proj"),  # gated MLPs (Llama, Mistral, Qwen2/3, Gemma)
    ("up-down", "fc1", "fc2"),  # OPT (ReLU)
)


@dataclass
class SmoothGroup:
    """Linears (``targets``, names relative to the block) whose shared input a ``producer`` can absorb scales of."""

    kind: str  # one of FOLD_KINDS
    producer: str
    targets: list[str]

    def describe(self, prefix: str = "") -> str:
        """e.g. 'model.layers.0.input_layernorm -> model.layers.0.self_attn.q_proj, ...' with ``prefix``."""
        name = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)  # noqa: E731
        return f"{name(self.producer)} -> {', '.join(name(t) for t in self.targets)}"


def parse_folds(folds) -> tuple[str, ...]:
    """A ``folds`` setting (a tuple, or a comma string) as a tuple of ``FOLD_KINDS``; none or an unknown one is an
    error."""
    if isinstance(folds, str):
        folds = tuple(f.strip() for f in folds.split(",") if f.strip())
    folds = tuple(folds)
    unknown = [f for f in folds if f not in FOLD_KINDS]
    if unknown or not folds:
        raise InvalidSpecError(f"folds must be some of {', '.join(FOLD_KINDS)}, got {', '.join(folds) or 'none'}")
    return folds


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and (isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower())
    )


def norm_groups(block: nn.Module, run_block) -> list[SmoothGroup]:
    """The norms of ``block`` whose output is the very input of some of its Linears, found by running the block
    once (``run_block()``) with hooks; in the order the block runs them."""
    produced: dict[tuple, str] = {}
    consumers: dict[str, list[str]] = {}
    keep_alive: list[Tensor] = []  # so no two outputs can share an address while we compare

    def norm_hook(name):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                produced.setdefault(tensor_key(output), name)
                keep_alive.append(output)

        return hook

    def linear_hook(name):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                producer = produced.get(tensor_key(args[0]))
                if producer is not None and name not in consumers.setdefault(producer, []):
                    consumers[producer].append(name)

        return hook

    handles = []
    for name, module in block.named_modules():
        if _is_norm(module):
            handles.append(module.register_forward_hook(norm_hook(name)))
        elif is_linear(module):
            handles.append(module.register_forward_pre_hook(linear_hook(name)))
    try:
        run_block()
    finally:
        for h in handles:
            h.remove()
    return [SmoothGroup("norm", producer, targets) for producer, targets in consumers.items() if targets]


def linear_groups(block: nn.Module) -> list[SmoothGroup]:
    """The linear-to-linear folds of ``LINEAR_PAIRS`` that ``block`` has."""
    names = {name for name, m in block.named_modules() if is_linear(m)}
    return [SmoothGroup(kind, p, [c]) for kind, p, c in LINEAR_PAIRS if p in names and c in names]


def fold_groups(block: nn.Module, folds: tuple[str, ...], run_block) -> list[SmoothGroup]:
    """The groups of ``block`` of the kinds in ``folds``: linear-to-linear folds first (they divide rows of Linears,
    v and up, whose columns a norm fold then scales), then the norm groups (``run_block()`` runs the block once
    for their discovery)."""
    groups = [g for g in linear_groups(block) if g.kind in folds]
    if "norm" in folds:
        groups += norm_groups(block, run_block)
    return groups


# -- folding ------------------------------------------------------------------------------------------------------


def norm_weight_offset(norm: nn.Module) -> float:
    """0 for norms that multiply by their weight, 1 for Gemma-style ones that multiply by (1 + weight): found by
    running the norm with its weight (and bias) zeroed (a plain norm then outputs zeros)."""
    weight = norm.weight
    bias = getattr(norm, "bias", None)
    params = [weight] + ([bias] if isinstance(bias, torch.Tensor) else [])
    probe = torch.linspace(-1, 1, weight.numel(), device=weight.device, dtype=weight.dtype).unsqueeze(0)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.zero_()
            out = norm(probe)
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
    return 0.0 if bool((out == 0).all()) else 1.0


@torch.no_grad()
def divide_norm_output(norm: nn.Module, s: Tensor) -> None:
    """Make ``norm``'s output channel j 1/s_j times what it was."""
    offset = norm_weight_offset(norm)
    w = norm.weight
    w.copy_(((w.float() + offset) / s - offset).to(w.dtype))
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_((bias.float() / s).to(bias.dtype))


@torch.no_grad()
def divide_linear_output(linear: nn.Module, s: Tensor) -> None:
    """Make ``linear``'s output channel j 1/s_j times what it was (rows of the weight, and the bias)."""
    w = linear_weight(linear)
    w.copy_((w.float() / s.unsqueeze(1)).to(w.dtype))
    bias = getattr(linear, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_((bias.float() / s).to(bias.dtype))


@torch.no_grad()
def multiply_linear_input(linear: nn.Module, s: Tensor) -> None:
    """Multiply column j of ``linear``'s weight by s_j (so an input divided by s gives the same output)."""
    w = linear_weight(linear)
    w.copy_((w.float() * s.unsqueeze(0)).to(w.dtype))


def apply_fold(group: SmoothGroup, s_producer: Tensor, s_consumer: Tensor, linears: dict[str, nn.Module]) -> None:
    """Fold one group's scales: the producer's output channels divided by ``s_producer``, the targets' input
    columns multiplied by ``s_consumer`` (``linears``: the block's modules by relative name)."""
    producer = linears[group.producer]
    if group.kind == "norm":
        divide_norm_output(producer, s_producer.to(producer.weight.device))
    else:
        divide_linear_output(producer, s_producer.to(linear_weight(producer).device))
    for t in group.targets:
        multiply_linear_input(linears[t], s_consumer.to(linear_weight(linears[t]).device))


def fold_channel_map(group: SmoothGroup, linears: dict[str, nn.Module], config, prefix: str = "") -> Tensor | None:
    """For a v -> o fold with grouped KV heads: the producer channel each consumer input channel reads
    (``kv_head_map``); None where they correspond one to one (every other fold)."""
    if group.kind != "v-o":
        return None
    n_out = linear_weight(linears[group.producer]).shape[0]
    n_in = linear_weight(linears[group.targets[0]]).shape[1]
    head_dim = head_dim_of(config)
    if n_out != n_in and head_dim is None:
        raise QuantlmError(f"cannot map {group.describe(prefix)}: the model's config has no head_dim")
    return kv_head_map(n_in, n_out, head_dim or 1)


def kv_head_map(n_consumer_channels: int, n_producer_channels: int, head_dim: int) -> Tensor | None:
    """For a v -> o fold with grouped KV heads: the producer channel that each consumer channel reads (o's input
    channel h·d + i reads v's channel (h // groups)·d + i), or None when the two have one channel each way."""
    if n_consumer_channels == n_producer_channels:
        return None
    groups = n_consumer_channels // n_producer_channels
    channel = torch.arange(n_consumer_channels)
    head, within = channel // head_dim, channel % head_dim
    return (head // groups) * head_dim + within


def head_dim_of(config) -> int | None:
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return hidden // heads if hidden and heads else None
