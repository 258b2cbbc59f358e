"""Logits of exported checkpoints computed by the real clients: run inside a client's venv (compressed-tensors or
GPTQModel), never in the project's; it imports nothing of quantlm.

    python logits.py JOBS.json

JOBS.json: a list of {"model": DIR, "mode": MODE, "ids": [token ids], "out": FILE.safetensors}; with
``"layers": true`` the file also holds every quantized Linear's input and output (``NAME.in``, ``NAME.out``). A job
that fails writes ``OUT.error`` (one line) instead, the others still run, and the exit status is 1. Modes:
- ``transformers``: ``AutoModelForCausalLM.from_pretrained(DIR, dtype=float32)``, the loader's own choices
  (compressed-tensors' compressed path; for GPTQ, the kernel GPTQModel picks for fp32 on this CPU);
- ``transformers-dequantize``: compressed-tensors with ``CompressedTensorsConfig(run_compressed=False)``, which
  decompresses every layer to a float weight as the model loads (its asymmetric checkpoints need it);
- ``transformers-gptq-torch`` / ``gptqmodel-torch``: GPTQ through transformers (``GPTQConfig(backend="torch")``) or
  ``GPTQModel.load(backend=BACKEND.TORCH)``, whose torch kernel runs in fp16/bf16 only: the model loads in fp16,
  then is cast to fp32 with its float tensors read again from the file, so the quantized layers compute in fp32;
- ``gptqmodel``: ``GPTQModel.load(DIR)`` in fp32 with its default kernel.
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file

GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def float_parts_in_fp32(model, directory):
    """Cast to fp32 and read the float tensors again from the file (not the fp16 copies the load made)."""
    torch.nn.Module.float(model)
    stored = {}
    for name in ("model.safetensors",):
        stored.update(load_file(f"{directory}/{name}"))
    floats = {k: v for k, v in stored.items() if not k.endswith(GPTQ_TENSORS)}
    result = model.load_state_dict(floats, strict=False)
    if result.unexpected_keys:
        raise SystemExit(f"unexpected tensors {result.unexpected_keys[:3]}")
    return model


def load(directory, mode):
    if mode.startswith("gptqmodel"):
        from gptqmodel import BACKEND, GPTQModel

        if mode == "gptqmodel-torch":
            wrapper = GPTQModel.load(directory, device="cpu", dtype=torch.float16, backend=BACKEND.TORCH)
            return float_parts_in_fp32(wrapper.model, directory)
        return GPTQModel.load(directory, device="cpu", dtype=torch.float32).model
    from transformers import AutoModelForCausalLM

    if mode == "transformers-gptq-torch":
        from transformers import GPTQConfig

        bits = json.load(open(f"{directory}/config.json"))["quantization_config"]["bits"]
        config = GPTQConfig(bits=bits, backend="torch")
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float16, quantization_config=config)
        return float_parts_in_fp32(model, directory)
    kwargs = {}
    if mode == "transformers-dequantize":
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)


def record_layers(model, tensors):
    """Hooks that keep each quantized Linear's input and output (not the head's) in ``tensors``."""

    def keep(name):
        def hook(module, inputs, output):
            tensors[f"{name}.in"] = inputs[0].detach().float().clone()
            tensors[f"{name}.out"] = output.detach().float().clone()

        return hook

    for name, module in model.named_modules():
        if "Linear" in type(module).__name__ and name.startswith("model.layers."):
            module.register_forward_hook(keep(name))


def main():
    failed = 0
    for job in json.load(open(sys.argv[1])):
        try:
            run(job)
        except Exception as e:  # one job's failure is its result: say why beside its output, go on
            failed += 1
            message = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            with open(job["out"] + ".error", "w") as f:
                f.write(f"{type(e).__name__}: {message}\n")
            print(job["model"], job["mode"], "FAILED:", message, flush=True)
    sys.exit(1 if failed else 0)


def run(job):
    model = load(job["model"], job["mode"]).eval()
    tensors = {}
    if job.get("layers"):
        record_layers(model, tensors)
    with torch.no_grad():
        tensors["logits"] = model(torch.tensor([job["ids"]])).logits.float().contiguous()
    kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
    save_file(tensors, job["out"], metadata={"modules": ",".join(kinds)})
    print(job["model"], job["mode"], kinds, flush=True)


if __name__ == "__main__":
    main()
