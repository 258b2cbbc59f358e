"""HQQ: the vectorised solver against a slow per-group loop, the RTN guard, the step, its checkpoint and its CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import quantlm
from conftest import VOCAB, byte_tokenizer, tiny_model
from quantlm.cli import app
from quantlm.core import QuantSpec, compute_qparams
from quantlm.errors import InvalidSpecError, QuantlmError
from quantlm.methods.hqq import HQQ, group_rows, hqq_quantize, hqq_quantize_many, hqq_solve
from quantlm.nn import QuantLinear
from quantlm.nn.qlinear import storage_scale_dtype, storage_zero_dtype


def _heavy(n_out, n_in, seed=0, scale=0.02, df=3.0):
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(n_out, n_in, generator=g)
    chi2 = torch.randn(n_out, n_in, int(df), generator=g).pow(2).sum(-1) / df  # Student-t with df degrees
    return normal / chi2.sqrt() * scale


def _spiky(n_out, n_in, seed=0, scale=0.02):
    """A Gaussian bulk with 1% of the weights 20x larger: the outliers set each group's range."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g)
    return torch.where(torch.rand(n_out, n_in, generator=g) < 0.01, 20 * w, w) * scale


# -- the slow, obvious version -----------------------------------------------------------------------------------
def _slow_group(w, s, z, maxq, iters, p, beta, kappa, optimize_scale):
    """One group (a 1-D tensor), one iteration at a time; returns the (s, z) of the lowest mean |error|."""
    best_err, best = math.inf, (s, z)
    for t in range(iters + 1):
        q = torch.clamp(torch.round(w / s + z), 0, maxq)
        err = (w - (q - z) * s).abs().mean().item()
        if not err < best_err:
            break
        best_err, best = err, (s, z)
        if t == iters:
            break
        e = w - (q - z) * s
        w_e = torch.sign(e) * torch.relu(e.abs() - e.abs() ** (p - 1) / beta)
        target = w - w_e
        slope = None
        if optimize_scale and len(set(q.tolist())) > 1:  # target ≈ slope · q + intercept
            a = torch.stack([q, torch.ones_like(q)], 1).double()
            slope, intercept = torch.linalg.lstsq(a, target.double().unsqueeze(1)).solution.squeeze(1).tolist()
        if slope is not None and slope > 0:
            s, z = torch.tensor(slope, dtype=torch.float32), torch.tensor(-intercept / slope, dtype=torch.float32)
        else:
            z = q.mean() - target.mean() / s
        beta *= kappa
    return best


def _slow_hqq(weight, spec, iters=20, p=0.7, beta=10.0, kappa=1.01, optimize_scale=False):
    """Every group on its own: RTN's grid as the start, the iterations, then RTN's grid where that is better."""
    n_out, n_in = weight.shape
    gs = spec.group_size if spec.granularity == "group" else n_in
    maxq = spec.maxq
    rtn_s, rtn_z = compute_qparams(weight, spec)
    groups = [(r, g, slice(g * gs, min((g + 1) * gs, n_in))) for r in range(n_out) for g in range(rtn_s.shape[1])]
    fitted = {}
    for r, g, cols in groups:
        w = weight[r, cols].float()
        s0 = rtn_s[r, g].to(storage_scale_dtype(rtn_s)).float()  # RTN's grid as stored
        fitted[r, g] = _slow_group(w, s0, rtn_z[r, g], maxq, iters, p, beta, kappa, optimize_scale)
    hqq_s = torch.tensor([[fitted[r, g][0] for g in range(rtn_s.shape[1])] for r in range(n_out)])
    hqq_z = torch.tensor([[fitted[r, g][1] for g in range(rtn_s.shape[1])] for r in range(n_out)])
    sd, zd = storage_scale_dtype(torch.cat([hqq_s, rtn_s])), storage_zero_dtype(hqq_z, spec.bits)
    codes = torch.zeros(n_out, n_in)
    scale, zero = torch.zeros_like(rtn_s), torch.zeros_like(rtn_s)
    rtn_groups = torch.zeros_like(rtn_s, dtype=torch.bool)
    for r, g, cols in groups:
        w = weight[r, cols].float()
        s_h, z_h = hqq_s[r, g].to(sd).float(), hqq_z[r, g].to(zd).float()
        s_r, z_r = rtn_s[r, g].to(sd).float(), rtn_z[r, g]
        q_h = torch.clamp(torch.round(w / s_h + z_h), 0, maxq)
        q_r = torch.clamp(torch.round(w / s_r) + z_r, 0, maxq)
        use_rtn = ((q_r - z_r) * s_r - w).pow(2).sum() < ((q_h - z_h) * s_h - w).pow(2).sum()
        codes[r, cols], scale[r, g], zero[r, g] = (q_r, s_r, z_r) if use_rtn else (q_h, s_h, z_h)
        rtn_groups[r, g] = use_rtn
    return codes, scale, zero, rtn_groups


