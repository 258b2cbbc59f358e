"""The GPTQ solver against a slow, obviously-correct Optimal Brain Surgeon loop, and its invariants."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from quantlm.core import QuantSpec, compute_qparams, dequantize, quantize
from quantlm.errors import InvalidSpecError, QuantlmError
from quantlm.methods.gptq import gptq_quantize


def _problem(n_out=48, n_in=96, n_samples=400, seed=0, correlated=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, n_in, generator=g)
    if correlated:  # real activations are correlated; that is what GPTQ exploits
        x = x @ (torch.eye(n_in) + 0.3 * torch.randn(n_in, n_in, generator=g))
        x[:, :4] *= 8  # a few outlier channels
    w = torch.randn(n_out, n_in, generator=g) * 0.05
    h = 2 / n_samples * x.T @ x
    return w, h, x


def _slow_obs(w, h, spec, damp=0.01):
    """Quantize column after column; after each, update the remaining columns with the exact OBS formula using an
    explicitly maintained inverse Hessian of the not-yet-quantized columns (float64, no Cholesky, no lazy blocks).
    A group's grid comes from the weights as they stand when the group's first column is reached."""
    W = w.double().clone()
    H = h.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    row_spec = dataclasses.replace(spec, group_size=-1, granularity="channel")
    n_in = W.shape[1]
    gs = spec.group_size if spec.granularity == "group" else n_in
    codes = torch.zeros(W.shape, dtype=torch.uint8)
    for i in range(n_in):
        if i % gs == 0:
            s, z = compute_qparams(W[:, i : i + gs].float(), row_spec)
        c = quantize(W[:, i : i + 1].float(), s, z, row_spec)
        q = dequantize(c, s, z, row_spec).double()
        codes[:, i : i + 1] = c
        err = (W[:, i : i + 1] - q) / Hinv[i, i]
        W[:, i + 1 :] -= err * Hinv[i : i + 1, i + 1 :]
        W[:, i : i + 1] = q
        Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    return codes, W.float()


def _output_error(x, w, q):
    return ((x @ q.T - x @ w.T).norm() / (x @ w.T).norm()).item()


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4),
        QuantSpec(bits=3, symmetric=True),
        QuantSpec(bits=4, group_size=32),
        QuantSpec(bits=2, group_size=16),
    ],
)
def test_matches_the_slow_obs_loop(spec):
    w, h, x = _problem()
    # with block_size == group size the lazy-block grid rule and the slow loop's rule coincide
    bs = spec.group_size if spec.granularity == "group" else 32
    result = gptq_quantize(w, h, spec, block_size=bs)
    slow_codes, slow_q = _slow_obs(w, h, spec)
    mismatch = (result.codes != slow_codes).float().mean().item()
    assert mismatch < 0.005, mismatch  # only float ties may differ
    assert _output_error(x, w, result.dequantized) == pytest.approx(_output_error(x, w, slow_q), rel=1e-2)


def test_per_channel_result_does_not_depend_on_the_block_size():
    w, h, _ = _problem()
    a = gptq_quantize(w, h, QuantSpec(bits=4), block_size=128)
    b = gptq_quantize(w, h, QuantSpec(bits=4), block_size=7)
    assert (a.codes != b.codes).float().mean() < 0.005


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True), (False, True)])
def test_invariants_and_beats_rtn(act_order, static):
    spec = QuantSpec(bits=4, group_size=32)
    w, h, x = _problem(n_in=100)  # 100 = 3 full groups + a partial one
    r = gptq_quantize(w, h, spec, act_order=act_order, static_groups=static, block_size=64)
    assert r.codes.dtype == torch.uint8 and int(r.codes.max()) <= spec.maxq
    assert r.scale.shape == r.zero.shape == (48, 4) and r.g_idx.shape == (100,) and r.g_idx.dtype == torch.int32
    # the dequantized weight is exactly the codes on their group's grid
    idx = r.g_idx.long()
    torch.testing.assert_close(r.dequantized, (r.codes.float() - r.zero[:, idx]) * r.scale[:, idx], rtol=0, atol=0)
    counts = torch.bincount(idx, minlength=4).tolist()
    assert counts == [32, 32, 32, 4]  # every group has group_size columns, the last is partial
    if not act_order or static:
        assert torch.equal(idx, torch.arange(100) // 32)
    else:  # groups are formed in descending-diag(H) order
        order = torch.argsort(torch.diag(h), descending=True)
        assert torch.equal(idx[order], torch.arange(100) // 32)
    rtn = dequantize(quantize(w, *compute_qparams(w, spec), spec), *compute_qparams(w, spec), spec)
    assert _output_error(x, w, r.dequantized) < 0.8 * _output_error(x, w, rtn)


def test_act_order_helps_on_outlier_channels():
    spec = QuantSpec(bits=3, group_size=-1)
    w, h, x = _problem(seed=3)
    plain = _output_error(x, w, gptq_quantize(w, h, spec).dequantized)
    ordered = _output_error(x, w, gptq_quantize(w, h, spec, act_order=True).dequantized)
    assert ordered < plain


def test_static_groups_use_grids_of_the_original_weight():
    spec = QuantSpec(bits=4, group_size=32)
    w, h, _ = _problem()
    r = gptq_quantize(w, h, spec, act_order=True, static_groups=True)
    scale, zero = compute_qparams(w, spec)
    torch.testing.assert_close(r.scale, scale)
    torch.testing.assert_close(r.zero, zero)


def test_dead_inputs_are_zeroed():
    w, h, _ = _problem()
    h[5, :] = 0
    h[:, 5] = 0
    r = gptq_quantize(w, h, QuantSpec(bits=4, group_size=32))
    assert torch.all(r.dequantized[:, 5] == 0)


def test_mse_clipping_is_used_for_the_grid():
    w, h, x = _problem()
    w[:, 0] *= 20  # one extreme column stretches every row's range
    plain = gptq_quantize(w, h, QuantSpec(bits=3))
    clipped = gptq_quantize(w, h, QuantSpec(bits=3, clip="mse"))
    assert not torch.equal(plain.scale, clipped.scale)


def test_hessian_clip_weighs_the_grid_search_by_the_hessian_diagonal():
    w, h, x = _problem()
    w[:, 0] *= 20
    spec = QuantSpec(bits=3, group_size=32, clip="mse")
    plain = gptq_quantize(w, h, spec, static_groups=True)
    weighted = gptq_quantize(w, h, spec, static_groups=True, hessian_clip=True)
    assert not torch.equal(plain.scale, weighted.scale)
    # static grids come from the original weight: each is the weighted search over its own columns
    for g in range(3):
        cols = slice(32 * g, 32 * (g + 1))
        row_spec = QuantSpec(bits=3, group_size=-1, clip="mse")
        s, z = compute_qparams(w[:, cols], row_spec, column_weights=torch.diag(h)[cols])
        assert torch.equal(weighted.scale[:, g : g + 1], s) and torch.equal(weighted.zero[:, g : g + 1], z)
    # a Hessian with an equal diagonal (a power of two: exact scaling) weighs every column alike: the plain grids
    h_eq = h.clone()
    h_eq.diagonal().fill_(2.0 ** math.ceil(math.log2(float(torch.diag(h).max()))))
    assert torch.equal(
        gptq_quantize(w, h_eq, spec, hessian_clip=True, act_order=True).codes,
        gptq_quantize(w, h_eq, spec, act_order=True).codes,
    )


def test_more_damping_when_the_hessian_is_not_positive_definite(caplog):
    w, h, _ = _problem()
    mean = torch.diag(h).mean()
    smallest = torch.linalg.eigvalsh(h)[0]
    bad = h - (smallest + 0.05 * mean) * torch.eye(h.shape[0])  # needs damp > 0.05
    r = gptq_quantize(w, bad, QuantSpec(bits=4))
    assert r.damp == pytest.approx(0.1)
    assert "retrying" in caplog.text
    with pytest.raises(QuantlmError, match="stayed singular"):
        gptq_quantize(w, -torch.eye(h.shape[0]), QuantSpec(bits=4))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"hessian": torch.eye(3)}, r"\[96, 96\] Hessian"),
        ({"spec": QuantSpec(bits=4, granularity="tensor")}, "per channel or per group"),
        ({"damp": 0.0}, "damp must be positive"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_bad_arguments(kwargs, message):
    w, h, _ = _problem()
    args = {"weight": w, "hessian": h, "spec": QuantSpec(bits=4)} | kwargs
    with pytest.raises(InvalidSpecError, match=message):
        gptq_quantize(args.pop("weight"), args.pop("hessian"), args.pop("spec"), **args)
