"""The trainer's losses, computed over the output layer one chunk of positions at a time.

Both losses are a cross-entropy ``-sum_v p_v log softmax(z)_v`` at every position, averaged, with ``z`` the
student's logits and ``p`` the target: the teacher's softmax (``kd``, LLM-QAT's logit distillation) or the next
token (``ce``). Written directly (:func:`distillation_loss`, :func:`label_loss`), they need the whole
``[batch, seq, vocab]`` logits: at 4 x 512 tokens and SmolLM2's 49,152-token vocabulary one fp32 copy is 400 MB,
and autograd keeps several (the student's logits and log-softmax, the teacher's logits and softmax).

:class:`ChunkedHeadLoss` never holds more than ``CHUNK_ELEMENTS`` logits. The model runs with its output layer
passing the final hidden states through (:func:`hidden_states_from`); then, for each chunk of positions, the
student's and the teacher's logits are computed, the loss summed, and the gradient of the loss with respect to the
logits, ``softmax(z) - p`` (over the number of positions), is turned into the gradients of the hidden states and of
the output layer's weight and bias right there. Backward only scales those by the incoming gradient. Matmuls run
in the dtype the forward pass runs in (autocast's), softmax in fp32, as the unchunked loss under autocast does.

A model whose logits are more than ``head(hidden)`` (a final soft-cap or scale after the output layer) is found by
:func:`head_computes_logits` on a short probe, and trains on whole logits as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MB in fp32); the rows of a chunk are this over the vocabulary size


# ---------------------------------------------------------------------------------------------- the references
def distillation_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over positions of -sum_v softmax(teacher)_v * log_softmax(student)_v, in fp32."""
    target = torch.softmax(teacher_logits.float(), dim=-1)
    return -(target * torch.log_softmax(student_logits.float(), dim=-1)).sum(dim=-1).mean()


def label_loss(student_logits: Tensor, input_ids: Tensor) -> Tensor:
    """Next-token cross-entropy on the text itself."""
    logits = student_logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


# ---------------------------------------------------------------------------------------------- chunked
def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The output layer on ``hidden`` in the dtype of ``weight``, returned in fp32."""
    z = hidden.to(weight.dtype) @ weight.t()
    return (z if bias is None else z + bias.to(z.dtype)).float()


class ChunkedHeadLoss(torch.autograd.Function):
    """``mean_i -sum_v target(i)_v log softmax(hidden_i W^T + b)_v`` over the rows of ``hidden [n, h]``,
    ``chunk`` rows at a time; ``target(rows)`` gives the fp32 target distributions ``[len(rows), vocab]`` of a
    slice of rows. Gradients flow to ``hidden``, ``weight`` and ``bias``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target: Callable[[slice], Tensor], chunk: int, dtype: torch.dtype):
        n = hidden.shape[0]
        w = weight.detach().to(dtype)
        b = None if bias is None else bias.detach().float()
        need = ctx.needs_input_grad
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need[2] else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        # each chunk's weight gradient lands here in the matmul dtype before it is added in fp32 (no fp32 temporary)
        partial = None if grad_weight is None or dtype == torch.float32 else torch.empty_like(w)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, n, chunk):
                rows = slice(start, min(n, start + chunk))
                h = hidden[rows].detach().to(dtype)
                log_probs = torch.log_softmax(_logits(h, w, b), dim=-1)
                p = target(rows)
                total -= (p * log_probs).sum(dtype=torch.float64)
                # d loss / d logits of these rows: softmax * (sum of the target) - target, over all n rows
                g = log_probs.exp_().mul_(p.sum(dim=-1, keepdim=True)).sub_(p).div_(n)
                del log_probs, p
                if grad_hidden is not None:
                    grad_hidden[rows] = g.to(dtype) @ w
                if partial is not None:
                    grad_weight += torch.mm(g.to(dtype).t(), h, out=partial)
                elif grad_weight is not None:
                    grad_weight.addmm_(g.t(), h)
                if grad_bias is not None:
                    grad_bias += g.sum(dim=0)
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return (total / n).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_loss):
        out = [None if g is None else (g * grad_loss).to(dt) for g, dt in zip(ctx.grads, ctx.dtypes, strict=True)]
        ctx.grads = None
        return (*out, None, None, None)


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