SPECS = [
    QuantSpec(bits=2, group_size=16),
    QuantSpec(bits=3, group_size=32),
    QuantSpec(bits=3, group_size=24),  # 72 = 3 groups; 80 columns: a partial last group
    QuantSpec(bits=4, group_size=64),
    QuantSpec(bits=4, group_size=-1),  # per channel
    QuantSpec(bits=8, group_size=32),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("n_in", [80, 96])
@pytest.mark.parametrize("optimize_scale", [False, True])
def test_matches_the_slow_per_group_loop(spec, n_in, optimize_scale):
    w = _heavy(6, n_in, seed=n_in + spec.bits)
    r = hqq_quantize(w, spec, optimize_scale=optimize_scale)
    codes, scale, zero, rtn_groups = _slow_hqq(w, spec, optimize_scale=optimize_scale)
    # float sums in another order may flip a near-tie (an early stop, a guard decision) in a rare group; the mean
    # |error| is flat in z while no code changes, so such a flip moves z at no cost in the solver's objective
    group = spec.group_size if spec.group_size > 0 else n_in
    idx = torch.arange(n_in) // group
    slow = (codes - zero[:, idx]) * scale[:, idx]
    same_group = (r.zero.float() - zero).abs().le(1e-2) & (r.scale.float() - scale).abs().le(1e-3 * scale)
    assert same_group.float().mean() >= 0.9, (r.zero, zero)
    l1 = [_group_error(w, d, spec, power=1) for d in (slow, r.dequantized)]
    torch.testing.assert_close(l1[1], l1[0], rtol=0.02, atol=1e-7)
    assert (r.rtn_groups == rtn_groups).float().mean() >= 0.9


def test_result_is_the_stored_layer():
    spec = QuantSpec(bits=3, group_size=32)
    w = _heavy(12, 100)  # 3 full groups and a partial one
    r = hqq_quantize(w, spec)
    assert r.codes.dtype == torch.uint8 and r.codes.shape == (12, 100) and int(r.codes.max()) <= spec.maxq
    assert r.scale.shape == r.zero.shape == r.rtn_groups.shape == (12, 4)
    assert r.scale.dtype == torch.float16 and r.zero.dtype == r.zero_dtype == torch.float16
    idx = torch.arange(100) // 32
    expected = (r.codes.float() - r.zero.float()[:, idx]) * r.scale.float()[:, idx]
    torch.testing.assert_close(r.dequantized, expected, rtol=0, atol=0)
    assert r.error == pytest.approx(((r.dequantized - w).norm() / w.norm()).item(), rel=1e-6)
    assert not torch.equal(r.zero.float(), r.zero.float().round())  # float zeros, not integers
    layer = QuantLinear.from_codes(r.codes, r.scale, r.zero, spec, zero_dtype=r.zero_dtype)
    torch.testing.assert_close(layer.dequantize_weight(), r.dequantized, rtol=0, atol=0)


def test_padding_of_a_partial_group_moves_nothing():
    w = _heavy(8, 100, seed=3)
    whole = hqq_quantize(w, QuantSpec(bits=3, group_size=32))
    alone = hqq_quantize(w[:, 96:], QuantSpec(bits=3, group_size=-1))  # the last 4 columns as their own rows
    torch.testing.assert_close(whole.zero[:, 3:].float(), alone.zero.float(), rtol=0, atol=2e-3)
    torch.testing.assert_close(whole.scale[:, 3:], alone.scale)
    assert torch.equal(whole.codes[:, 96:], alone.codes)


def _group_error(w, q, spec, power=2):
    """Sum of |error|^power of each group [out, n_groups] (a partial last group padded with exact zeros)."""
    n_out, n_in = w.shape
    gs = spec.group_size if spec.granularity == "group" else n_in
    pad = -n_in % gs
    d = torch.nn.functional.pad((q.float() - w.float()).abs() ** power, (0, pad))
    return d.reshape(n_out, -1, gs).sum(-1)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 70),
    group_size=st.sampled_from([-1, 3, 8, 16, 32]),
    bits=st.integers(2, 8),
    magnitude=st.sampled_from([1e-3, 0.02, 1.0, 30.0]),
    optimize_scale=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_never_worse_than_rtn_on_any_group(rows, cols, group_size, bits, magnitude, optimize_scale, seed):
    spec = QuantSpec(bits=bits, group_size=group_size)
    w = _heavy(rows, cols, seed=seed, scale=magnitude)
    w[0, 0] = 0.0 if seed % 3 == 0 else w[0, 0]  # an exact zero now and then
    r = hqq_quantize(w, spec, optimize_scale=optimize_scale)
    rtn = QuantLinear.from_weight(w, spec).dequantize_weight()
    hqq, base = _group_error(w, r.dequantized, spec), _group_error(w, rtn, spec)
    assert bool((hqq <= base * (1 + 1e-5) + 1e-30).all()), (hqq - base).max()
    assert r.error <= ((rtn - w).norm() / w.norm().clamp_min(1e-30)).item() * (1 + 1e-5) + 1e-12


