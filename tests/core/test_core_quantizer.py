"""Quantization numerics: GPTQ-reference grid, round trip bounds, mse clipping, STE gradients, edge cases.

Expected values are computed here independently (float64 per-unit loops, or by hand), never by calling the
function under test on the same input.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from quantlm.core import (
    QuantizedTensor,
    QuantSpec,
    compute_qparams,
    dequantize,
    expand_to_columns,
    fake_quantize,
    quantize,
    quantize_tensor,
)
from quantlm.errors import QuantlmError

F32_TINY = torch.finfo(torch.float32).tiny
LIMIT = float(torch.tensor(1e30, dtype=torch.float32))  # 1e30 rounded to float32 (hypothesis needs exact bounds)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GRANULARITIES = ["tensor", "channel", "group", "token"]


# ---------------------------------------------------------------------------------------------- strategies
@st.composite
def specs(draw, clip=None, bits=None):
    b = draw(st.integers(2, 8)) if bits is None else bits
    gran = draw(st.sampled_from(GRANULARITIES))
    gs = draw(st.integers(1, 9)) if gran == "group" else -1
    c = draw(st.sampled_from(["none", "mse"])) if clip is None else clip
    return QuantSpec(bits=b, symmetric=draw(st.booleans()), group_size=gs, granularity=gran, clip=c)


@st.composite
def matrices(draw, max_rows=4, max_cols=24):
    rows = draw(st.integers(1, max_rows))
    n = draw(st.integers(1, max_cols))
    kind = draw(
        st.sampled_from(["elements", "normal", "positive", "negative", "constant", "zero_rows", "sparse", "outlier"])
    )
    if kind == "elements":
        vals = draw(
            st.lists(
                st.floats(-LIMIT, LIMIT, width=32, allow_nan=False, allow_infinity=False),
                min_size=rows * n,
                max_size=rows * n,
            )
        )
        return torch.tensor(vals, dtype=torch.float32).reshape(rows, n)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mag = 10.0 ** draw(st.integers(-30, 30))
    x = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    if kind == "positive":
        x = x.abs()
    elif kind == "negative":
        x = -x.abs()
    elif kind == "constant":
        x = x[:, :1].expand(rows, n) * (torch.rand(rows, 1, generator=gen, dtype=torch.float64) < 0.7)
    elif kind == "zero_rows":
        x = x * (torch.rand(rows, 1, generator=gen, dtype=torch.float64) < 0.5)
    elif kind == "sparse":
        x = x * (torch.rand(rows, n, generator=gen, dtype=torch.float64) < 0.3)
    elif kind == "outlier":
        x = x.clone()
        x[0, draw(st.integers(0, n - 1))] *= 1000.0
    return (x * mag).to(torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------- reference helpers
def units_of(x2, spec):
    """[(qparam_row, qparam_col, column indices, values as float64 list)] in qparam layout (independent of the code)."""
    rows, n = x2.shape
    xd = x2.double()
    if spec.granularity == "tensor":
        return [(0, 0, None, xd.flatten().tolist())]
    if spec.granularity in ("channel", "token"):
        return [(r, 0, None, xd[r].tolist()) for r in range(rows)]
    out = []
    gs = spec.group_size
    for r in range(rows):
        for g, start in enumerate(range(0, n, gs)):
            out.append((r, g, (start, min(start + gs, n)), xd[r, start : start + gs].tolist()))
    return out


def reference_range(vals, spec):
    xmin = min(min(vals), 0.0)
    xmax = max(max(vals), 0.0)
    if spec.symmetric:
        xmax = max(-xmin, xmax)
        xmin = -xmax
    if xmin == 0.0 and xmax == 0.0:
        xmin, xmax = -1.0, 1.0
    return xmin, xmax


def per_element(t, x2, spec):
    """Expand a qparam tensor to one value per element of x2 with plain indexing (float64)."""
    rows, n = x2.shape
    t = t.double()
    out = torch.empty(rows, n, dtype=torch.float64)
    for r in range(rows):
        for c in range(n):
            if spec.granularity == "tensor":
                out[r, c] = t[0, 0]
            elif spec.granularity == "group":
                out[r, c] = t[r, c // spec.group_size]
            else:
                out[r, c] = t[r, 0]
    return out


def norm24(diff):
    return float((diff.abs() ** 2.4).sum())


# ---------------------------------------------------------------------------------------------- grid properties
@given(matrices(), specs(clip="none"))
@SETTINGS
def test_unclipped_grid_matches_reference_and_round_trip_is_within_half_step(x, spec):
    scale, zero = compute_qparams(x, spec)
    rows, n = x.shape
    assert scale.dtype == torch.float32 and zero.dtype == torch.float32
    assert scale.shape == zero.shape == spec.qparams_shape(rows, n)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    assert bool((zero == zero.round()).all()) and bool((zero >= 0).all()) and bool((zero <= spec.maxq).all())

    for r, g, _, vals in units_of(x, spec):
        xmin, xmax = reference_range(vals, spec)
        want = max((xmax - xmin) / spec.maxq, F32_TINY)  # scale floor: smallest normal float32 (documented)
        got = float(scale[r, g])
        assert math.isclose(got, want, rel_tol=1e-6), (r, g, got, want)
        if spec.symmetric:
            assert float(zero[r, g]) == 2 ** (spec.bits - 1)
        else:
            assert abs(float(zero[r, g]) - (-xmin / got)) <= 0.5 + 1e-4

    codes = quantize(x, scale, zero, spec)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert int(codes.max()) <= spec.maxq
    s_e, z_e = per_element(scale, x, spec), per_element(zero, x, spec)
    dq_ref = (codes.double() - z_e) * s_e
    err = (x.double() - dq_ref).abs()
    assert bool((err <= s_e * (0.5 + 1e-4)).all()), float((err / s_e).max())
    dq = dequantize(codes, scale, zero, spec)
    assert dq.dtype == torch.float32 and dq.shape == x.shape
    assert torch.allclose(dq.double(), dq_ref, rtol=1e-6, atol=0.0)


@given(matrices(), specs(), st.data())
@SETTINGS
def test_zero_is_exactly_representable(x, spec, data):
    x = x.clone()
    r = data.draw(st.integers(0, x.shape[0] - 1))
    c = data.draw(st.integers(0, x.shape[1] - 1))
    x[r, c] = 0.0
    scale, zero = compute_qparams(x, spec)
    codes = quantize(x, scale, zero, spec)
    z_e = per_element(zero, x, spec)
    assert int(codes[r, c]) == int(z_e[r, c])
    assert float(dequantize(codes, scale, zero, spec)[r, c]) == 0.0


@given(matrices(), specs(clip="mse"))
@SETTINGS
def test_mse_in_range_values_within_half_step_and_scale_is_shrunk(x, spec):
    scale, zero = compute_qparams(x, spec)
    scale0, _ = compute_qparams(x, unclipped(spec))
    assert bool((scale <= scale0 * (1 + 1e-6)).all())
    assert bool((scale >= scale0 * 0.21 * (1 - 1e-5)).all())
    codes = quantize(x, scale, zero, spec)
    assert int(codes.max()) <= spec.maxq
    s_e, z_e = per_element(scale, x, spec), per_element(zero, x, spec)
    t = x.double() / s_e + z_e
    inside = (t >= -0.5 + 1e-3) & (t <= spec.maxq + 0.5 - 1e-3)
    err = (x.double() - (codes.double() - z_e) * s_e).abs()
    assert bool((err[inside] <= s_e[inside] * (0.5 + 1e-4)).all())


def unit_err(vals, s, z, maxq, weights=None):
    """Norm-2.4 error of one unit quantized with (s, z), each element's term times its weight (default 1); codes
    in float32 like the spec, error in float64."""
    v32 = torch.tensor(vals, dtype=torch.float32)
    s32 = torch.tensor(s, dtype=torch.float32)
    q = torch.clamp(torch.round(v32 / s32) + z, 0, maxq)
    diff = v32.double() - (q.double() - z) * float(s32)
    if weights is None:
        return norm24(diff)
    return float(((diff.abs() ** 2.4) * torch.tensor(weights, dtype=torch.float64)).sum())


def brute_force_mse(vals, spec, weights=None):
    """Best (error, p) over the GPTQ shrink grid p = 1 - i/100, i = 0..79, computed one p at a time."""
    maxq = spec.maxq
    xmin, xmax = reference_range(vals, spec)
    lo32 = torch.tensor(xmin, dtype=torch.float32)
    hi32 = torch.tensor(xmax, dtype=torch.float32)
    best = (math.inf, None)
    for i in range(80):
        p = 1 - i / 100
        lo, hi = p * lo32, p * hi32
        s = torch.clamp((hi - lo) / maxq, min=F32_TINY)
        z = float(2 ** (spec.bits - 1)) if spec.symmetric else float(torch.round(-lo / s).clamp(0, maxq))
        e = unit_err(vals, float(s), z, maxq, weights)
        if e < best[0]:
            best = (e, p)
    return best


def unclipped(spec):
    return QuantSpec(bits=spec.bits, symmetric=spec.symmetric, group_size=spec.group_size, granularity=spec.granularity)


@given(matrices(max_rows=3, max_cols=20), specs(clip="mse"))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mse_choice_is_best_of_the_shrink_grid_and_never_worse_than_no_clip(x, spec):
    scale, zero = compute_qparams(x, spec)
    scale0, zero0 = compute_qparams(x, unclipped(spec))
    for r, g, _, vals in units_of(x, spec):
        chosen = unit_err(vals, float(scale[r, g]), float(zero[r, g]), spec.maxq)
        plain = unit_err(vals, float(scale0[r, g]), float(zero0[r, g]), spec.maxq)
        best, _ = brute_force_mse(vals, spec)
        unit = float(scale0[r, g]) ** 2.4 * len(vals)
        assert chosen <= plain * (1 + 1e-5) + 1e-9 * unit
        assert chosen <= best * (1 + 1e-4) + 1e-9 * unit


# ---------------------------------------------------------------------------------------------- weighted mse
def unit_weights_of(weights, x2, spec):
    """Per-unit column weights (float64 lists) in the order of ``units_of``."""
    rows, n = x2.shape
    wd = weights.double().tolist()
    if spec.granularity == "tensor":
        return [wd * rows]
    if spec.granularity in ("channel", "token"):
        return [wd for _ in range(rows)]
    return [wd[start : start + spec.group_size] for _ in range(rows) for start in range(0, n, spec.group_size)]


@given(matrices(max_rows=3, max_cols=20), specs(clip="mse"), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_weighted_mse_choice_is_best_of_the_shrink_grid_for_the_weighted_error(x, spec, seed):
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(x.shape[1], generator=g) * 10 ** torch.randint(-3, 4, (x.shape[1],), generator=g).float()
    scale, zero = compute_qparams(x, spec, column_weights=weights)
    scale_u, zero_u = compute_qparams(x, spec)
    for (r, gi, _, vals), wts in zip(units_of(x, spec), unit_weights_of(weights, x, spec)):
        chosen = unit_err(vals, float(scale[r, gi]), float(zero[r, gi]), spec.maxq, wts)
        uniform = unit_err(vals, float(scale_u[r, gi]), float(zero_u[r, gi]), spec.maxq, wts)
        best, _ = brute_force_mse(vals, spec, wts)
        unit = float(scale_u[r, gi]) ** 2.4 * len(vals) * max(wts + [1e-30])
        assert chosen <= uniform * (1 + 1e-4) + 1e-9 * unit
        assert chosen <= best * (1 + 1e-4) + 1e-9 * unit


@given(matrices(), specs(clip="mse"), st.integers(0, 10))
@SETTINGS
def test_equal_column_weights_give_the_unweighted_grid(x, spec, k):
    # a power of two scales every candidate's error exactly, so not even a float tie can move the choice
    scale, zero = compute_qparams(x, spec)
    scale_w, zero_w = compute_qparams(x, spec, column_weights=torch.full((x.shape[1],), 2.0**k))
    assert torch.equal(scale, scale_w) and torch.equal(zero, zero_w)


def test_column_weights_steer_the_clip_toward_the_heavy_column():
    # one row: a large value in column 0 and small ones elsewhere; plain mse clips column 0, a heavy weight
    # on column 0 widens the range until it is (nearly) exact
    x = torch.tensor([[4.0] + [0.1 * (i % 7 - 3) for i in range(63)]])
    spec = QuantSpec(bits=3, clip="mse")
    s_plain, _ = compute_qparams(x, spec)
    heavy = torch.ones(64)
    heavy[0] = 1e4
    s_heavy, z_heavy = compute_qparams(x, spec, column_weights=heavy)
    assert float(s_heavy[0, 0]) > float(s_plain[0, 0])
    z_plain = compute_qparams(x, spec)[1]
    err_plain = (dequantize(quantize(x, s_plain, z_plain, spec), s_plain, z_plain, spec) - x)[0, 0].abs()
    err_heavy = (dequantize(quantize(x, s_heavy, z_heavy, spec), s_heavy, z_heavy, spec) - x)[0, 0].abs()
    assert float(err_heavy) < float(err_plain) / 10


@pytest.mark.parametrize(
    "weights, match",
    [
        (torch.ones(3), "one weight per column"),
        (torch.ones(4, 1), "one weight per column"),
        (torch.tensor([1.0, -1.0, 1.0, 1.0]), "non-negative"),
        (torch.tensor([1.0, float("nan"), 1.0, 1.0]), "finite"),
    ],
)
def test_bad_column_weights_are_one_line_errors(weights, match):
    with pytest.raises(QuantlmError, match=match):
        compute_qparams(torch.randn(2, 4), QuantSpec(bits=4, clip="mse"), column_weights=weights)


@pytest.mark.parametrize("sym, best_p", [(False, 0.45), (True, 0.21)])
def test_mse_deep_shrink_reaches_end_of_grid(sym, best_p):
    # one outlier and many small values: the best 2-bit grid clips hard (p = 0.21 is the grid's last point)
    row = [1.0] + torch.linspace(-0.15, 0.15, 301).tolist()
    x = torch.tensor([row])
    spec = QuantSpec(bits=2, symmetric=sym, clip="mse")
    ref_err, ref_p = brute_force_mse(row, spec)
    assert math.isclose(ref_p, best_p, abs_tol=1e-9)  # the data really needs a deep shrink
    scale, zero = compute_qparams(x, spec)
    scale0, _ = compute_qparams(x, unclipped(spec))
    assert math.isclose(float(scale) / float(scale0), best_p, rel_tol=1e-5)
    assert math.isclose(unit_err(row, float(scale), float(zero), spec.maxq), ref_err, rel_tol=1e-6)


def test_mse_ties_keep_the_unclipped_grid():
    # every shrink factor gives error 0 on an all-zero row, and p = 1 is already exact on a row that sits on
    # the grid: ties must keep the first (unclipped) candidate, like the GPTQ reference's strict `<`.
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 1.0, 2.0]])
    spec = QuantSpec(bits=2, clip="mse")
    scale, zero = compute_qparams(x, spec)
    assert math.isclose(float(scale[0, 0]), 2 / 3, rel_tol=1e-6)  # all-zero fallback range [-1, 1]
    assert scale[1].tolist() == [1.0] and zero[1].tolist() == [1.0]


def test_mse_clips_gaussian_rows():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 512, generator=gen)
    for bits in (2, 3):
        for sym in (False, True):
            spec = QuantSpec(bits=bits, symmetric=sym, clip="mse")
            plain = QuantSpec(bits=bits, symmetric=sym)
            s_mse, z_mse = compute_qparams(x, spec)
            s0, z0 = compute_qparams(x, plain)
            assert bool((s_mse < s0 * 0.95).all()), (bits, sym)
            e_mse = ((x - dequantize(quantize(x, s_mse, z_mse, spec), s_mse, z_mse, spec)).abs() ** 2.4).sum(1)
            e0 = ((x - dequantize(quantize(x, s0, z0, plain), s0, z0, plain)).abs() ** 2.4).sum(1)
            assert bool((e_mse < e0).all())


# ---------------------------------------------------------------------------------------------- hand-checked values
def test_symmetric_4bit_by_hand():
    # xmax = max(|-1|, 1) = 1 -> scale = 2*1/15, zero = (15+1)/2 = 8.
    # float32(2/15) = 0.13333334028720856 is slightly ABOVE 2/15, so -1/scale = -7.4999995 (not -7.5):
    #   -1   -> round(-7.4999995) = -7 -> code 1  -> dequant (1-8)*s  = -14/15
    #   0.5  -> 3.7499998 -> 4        -> code 12 -> 4*s = 8/15
    #   0.25 -> 1.8749999 -> 2        -> code 10 -> 2*s = 4/15
    #   1    -> 7.4999995 -> 7        -> code 15 -> 7*s = 14/15
    x = torch.tensor([[-1.0, 0.5, 0.25, 1.0]])
    spec = QuantSpec(bits=4, symmetric=True)
    scale, zero = compute_qparams(x, spec)
    assert scale.shape == (1, 1) and float(scale) == float(torch.tensor(2 / 15, dtype=torch.float32))
    assert float(zero) == 8.0
    codes = quantize(x, scale, zero, spec)
    assert codes.tolist() == [[1, 12, 10, 15]]
    dq = dequantize(codes, scale, zero, spec)
    assert torch.allclose(dq, torch.tensor([[-14 / 15, 8 / 15, 4 / 15, 14 / 15]]), rtol=1e-6, atol=0)


def test_symmetric_all_positive_row_is_centered_on_zero():
    # all >= 0: xmax = 3, xmin = -3 (NOT 0 as in the GPTQ reference quirk) -> scale = 6/15 = 0.4, zero = 8.
    # float32(0.4) = 0.4000000059604645: 1/s = 2.4999999 rounds (float32) to 2.5 -> half-even 2 -> code 10;
    # 2/s -> 5 -> 13; 3/s -> 7.5 -> 8 -> 16 -> clamped to 15.
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    spec = QuantSpec(bits=4, symmetric=True)
    scale, zero = compute_qparams(x, spec)
    assert float(scale) == float(torch.tensor(0.4, dtype=torch.float32)) and float(zero) == 8.0
    assert quantize(x, scale, zero, spec).tolist() == [[8, 10, 13, 15]]


def test_asymmetric_by_hand_round_half_to_even():
    # 2-bit: xmin=-1, xmax=2 -> scale=(2+1)/3=1, zero=round(1)=1; 0.5 -> round(0.5)=0 (half to even) -> code 1
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    spec = QuantSpec(bits=2)
    scale, zero = compute_qparams(x, spec)
    assert scale.tolist() == [[1.0]] and zero.tolist() == [[1.0]]
    codes = quantize(x, scale, zero, spec)
    assert codes.tolist() == [[0, 1, 1, 3]]
    assert dequantize(codes, scale, zero, spec).tolist() == [[-1.0, 0.0, 0.0, 2.0]]
    # 3-bit: range [0, 7] -> scale 1, zero 0; 0.5->0, 1.5->2, 2.5->2, 7->7
    x = torch.tensor([[0.5, 1.5, 2.5, 7.0]])
    spec = QuantSpec(bits=3)
    scale, zero = compute_qparams(x, spec)
    assert scale.tolist() == [[1.0]] and zero.tolist() == [[0.0]]
    assert quantize(x, scale, zero, spec).tolist() == [[0, 2, 2, 7]]


def test_partial_last_group_by_hand():
    # 2-bit asym, group_size 2 over 5 columns -> 3 groups, the last holds one column.
    # [1,-1]: xmin -1, xmax 1 -> scale 2/3, zero round(1.5) = 2
    # [4, 0]: xmin 0, xmax 4  -> scale 4/3, zero 0
    # [-3]  : xmin -3, xmax 0 -> scale 1,   zero 3
    x = torch.tensor([[1.0, -1.0, 4.0, 0.0, -3.0]])
    spec = QuantSpec(bits=2, group_size=2)
    scale, zero = compute_qparams(x, spec)
    assert scale.shape == (1, 3)
    assert torch.allclose(scale, torch.tensor([[2 / 3, 4 / 3, 1.0]]), rtol=1e-6, atol=0)
    assert zero.tolist() == [[2.0, 0.0, 3.0]]
    assert not any(math.copysign(1.0, z) < 0 for z in zero.flatten().tolist())  # no -0.0 zero points
    # codes: 1/(2/3)=1.5->2 (+2=4 -> clamp 3); -1.5->-2 (+2=0); 4/(4/3)=3; 0->0; -3->-3+3=0
    assert quantize(x, scale, zero, spec).tolist() == [[3, 0, 3, 0, 0]]


def test_per_tensor_by_hand():
    # xmin=-4, xmax=2 over the whole tensor -> scale 6/15 = 0.4, zero = round(4/0.4) = 10
    x = torch.tensor([[1.0, 2.0], [-4.0, 0.0]])
    spec = QuantSpec(bits=4, granularity="tensor")
    scale, zero = compute_qparams(x, spec)
    assert scale.shape == (1, 1) and math.isclose(float(scale), 0.4, rel_tol=1e-6)
    assert float(zero) == 10.0
    # 1/0.4=2.5->2 (half even)->12, 2/0.4=5->15, -4/0.4=-10->0, 0->10
    assert quantize(x, scale, zero, spec).tolist() == [[12, 15], [0, 10]]


@pytest.mark.parametrize("sym", [False, True])
def test_all_zero_and_constant_rows(sym):
    # all-zero row: xmin, xmax := -1, +1 -> scale 2/15; asym zero = round(1/scale) = round(7.4999995) = 7,
    # sym zero = 8. Constant negative row [-2,-2]: asym xmin=-2, xmax=0 -> scale 2/15, zero round(15)=15.
    x = torch.tensor([[0.0, 0.0, 0.0], [-2.0, -2.0, -2.0], [3.0, 3.0, 3.0]])
    spec = QuantSpec(bits=4, symmetric=sym)
    scale, zero = compute_qparams(x, spec)
    assert math.isclose(float(scale[0, 0]), 2 / 15, rel_tol=1e-6)
    assert float(zero[0, 0]) == (8.0 if sym else 7.0)
    dq = dequantize(quantize(x, scale, zero, spec), scale, zero, spec)
    assert dq[0].tolist() == [0.0, 0.0, 0.0]
    if sym:
        assert math.isclose(float(scale[1, 0]), 4 / 15, rel_tol=1e-6)
        assert math.isclose(float(scale[2, 0]), 6 / 15, rel_tol=1e-6)
    else:
        assert math.isclose(float(scale[1, 0]), 2 / 15, rel_tol=1e-6) and float(zero[1, 0]) == 15.0
        assert math.isclose(float(scale[2, 0]), 3 / 15, rel_tol=1e-6) and float(zero[2, 0]) == 0.0
        # constant rows sit exactly on a grid end point
        assert torch.allclose(dq[1:], x[1:], rtol=1e-6, atol=0)
    err = (dq - x).abs()
    assert bool((err <= scale * (0.5 + 1e-5)).all())


# ---------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("mag", [1e30, 1e-30, 2e38])  # 2e38: xmax - xmin overflows float32
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4),
        QuantSpec(bits=3, symmetric=True, group_size=3),
        QuantSpec(bits=8, granularity="tensor", clip="mse"),
    ],
)
def test_huge_and_tiny_values(mag, spec):
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0, -1.0], [0.1, 0.2, 0.3, 0.4, 0.5]], dtype=torch.float64) * mag
    x = x.to(torch.float32)
    assert bool(torch.isfinite(x).all())
    scale, zero = compute_qparams(x, spec)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    codes = quantize(x, scale, zero, spec)
    dq = dequantize(codes, scale, zero, spec)
    assert bool(torch.isfinite(dq).all())
    s_e = per_element(scale, x, spec)
    z_e = per_element(zero, x, spec)
    t = x.double() / s_e + z_e
    inside = (t >= -0.5 + 1e-3) & (t <= spec.maxq + 0.5 - 1e-3)
    if spec.clip == "none":  # nothing is clipped: every element is within half a step
        inside = torch.ones_like(inside)
    err = (x.double() - (codes.double() - z_e) * s_e).abs()
    assert bool((err[inside] <= s_e[inside] * (0.5 + 1e-4)).all())
    assert float(dq[0, 3]) == 0.0


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=8, symmetric=True), QuantSpec(bits=2, clip="mse")])
def test_subnormal_range_gets_a_usable_scale(spec):
    # range 1.4e-45 / maxq underflows to 0 in float32; the scale is floored at the smallest normal float32
    x = torch.tensor([[1.4e-45, 0.0, -2.8e-45], [0.0, 0.0, 1e-40]])
    scale, zero = compute_qparams(x, spec)
    assert bool((scale >= F32_TINY).all()) and bool(torch.isfinite(scale).all())
    codes = quantize(x, scale, zero, spec)
    assert int(codes.max()) <= spec.maxq
    dq = dequantize(codes, scale, zero, spec)
    assert bool(torch.isfinite(dq).all())
    assert bool(((dq.double() - x.double()).abs() <= scale.double() * 0.5 + 1e-50).all())
    assert torch.equal(codes[:, 1], zero[:, 0].to(torch.uint8))


@given(matrices(), specs(), st.sampled_from([torch.float16, torch.bfloat16]))
@SETTINGS
def test_half_precision_inputs_computed_in_float32(x, spec, dtype):
    xh = x.clamp(-6e4, 6e4).to(dtype)
    assume(bool(torch.isfinite(xh).all()))
    scale, zero = compute_qparams(xh, spec)
    scale32, zero32 = compute_qparams(xh.float(), spec)
    assert scale.dtype == torch.float32 and zero.dtype == torch.float32
    assert torch.equal(scale, scale32) and torch.equal(zero, zero32)
    codes = quantize(xh, scale, zero, spec)
    assert torch.equal(codes, quantize(xh.float(), scale, zero, spec))
    dq = dequantize(codes, scale, zero, spec, dtype=dtype)
    assert dq.dtype == dtype
    assert torch.equal(dq, dequantize(codes, scale, zero, spec).to(dtype))
    fq = fake_quantize(xh, spec)
    assert fq.dtype == dtype and torch.equal(fq, dequantize(codes, scale, zero, spec).to(dtype))


def test_leading_dims_flattened_to_rows():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 10, generator=gen)
    for spec in (
        QuantSpec(bits=8, granularity="token"),
        QuantSpec(bits=4, group_size=4),
        QuantSpec(granularity="tensor"),
    ):
        scale, zero = compute_qparams(x, spec)
        assert scale.shape == spec.qparams_shape(6, 10)
        codes = quantize(x, scale, zero, spec)
        assert codes.shape == x.shape
        assert torch.equal(codes.reshape(6, 10), quantize(x.reshape(6, 10), scale, zero, spec))
        dq = dequantize(codes, scale, zero, spec)
        assert dq.shape == x.shape
        qt = quantize_tensor(x, spec)
        assert qt.codes.shape == (6, 10)
        assert torch.equal(qt.codes, codes.reshape(6, 10))
        assert torch.equal(qt.dequantize(), dq.reshape(6, 10))
    # token scales shaped like the activation ([B, T, 1]) are accepted too
    spec = QuantSpec(bits=8, granularity="token")
    scale, zero = compute_qparams(x, spec)
    assert torch.equal(quantize(x, scale.reshape(2, 3, 1), zero.reshape(2, 3, 1), spec), quantize(x, scale, zero, spec))


def test_column_slice_of_grouped_weight_uses_its_group_params():
    # GPTQ-style: quantize one column with the [rows, 1] slice of its group's params.
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(3, 10, generator=gen)
    spec = QuantSpec(bits=3, group_size=4)
    scale, zero = compute_qparams(w, spec)
    full = quantize(w, scale, zero, spec)
    for c in range(10):
        g = c // 4
        col = quantize(w[:, c : c + 1], scale[:, g : g + 1], zero[:, g : g + 1], spec)
        assert torch.equal(col, full[:, c : c + 1])


# ---------------------------------------------------------------------------------------------- expand_to_columns
def test_expand_to_columns():
    t = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    spec = QuantSpec(group_size=2)
    assert expand_to_columns(t, spec, 5).tolist() == [[1, 1, 2, 2, 3], [4, 4, 5, 5, 6]]
    assert expand_to_columns(t, QuantSpec(group_size=3), 7).tolist() == [[1, 1, 1, 2, 2, 2, 3], [4, 4, 4, 5, 5, 5, 6]]
    col = torch.tensor([[1.0], [2.0]])
    assert expand_to_columns(col, QuantSpec(), 3).tolist() == [[1, 1, 1], [2, 2, 2]]
    assert expand_to_columns(torch.tensor([[7.0]]), QuantSpec(granularity="tensor"), 2).tolist() == [[7, 7]]
    assert expand_to_columns(torch.tensor([1.0, 2.0]), QuantSpec(), 2).tolist() == [[1, 1], [2, 2]]
    with pytest.raises(QuantlmError, match="scale/zero with 3 columns do not fit a tensor with 8 columns"):
        expand_to_columns(t, spec, 8)
    with pytest.raises(QuantlmError, match="rows"):
        quantize(torch.zeros(3, 4), torch.ones(2, 1), torch.zeros(2, 1), QuantSpec())


# ---------------------------------------------------------------------------------------------- fake_quantize / STE
@given(matrices(max_rows=3, max_cols=16), specs())
@SETTINGS
def test_fake_quantize_forward_equals_round_trip(x, spec):
    scale, zero = compute_qparams(x, spec)
    expected = dequantize(quantize(x, scale, zero, spec), scale, zero, spec)
    assert torch.equal(fake_quantize(x, spec), expected)
    assert torch.equal(fake_quantize(x, spec, scale, zero), expected)


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(bits=3), QuantSpec(bits=4, symmetric=True, group_size=4), QuantSpec(bits=2, granularity="tensor")],
)
def test_fake_quantize_straight_through_gradients(spec):
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 12, generator=gen) * 2
    scale, zero = compute_qparams(x0 * 0.5, spec)  # narrower grid: the larger entries get clamped
    x = x0.clone().requires_grad_(True)
    s = scale.clone().requires_grad_(True)
    out = fake_quantize(x, spec, s, zero)
    out.sum().backward()

    s_e, z_e = per_element(scale, x0, spec), per_element(zero, x0, spec)
    t = x0.double() / s_e
    q_unclamped = torch.round(t) + z_e
    inside = (q_unclamped >= 0) & (q_unclamped <= spec.maxq)
    assert bool(inside.any()) and bool((~inside).any())
    assert torch.equal(x.grad, inside.to(torch.float32))

    # d out / d scale per element: round(t) - t in range (LSQ), q_clamped - zero when clamped
    q = q_unclamped.clamp(0, spec.maxq)
    g = torch.where(inside, torch.round(t) - t, q - z_e)
    if spec.granularity == "tensor":
        want = g.sum().reshape(1, 1)
    elif spec.granularity == "group":
        want = torch.stack([g[:, c : c + spec.group_size].sum(1) for c in range(0, 12, spec.group_size)], dim=1)
    else:
        want = g.sum(1, keepdim=True)
    assert s.grad is not None and s.grad.shape == scale.shape
    assert torch.allclose(s.grad.double(), want, rtol=1e-4, atol=1e-4)
    assert float(s.grad.abs().sum()) > 0


def test_fake_quantize_own_qparams_have_no_graph_and_keep_shape_dtype():
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 3, 8, generator=gen)).to(torch.bfloat16).requires_grad_(True)
    spec = QuantSpec(bits=4, group_size=3)
    out = fake_quantize(x, spec)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert set(x.grad.float().unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(QuantlmError, match="both scale and zero"):
        fake_quantize(x, spec, scale=torch.ones(6, 3))


# ---------------------------------------------------------------------------------------------- quantize_tensor
def test_quantize_tensor_container():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(5, 7, generator=gen, dtype=torch.float16)
    spec = QuantSpec(bits=3, symmetric=True, group_size=3)
    qt = quantize_tensor(w, spec)
    assert isinstance(qt, QuantizedTensor) and qt.spec == spec
    assert qt.codes.dtype == torch.uint8 and qt.codes.shape == (5, 7)
    assert qt.scale.dtype == torch.float32 and qt.scale.shape == (5, 3) and qt.zero.shape == (5, 3)
    assert qt.dequantize(torch.float16).dtype == torch.float16
    assert torch.equal(qt.dequantize(), fake_quantize(w.float(), spec))
    one_d = quantize_tensor(torch.tensor([0.5, -1.0, 2.0]), QuantSpec(bits=2))
    assert one_d.codes.shape == (1, 3)


@pytest.mark.parametrize(
    "x, pattern",
    [
        (torch.tensor([[1.0, float("nan")]]), "cannot quantize a tensor with NaN or inf values"),
        (torch.tensor([[1.0, float("inf")]]), "cannot quantize a tensor with NaN or inf values"),
        (torch.tensor([[1.0, float("-inf")]], dtype=torch.float16), "NaN or inf"),
        (torch.tensor([[1, 2]]), "expected a floating-point tensor"),
        (torch.tensor(1.0), "0-dim"),
        (torch.zeros(0, 4), "empty tensor"),
    ],
)
def test_quantize_tensor_rejects_bad_input(x, pattern):
    with pytest.raises(QuantlmError, match=pattern):
        quantize_tensor(x, QuantSpec())
    with pytest.raises(QuantlmError, match=pattern):
        compute_qparams(x, QuantSpec())


def test_spec_type_checked():
    with pytest.raises(QuantlmError, match="expected a QuantSpec"):
        quantize_tensor(torch.ones(2, 2), {"bits": 4})  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 70),
    group=st.sampled_from([-1, 8, 32]),
    bits=st.integers(2, 8),
    seed=st.integers(0, 2**16),
)
def test_stats_clip_is_twice_the_mean_magnitude_of_each_unit_within_minmax(rows, cols, group, bits, seed):
    """StatsQ: each unit's range is min(2·mean|x|, max|x|), over its real columns only (a partial last group's
    zero padding does not count), on the symmetric grid."""
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    spec = QuantSpec(bits=bits, symmetric=True, group_size=group, clip="stats")
    scale, _ = compute_qparams(x, spec)
    width = cols if group == -1 else group
    want = torch.stack(
        [torch.stack([torch.minimum(2 * u.abs().mean(), u.abs().max()) for u in row.split(width)]) for row in x]
    )
    plain, _ = compute_qparams(x, QuantSpec(bits=bits, symmetric=True, group_size=group))
    torch.testing.assert_close(scale, want * 2 / spec.maxq)
    assert bool((scale <= plain * (1 + 1e-6)).all())


def test_stats_clip_needs_a_symmetric_grid():
    with pytest.raises(QuantlmError, match="symmetric"):
        QuantSpec(bits=4, symmetric=False, clip="stats")
