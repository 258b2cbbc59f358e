"""Text generation from a full-precision or quantized model."""

from __future__ import annotations

import torch
from torch import nn

from quantlm.errors import InvalidSpecError
from quantlm.models.context import check_context


def generation_kwargs(model: nn.Module, compile: bool) -> dict:
    """Settings for ``generate``: greedy; with ``compile``, a static KV cache and a compiled forward (transformers
    only compiles on accelerators unless asked, hence the private flag)."""
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.generation_config, "eos_token_id", None)
        pad = pad[0] if isinstance(pad, list) else pad
    kwargs = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "pad_token_id": pad}
    if compile:
        from transformers import CompileConfig

        config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
        config._compile_all_devices = True
        kwargs.update(cache_implementation="static", compile_config=config)
    return kwargs


def check_generation_request(
    model, prompt_tokens: int, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float
) -> None:
    """Refuse a generation request the model cannot serve, before anything is printed."""
    if prompt_tokens == 0:
        raise InvalidSpecError("--prompt is empty (it has no tokens): give at least one word to continue")
    if max_new_tokens < 1:
        raise InvalidSpecError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    check_context(model.config, prompt_tokens + max_new_tokens, "the prompt plus --max-new-tokens")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise InvalidSpecError(
            f"sampling needs --temperature above 0 and --top-p in (0, 1], got {temperature} and {top_p}"
        )


def generate_text(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    stream: bool = False,
    compile: bool = False,
) -> str:
    """Continue ``prompt``; greedy unless ``do_sample``. With ``stream`` tokens are printed as they come; with
    ``compile`` the forward is compiled over a static KV cache."""
    from transformers import TextStreamer

    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    check_generation_request(model, inputs["input_ids"].shape[1], max_new_tokens, do_sample, temperature, top_p)
    torch.manual_seed(seed)
    kwargs = {**generation_kwargs(model, compile), "max_new_tokens": max_new_tokens}
    if tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    if do_sample:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    if stream:
        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