def chunked_head_loss(hidden: Tensor, head: nn.Module, target: Callable[[slice], Tensor], dtype: torch.dtype) -> Tensor:
    """:class:`ChunkedHeadLoss` of the rows of ``hidden [..., h]`` under the output layer ``head`` (a Linear)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    weight = head.weight
    return ChunkedHeadLoss.apply(hidden, weight, head.bias, target, chunk_rows(weight.shape[0]), dtype)


# ---------------------------------------------------------------------------------------------- the model's head
def output_layer(model: nn.Module) -> nn.Linear | None:
    """The model's output layer when it is a plain Linear (a Hugging Face causal LM's ``lm_head``), else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Linear) else None


@contextlib.contextmanager
def hidden_states_from(head: nn.Module) -> Iterator[None]:
    """While inside, ``head`` returns its input: the model's ``.logits`` are its final hidden states. The
    parameters stay where they are (names, DDP/FSDP bookkeeping and tied weights are untouched); a forward set on
    the instance before (a hook library's) is put back after."""
    before = head.__dict__.get("forward")
    head.forward = _pass_through
    try:
        yield
    finally:
        if before is None:
            del head.forward
        else:
            head.forward = before


def _pass_through(hidden: Tensor) -> Tensor:
    return hidden


def head_computes_logits(model: nn.Module, head: nn.Linear, probe: Tensor) -> bool:
    """Whether the model's logits on ``probe`` are exactly its output layer applied to the hidden states that reach
    it (no soft-cap, scale or other step after it), checked without gradients in eval mode and fp32."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device_type=probe.device.type, enabled=False):
            logits = model(input_ids=probe, use_cache=False).logits.float()
            with hidden_states_from(head):
                hidden = model(input_ids=probe, use_cache=False).logits
    finally:
        model.train(was_training)
    if hidden.shape[-1] != head.in_features:
        return False
    again = F.linear(hidden.to(head.weight.dtype), head.weight, head.bias).float()
    scale = logits.abs().max().clamp(min=1e-6)
    return bool(((again - logits).abs().max() / scale) < 1e-4)


class TrainingLoss:
    """The loss of one micro-batch: ``kd`` against ``teacher`` or ``ce`` on the text, chunked over the output
    layer where the model allows it (``chunked``), on whole logits otherwise."""

    def __init__(
        self, kind: str, student: nn.Module, teacher: nn.Module | None, dtype: torch.dtype, probe: Tensor
    ) -> None:
        self.kind = kind
        self.dtype = dtype
        self.student_head = output_layer(student)
        self.teacher_head = output_layer(teacher) if teacher is not None else None
        self.chunked = self.student_head is not None and head_computes_logits(student, self.student_head, probe)
        if kind == "kd":
            self.chunked = (
                self.chunked
                and self.teacher_head is not None
                and head_computes_logits(teacher, self.teacher_head, probe)
            )

    def describe(self) -> str:
        if self.chunked:
            return "chunked over the output layer"
        return "whole logits (the output layer is not a plain Linear, or the model changes the logits after it)"

    def __call__(self, model: nn.Module, teacher: nn.Module | None, ids: Tensor) -> Tensor:
        if not self.chunked:
            logits = model(input_ids=ids, use_cache=False).logits
            if self.kind == "ce":
                return label_loss(logits, ids)
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids, use_cache=False).logits
            return distillation_loss(logits, teacher_logits)
        with hidden_states_from(self.student_head):
            hidden = model(input_ids=ids, use_cache=False).logits
        if self.kind == "ce":
            labels = ids[:, 1:].reshape(-1)
            vocab = self.student_head.out_features

            def target(rows: slice) -> Tensor:
                return F.one_hot(labels[rows], vocab).float()

            return chunked_head_loss(hidden[:, :-1], self.student_head, target, self.dtype)
        with torch.no_grad(), hidden_states_from(self.teacher_head):
            teacher_hidden = teacher(input_ids=ids, use_cache=False).logits
        teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        t_weight = self.teacher_head.weight.detach().to(self.dtype)
        t_bias = self.teacher_head.bias

        def target(rows: slice) -> Tensor:
            return torch.softmax(_logits(teacher_hidden[rows], t_weight, t_bias), dim=-1)

        return chunked_head_loss(hidden, self.student_head, target, self.dtype)