@settings(max_examples=20, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 70)), min_size=1, max_size=4),
    group_size=st.sampled_from([-1, 8, 16]),
    bits=st.sampled_from([2, 3, 4, 8]),
    chunk_bits=st.integers(4, 12),
    seed=st.integers(0, 2**16),
)
def test_solving_weights_together_gives_each_its_own_result(shapes, group_size, bits, chunk_bits, seed):
    """Groups are solved independently: batching weights (another set of rows, other chunks, other late iterations)
    changes no grid, code or guard decision."""
    from quantlm.methods import hqq

    spec = QuantSpec(bits=bits, group_size=group_size)
    weights = [_heavy(r, c, seed=seed + i, scale=0.02 * (i + 1)) for i, (r, c) in enumerate(shapes)]
    alone = [hqq_quantize(w, spec) for w in weights]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hqq, "SOLVE_CHUNK_ELEMENTS", 1 << chunk_bits)
        together = hqq_quantize_many(weights, spec)
    for a, b in zip(alone, together):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
        assert torch.equal(a.rtn_groups, b.rtn_groups)
        assert b.error == pytest.approx(a.error, rel=1e-6)  # a sum over differently aligned memory


def test_the_unguarded_solver_misses_the_bulk_at_3_bits():
    """The measurements behind the guard (module docstring), on a smaller matrix."""
    spec = QuantSpec(bits=3, group_size=64)
    w = _spiky(64, 256)

    def unguarded_sse_over_rtn(w, iters):
        W, mask = group_rows(w, spec)
        s, z = (t.reshape(-1, 1) for t in compute_qparams(w, spec))
        rtn = ((torch.clamp(torch.round(W / s) + z, 0, spec.maxq) - z) * s - W).pow(2)
        z0 = -W.amin(1, keepdim=True).clamp(max=0) / s  # the float zero of the min/max grid
        s_h, z_h = hqq_solve(W, mask, s, z0, spec.maxq, iters=iters, optimize_scale=False)[:2]
        hqq = ((torch.clamp(torch.round(W / s_h + z_h), 0, spec.maxq) - z_h) * s_h - W).pow(2)
        bulk = W.abs() < s / 2  # within half a step of 0, where RTN's integer zero puts a grid point
        return (hqq.sum() / rtn.sum()).item(), ((hqq - rtn) * bulk).sum().item() / (hqq - rtn).sum().item()

    start, on_bulk = unguarded_sse_over_rtn(w, 0)
    assert start > 1.8 and on_bulk > 0.9  # the min/max grid with a float zero misses the bulk around 0
    small, _ = unguarded_sse_over_rtn(w, 20)  # bulk std 0.02: the shrink is total, full least-squares z steps
    large, _ = unguarded_sse_over_rtn(w * 50, 20)  # errors past the shrink threshold: z creeps
    assert small < 1.2 and large > 1.4
    for scale in (1, 50):  # hqq_quantize starts from RTN's grid instead, and keeps RTN's where that is better
        r = hqq_quantize(w * scale, spec, integer_zero=False)
        assert not r.rtn_groups.all()
        assert (
            r.error
            < QuantLinear.from_weight(w * scale, spec).dequantize_weight().sub(w * scale).norm().item()
            / (w * scale).norm().item()
        )


def test_optimize_scale_fits_scales_too():
    spec = QuantSpec(bits=3, group_size=32)
    w = _heavy(16, 128, seed=5)
    plain, fitted = hqq_quantize(w, spec, optimize_scale=False), hqq_quantize(w, spec)
    assert torch.equal(plain.scale, compute_qparams(w, spec)[0].half())  # without it: RTN's scales
    assert not torch.equal(fitted.scale, plain.scale)
    assert fitted.error < plain.error


