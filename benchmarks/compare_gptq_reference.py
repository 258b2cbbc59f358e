"""Check quantlm's GPTQ solver against the reference implementation (IST-DASLab/gptq) on the same (W, H).

The reference is not a dependency and none of its code is in this repository: clone it yourself and point
--reference-dir at the checkout (it needs only torch and transformers). For each setting the script builds a
correlated random layer problem, runs both solvers on the same Hessian, and reports the share of identical
integer codes, the largest difference of the dequantized weights, and both output errors ‖XQᵀ−XWᵀ‖/‖XWᵀ‖.

Run: .venv/bin/python benchmarks/compare_gptq_reference.py --reference-dir ../gptq
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import torch

from quantlm.core import QuantSpec
from quantlm.methods.gptq import gptq_quantize

SETTINGS = [  # bits, symmetric, group size, act-order, static groups, mse clipping
    (4, False, -1, False, False, False),
    (4, False, 64, False, False, False),
    (4, True, 64, False, False, False),
    (3, False, 64, True, False, False),
    (4, False, 64, True, False, False),
    (4, False, 64, True, True, False),
    (3, False, 32, False, False, True),
]


def layer_problem(n_out: int, n_in: int, n_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, n_in, generator=g) @ (torch.eye(n_in) + 0.3 * torch.randn(n_in, n_in, generator=g))
    x[:, :4] *= 8  # outlier channels, as real activations have
    return torch.randn(n_out, n_in, generator=g) * 0.05, x


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference-dir", type=Path, required=True, help="a checkout of IST-DASLab/gptq")
    args = parser.parse_args()
    sys.path.insert(0, str(args.reference_dir))
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # the reference syncs unconditionally
    import gptq as reference
    import quant as reference_quant

    print("| setting | identical codes | max abs diff of Q | output error quantlm | output error reference |")
    print("|---|---|---|---|---|")
    for bits, sym, gs, act, static, mse in SETTINGS:
        w, x = layer_problem(96, 256, 1024, seed=bits * 100 + gs)
        layer = torch.nn.Linear(256, 96, bias=False)
        layer.weight.data = w.clone()
        ref = reference.GPTQ(layer)
        ref.add_batch(x.unsqueeze(0), None)
        hessian = ref.H.clone()
        ref.quantizer = reference_quant.Quantizer()
        ref.quantizer.configure(bits, perchannel=True, sym=sym, mse=mse)
        with contextlib.redirect_stdout(io.StringIO()):
            ref.fasterquant(blocksize=128, percdamp=0.01, groupsize=gs, actorder=act, static_groups=static)
        q_ref = layer.weight.data.clone()
        spec = QuantSpec(bits=bits, symmetric=sym, group_size=gs, clip="mse" if mse else "none")
        ours = gptq_quantize(w, hessian, spec, act_order=act, static_groups=static)
        idx = ours.g_idx.long()
        ref_codes = torch.clamp(torch.round(q_ref / ours.scale[:, idx]) + ours.zero[:, idx], 0, spec.maxq)
        same = (ref_codes == ours.codes.float()).float().mean().item()

        def output_error(q, x=x, w=w):
            return ((x @ q.T - x @ w.T).norm() / (x @ w.T).norm()).item()

        options = [name for name, on in (("act-order", act), ("static", static), ("mse", mse)) if on]
        label = " ".join([f"w{bits} {'sym' if sym else 'asym'} g{gs}", *options])
        print(
            f"| {label} | {same:.3%} | {(q_ref - ours.dequantized).abs().max().item():.1e} "
            f"| {output_error(ours.dequantized):.6f} | {output_error(q_ref):.6f} |"
        )


if __name__ == "__main__":
    main()
