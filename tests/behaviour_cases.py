"""Recipes whose quantized tensors must stay byte-identical across refactors, on a tiny Llama.

``tests/fixtures/behaviour_hashes.json`` holds the SHA-256 of every tensor each case wrote with the code of
2026-12-04 (commit daae7fb, before settings became one dataclass per step); ``test_behaviour_fixtures.py`` checks
the current code against it. Regenerate (only on purpose, when a change of numbers is intended) with
``python tests/behaviour_cases.py``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
HASHES = HERE / "fixtures" / "behaviour_hashes.json"

CASES: dict[str, list[dict]] = {
    "rtn-w4-g16-asym-head": [{"method": "rtn", "bits": 4, "group_size": 16, "symmetric": False, "lm_head": True}],
    "rtn-w3-g16-sym-mse": [{"method": "rtn", "bits": 3, "group_size": 16, "symmetric": True, "clip": "mse"}],
    "gptq-w4-g16-act-order-static": [
        {"method": "gptq", "bits": 4, "group_size": 16, "symmetric": False, "act_order": True, "static_groups": True}
    ],
    "gptq-w4-g16-mse-hessian-clip": [
        {
            "method": "gptq",
            "bits": 4,
            "group_size": 16,
            "clip": "mse",
            "hessian_clip": True,
            "act_order": False,
            "static_groups": False,
        }
    ],
    "gptq-w8a8-static": [
        {"method": "gptq", "bits": 8, "group_size": -1, "symmetric": True, "act_bits": 8, "act_granularity": "tensor"}
    ],
    "smoothquant-rtn-w8a8": [
        {"method": "smoothquant", "alpha": 0.5},
        {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True, "act_bits": 8},
    ],
    "smoothquant-auto-gptq-w8a8": [
        {"method": "smoothquant", "alpha": "auto", "search_tokens": 64},
        {"method": "gptq", "bits": 8, "group_size": -1, "symmetric": True, "act_bits": 8},
    ],
    "llm-int8": [{"method": "llm-int8", "threshold": 0.5}],
}
# cases that end with a head-only step (``--head-bits``): the output projection rounded to these bits
HEAD_BITS = {"rtn-w3-g16-sym-mse": 8, "gptq-w4-g16-act-order-static": 4}


def calibration() -> torch.Tensor:
    return torch.randint(0, 250, (8, 32), generator=torch.Generator().manual_seed(1234))


def quantized_checkpoint(case: str, out: Path) -> Path:
    """Quantize a tiny Llama with the case's recipe (and its head step, if any) and save it."""
    import quantlm
    from conftest import byte_tokenizer, tiny_model
    from quantlm.methods import parse_recipe
    from quantlm.methods.head import head_step

    recipe = parse_recipe(CASES[case])
    if case in HEAD_BITS:
        recipe.steps.append(head_step(HEAD_BITS[case]))
    model = tiny_model("llama")
    quantlm.quantize(model, recipe, calibration(), batch_size=4, progress=False)
    return quantlm.save(model, out, tokenizer=byte_tokenizer())


def tensor_hashes(checkpoint: Path) -> dict[str, str]:
    from safetensors import safe_open

    hashes = {}
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            digest = hashlib.sha256(
                f"{t.dtype}{tuple(t.shape)}".encode() + t.contiguous().view(torch.uint8).numpy().tobytes()
            )
            hashes[name] = digest.hexdigest()
    return hashes


def main() -> None:
    import tempfile

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            torch.manual_seed(0)
            result[case] = tensor_hashes(quantized_checkpoint(case, Path(tmp) / case))
    HASHES.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {HASHES} ({len(result)} cases)")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