@pytest.mark.parametrize("optimize_scale", [False, True])
def test_zero_iterations_is_rtn(optimize_scale):
    spec = QuantSpec(bits=4, group_size=16)
    w = _heavy(4, 64, seed=2)
    r = hqq_quantize(w, spec, iters=0, optimize_scale=optimize_scale)
    assert torch.equal(r.dequantized, QuantLinear.from_weight(w, spec).dequantize_weight())
    assert r.iterations == 0 and hqq_quantize(w, spec).iterations > 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"spec": QuantSpec(bits=4, symmetric=True)}, "symmetric=False"),
        ({"spec": QuantSpec(bits=4, clip="mse")}, "clip='none'"),
        ({"spec": QuantSpec(bits=4, codebook="nf4")}, "codebook"),
        ({"spec": QuantSpec(bits=4, granularity="tensor")}, "per channel or per group"),
        ({"iters": -1}, "iters"),
        ({"lp_norm": 0.0}, "lp_norm"),
        ({"kappa": 0.5}, "kappa"),
        ({"zero_point": "half"}, "zero_point"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(InvalidSpecError, match=message):
        HQQ(**kwargs)


def test_bad_weights_are_refused():
    with pytest.raises(QuantlmError, match="NaN"):
        hqq_quantize(torch.tensor([[1.0, float("nan")]]), QuantSpec(bits=4))
    with pytest.raises(InvalidSpecError, match="2-D"):
        hqq_quantize(torch.ones(3), QuantSpec(bits=4))


def _logits(model):
    ids = torch.randint(0, VOCAB - 4, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_tiny_model_end_to_end_and_float_zeros_survive_save_and_load(tmp_path):
    model = tiny_model("llama")
    reference = _logits(model)
    step = HQQ(QuantSpec(bits=3, group_size=16), iters=10, zero_point="float", exclude=("*.o_proj",))
    quantlm.quantize(model, step, progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 3 * 6 and not any(n.endswith("o_proj") for n in layers)
    assert all(m.zeros.dtype == torch.float16 for m in layers.values())
    assert torch.isfinite(_logits(model)).all() and not torch.equal(_logits(model), reference)
    log = model.quantlm_record.log
    assert all(r["method"] == "hqq" and r["error"] > 0 for r in log)
    assert all(0 <= r["details"]["rtn_groups"] < r["details"]["groups"] for r in log)
    assert log[0]["details"]["spec"] == layers[log[0]["module"]].describe()

    quantlm.save(model, tmp_path / "ckpt", tokenizer=byte_tokenizer())
    loaded = quantlm.load(tmp_path / "ckpt")
    for name, layer in layers.items():
        stored = loaded.get_submodule(name)
        assert stored.zeros.dtype == torch.float16 and torch.equal(stored.zeros, layer.zeros)
        assert torch.equal(stored.dequantize_weight(), layer.dequantize_weight())
    torch.testing.assert_close(_logits(loaded), _logits(model))
    recipe = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]["recipe"]
    assert recipe[0]["method"] == "hqq" and recipe[0]["iters"] == 10 and recipe[0]["exclude"] == ["*.o_proj"]


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli(tiny_model_dir, tmp_path):
    sym = _run("quantize", tiny_model_dir, "--method", "hqq", "--sym", "--out", tmp_path / "s")
    lines = sym.stderr.strip().splitlines()
    assert sym.exit_code == 2 and len(lines) == 1 and "drop --sym" in lines[0], sym.output
    assert not (tmp_path / "s").exists()
    out = tmp_path / "q"
    args = ("--method", "hqq", "--bits", 4, "--group-size", 16, "--hqq-iters", 5, "--optimize-scale")
    result = _run("quantize", tiny_model_dir, *args, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    step = json.loads(result.stdout)["recipe"][0]
    assert step["method"] == "hqq" and step["iters"] == 5 and step["optimize_scale"] is True


@pytest.mark.parametrize("bits,integer", [(2, True), (3, True), (4, False), (8, False)])
def test_auto_zero_points_are_integers_below_4_bits(bits, integer):
    step = HQQ(QuantSpec(bits=bits, group_size=16))
    assert step.integer_zero is integer and ("integer-zero" in step.describe()) is integer
    assert HQQ(QuantSpec(bits=bits, group_size=16), zero_point="float").integer_zero is False
    assert HQQ(QuantSpec(bits=bits, group_size=16), zero_point="integer").integer_zero is True


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.sampled_from([2, 3, 4]), st.floats(1e-3, 30.0), st.integers(0, 2**16))
def test_integer_zeros_from_the_clipped_start_never_lose_to_either_rtn_grid(rows, bits, magnitude, seed):
    w = _spiky(rows, 64, seed=seed, scale=magnitude)
    spec = QuantSpec(bits=bits, group_size=16)
    r = hqq_quantize(w, spec, integer_zero=True, clipped_start=True, optimize_scale=True)
    assert r.zero.dtype == torch.uint8 and torch.equal(r.zero.float(), r.zero.float().round())

    def group_sse(q):
        return ((q - w) ** 2).reshape(rows, -1, 16).sum(-1)

    hqq_sse = group_sse(r.dequantized)
    for grid in (spec, dataclasses.replace(spec, clip="mse")):
        rtn = QuantLinear.from_weight(w, grid).dequantize_weight()
        assert bool((hqq_sse <= group_sse(rtn) * (1 + 1e-5) + 1e-12).all())
