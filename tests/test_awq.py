"""AWQ: scale math, exact folds on every family, the scale and clipping searches, recipes with RTN and GPTQ, CLI."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

import quantlm
from conftest import FAMILIES, byte_tokenizer, tiny_model
from quantlm.cli import app
from quantlm.core import QuantSpec
from quantlm.errors import InvalidSpecError, QuantlmError
from quantlm.methods import RTN, parse_recipe, recipe_from_options
from quantlm.methods.awq import AWQ, CLIP_RATIOS, awq_scales, clip_search, on_grid, scaled_on_grid
from quantlm.nn import QuantLinear

W4 = QuantSpec(bits=4, group_size=16)  # the tiny models are 64 wide: 4 groups per row
IDS = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(1))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _quantize(model, steps, **kw):
    quantlm.quantize(model, steps, IDS, batch_size=2, progress=False, **kw)
    return model.quantlm_record.log


def with_outliers(family="llama"):
    """A tiny model whose norms make a few input channels large, as trained LLMs have them."""
    model = tiny_model(family)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 40.0
            layer.post_attention_layernorm.weight[7] = 30.0
    return model


# -- the pieces -----------------------------------------------------------------------------------------------------
def test_scales_straddle_one_and_follow_the_activations():
    g = torch.Generator().manual_seed(0)
    x_mean = torch.rand(32, generator=g) * 10 + 0.01
    x_mean[3] = 0.0  # never active in calibration
    assert torch.equal(awq_scales(x_mean, 0.0), torch.ones(32))
    live = x_mean > 0
    for alpha in (0.25, 0.5, 0.95):
        s = awq_scales(x_mean, alpha)
        assert s[3] == 1 and bool(torch.isfinite(s).all()) and bool((s > 0).all())
        assert float(s[live].max() * s[live].min()) == pytest.approx(1.0, rel=1e-5)
        # s_i / s_j = (x_i / x_j)^α
        torch.testing.assert_close(s[live] / s[0], (x_mean[live] / x_mean[0]).pow(alpha), rtol=1e-5, atol=0)
    tiny = awq_scales(torch.tensor([1e-12, 1.0]), 1.0)  # clamped at 1e-4 before normalising
    torch.testing.assert_close(tiny, torch.tensor([1e-2, 1e2]))


def test_unit_scales_are_plain_round_to_nearest():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(scaled_on_grid(w, torch.ones(40), W4), on_grid(w, W4), rtol=0, atol=0)
    stored = QuantLinear.from_weight(w, W4).dequantize_weight()  # RTN's layer (its scales stored in fp16)
    torch.testing.assert_close(on_grid(w, W4), stored, rtol=0, atol=2e-3)


def _slow_clip(w, x, spec):
    """Each (row, group) on its own, every ratio tried in turn: the obvious version of ``clip_search``."""
    size = spec.group_size if spec.group_size > 0 else w.shape[1]
    ratios = torch.ones(w.shape[0], spec.n_groups(w.shape[1]) if spec.group_size > 0 else 1)
    errors = torch.zeros_like(ratios)
    for row in range(w.shape[0]):
        for g in range(ratios.shape[1]):
            cols = slice(g * size, (g + 1) * size)
            best = None
            for ratio in CLIP_RATIOS:
                limit = w[row, cols].abs().max() * ratio  # float32, as the search computes it: the rounding of
                clamped = w[row].clone()  # a clamped weight (often at a tie of the grid) depends on the last bit
                clamped[cols] = torch.maximum(torch.minimum(clamped[cols], limit), -limit)
                rounded = on_grid(clamped.unsqueeze(0), spec)[0]
                error = float((x[:, cols] @ (rounded[cols] - w[row, cols])).pow(2).mean())
                if best is None or error < best:
                    best, ratios[row, g] = error, ratio
            errors[row, g] = best
    return ratios, errors


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([-1, 8, 12]), st.booleans())
def test_clip_search_matches_the_obvious_version_and_never_adds_error(seed, group_size, symmetric):
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits=3, group_size=group_size, symmetric=symmetric)
    w = torch.randn(6, 40, generator=g)
    w[0, 3] = 9.0  # one far outlier weight: clipping it should pay
    x = torch.randn(48, 40, generator=g)
    result = clip_search(w, x, spec)
    assert bool((result.error <= result.error_unclipped).all())
    assert bool((result.ratio >= 0.5).all()) and bool((result.ratio <= 1).all())
    ratios, errors = _slow_clip(w, x, spec)
    torch.testing.assert_close(result.ratio, ratios)
    torch.testing.assert_close(result.error, errors, rtol=1e-4, atol=1e-6)


def test_clip_search_clips_heavy_tailed_rows():
    torch.manual_seed(3)
    w = torch.distributions.StudentT(2.0).sample((32, 64))
    x = torch.randn(128, 64)
    result = clip_search(w, x, W4)
    assert bool((result.ratio < 1).any())
    assert float(result.error.sum()) < float(result.error_unclipped.sum())


# -- the step on tiny models ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_folds_keep_the_float_model_unchanged(family):
    model = tiny_model(family)
    reference = _logits(model)
    log = _quantize(model, [AWQ(W4, auto_clip=False, n_grid=5)])  # a coarse grid: the folds are what is checked
    assert _rel(_logits(model), reference) < 1e-4
    assert "norm" in {r["details"]["kind"] for r in log}
    assert any(r["details"]["alpha"] > 0 for r in log)  # the folds moved weights: the check is not trivial
    for r in log:  # α = 0 (plain RTN) is on the grid: the search never does worse on its own objective
        assert r["error"] <= r["details"]["error_unscaled"]
        assert r["details"]["windows"] == 4


def test_groups_and_the_modules_their_loss_is_measured_on():
    log = _quantize(tiny_model("llama"), [AWQ(W4, auto_clip=False)])
    layer0 = {r["module"]: r["details"] for r in log if r["module"].startswith("model.layers.0.")}
    assert {m: (d["kind"], d["loss_module"]) for m, d in layer0.items()} == {
        "model.layers.0.input_layernorm": ("norm", "model.layers.0.self_attn"),
        "model.layers.0.post_attention_layernorm": ("norm", "model.layers.0.mlp"),
        "model.layers.0.self_attn.v_proj": ("v-o", "targets"),  # GQA: 4 query heads read 2 KV heads
        "model.layers.0.mlp.up_proj": ("up-down", "targets"),
    }
    assert len(layer0["model.layers.0.input_layernorm"]["search"]) == 20


class _SignNorm(nn.Module):
    """A norm whose output is ±weight: with unit weights every channel has mean |x| = 1 exactly."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return torch.sign(x) * self.weight


class _MLP(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _Block(nn.Module):
    def __init__(self, width=32, hidden=48):
        super().__init__()
        self.norm = _SignNorm(width)
        self.mlp = _MLP(width, hidden)

    def forward(self, x, *args, **kwargs):
        return (x + self.mlp(self.norm(x)),)


class _ToyModel(nn.Module):
    def __init__(self, n=2):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 32)
        self.layers = nn.ModuleList(_Block() for _ in range(n))

    def forward(self, input_ids, **kwargs):
        h = self.embed(input_ids)
        for layer in self.layers:
            out = layer(h)
            h = out[0] if isinstance(out, tuple) else out  # the pipeline's input recorder returns a tensor
        return h


def test_uniform_activations_keep_unit_scales():
    model = _ToyModel()
    quantlm.quantize(model, [AWQ(W4)], torch.randint(0, 64, (4, 16)), batch_size=2, progress=False)
    groups = [r for r in model.quantlm_record.log if "kind" in r["details"]]
    assert [r["module"] for r in groups] == ["layers.0.norm", "layers.1.norm"]
    for r in groups:
        assert r["details"]["alpha"] == 0.0
        assert r["details"]["loss_module"] == r["module"].replace(".norm", ".mlp")
        assert r["details"]["scale_min"] == r["details"]["scale_max"] == 1.0
        assert r["error"] == r["details"]["error_unscaled"]
    assert torch.equal(model.layers[0].norm.weight, torch.ones(32))


def test_an_outlier_channel_gets_a_positive_alpha_and_beats_rtn():
    base = with_outliers()
    reference = _logits(base)
    rtn = copy.deepcopy(base)
    _quantize(rtn, [RTN(W4)])
    awq = copy.deepcopy(base)
    log = _quantize(awq, [AWQ(W4), RTN(W4)])
    norms = [r for r in log if r["module"].endswith("input_layernorm")]
    assert norms and all(r["details"]["alpha"] > 0 and r["error"] < r["details"]["error_unscaled"] for r in norms)
    assert _rel(_logits(awq), reference) < 0.8 * _rel(_logits(rtn), reference)


def test_clip_records_and_what_is_left_alone():
    log = _quantize(tiny_model("llama"), [AWQ(W4, n_grid=2, exclude=("*.o_proj",))])
    clipped = {r["module"].split(".", 3)[-1] for r in log if "clip_ratio_mean" in r["details"]}
    assert clipped == {"self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}  # no q, k, o
    assert "v-o" not in {r["details"].get("kind") for r in log}  # its only target is excluded
    for r in log:
        if "clip_ratio_mean" in r["details"]:
            assert 0.5 <= r["details"]["clip_ratio_min"] <= r["details"]["clip_ratio_mean"] <= 1
            assert r["details"]["tokens"] == 4 * 48  # fewer calibration tokens than clip_tokens: all of them


def test_the_scale_search_can_run_on_fewer_windows():
    log = _quantize(tiny_model("llama"), [AWQ(W4, auto_clip=False, n_grid=2, search_windows=1)])
    assert {r["details"]["windows"] for r in log} == {2}  # whole mini-batches of 2


def test_kept_candidates_give_the_same_search(monkeypatch):
    from quantlm.methods import awq

    def run(model):
        return [(r["module"], r["error"], r["details"]) for r in _quantize(model, [AWQ(W4, n_grid=4)])]

    kept, again = tiny_model("llama"), tiny_model("llama")
    log = run(kept)
    monkeypatch.setattr(awq, "CANDIDATE_CACHE_BYTES", 0)  # every candidate rounded again on every mini-batch
    assert run(again) == log
    for a, b in zip(kept.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


# -- recipes, checkpoints, command line -----------------------------------------------------------------------------
@pytest.mark.parametrize("family, weights", [("llama", "rtn"), ("llama", "gptq"), ("gpt2", "rtn"), ("opt", "gptq")])
def test_awq_then_rtn_or_gptq_saves_and_loads(family, weights, tmp_path):
    model = tiny_model(family)
    reference = _logits(model)
    recipe = recipe_from_options("awq", {"bits": 4, "group_size": 16, "awq_grid": 5}, weights=weights)
    awq = "awq(w4 g16 asym)" if weights == "rtn" else "awq(w4 g16 asym, no clip search, GPTQ-rounded scale search)"
    assert recipe.describe() == f"{awq} -> {weights}(w4 g16 asym)"
    _quantize(model, recipe)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.spec == W4 for m in layers)
    assert _rel(_logits(model), reference) < 0.5
    out = quantlm.save(model, tmp_path / "awq", tokenizer=byte_tokenizer())
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [s["method"] for s in config["recipe"]] == ["awq", weights]
    assert parse_recipe(config["recipe"]).to_config() == recipe.to_config()
    loaded = quantlm.load(out, kernel="torch")
    for m in layers:
        m.kernel = None
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_the_next_step_must_round_on_the_searched_grid():
    with pytest.raises(InvalidSpecError, match="awq searched on w4 g64 asym but rtn after it quantizes on w3 g64"):
        parse_recipe([{"method": "awq"}, {"method": "rtn", "bits": 3}])
    with pytest.raises(InvalidSpecError, match="awq needs a step after it that rounds on a weight grid"):
        parse_recipe([{"method": "awq"}, {"method": "llm-int8"}])
    with pytest.raises(QuantlmError, match="must come before"):
        parse_recipe([{"method": "rtn"}, {"method": "awq"}])
    flags = recipe_from_options("awq", {"bits": 3, "group_size": 32, "sym": True, "clip": "mse"}, weights="gptq")
    assert flags.steps[0].spec == flags.steps[1].spec == QuantSpec(bits=3, group_size=32, symmetric=True, clip="mse")
    head = recipe_from_options("awq", {}, head_bits=8)  # the output projection's own grid is not AWQ's business
    assert head.describe() == "awq(w4 g64 asym) -> rtn(w4 g64 asym) -> rtn-head(w8 per-channel sym)"
    with pytest.raises(InvalidSpecError, match="on w3 g64"):  # a head-only step in between is looked past
        parse_recipe([{"method": "awq"}, {"method": "rtn-head"}, {"method": "rtn", "bits": 3}])
    with pytest.raises(InvalidSpecError, match="fits a grid of its own"):
        parse_recipe([{"method": "awq"}, {"method": "hqq"}])
    with pytest.raises(InvalidSpecError, match="same bits, group_size, symmetric and codebook"):
        recipe_from_options("awq", {}, weights="nf4")
    nf4 = recipe_from_options("awq", {"codebook": "nf4", "sym": True}, weights="nf4")
    assert nf4.steps[0].search_spec == dataclasses.replace(nf4.steps[1].spec, clip="none")  # nf4 fits its scales


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_grid": 0}, "n_grid must be at least 1"),
        ({"clip_tokens": 0}, "clip_tokens must be at least 1"),
        ({"search_windows": 0}, "search_windows must be at least 1"),
        ({"folds": ("norm", "qk")}, "folds must be"),
        ({"spec": QuantSpec(bits=4, granularity="tensor")}, "per channel or per group"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(InvalidSpecError, match=message):
        AWQ(**kwargs)


def test_cli_awq_builds_the_recipe_and_refuses_bad_settings(tiny_model_dir, text_file, tmp_path):
    runner = CliRunner()
    out = tmp_path / "awq"
    calib = ["--calib", str(text_file), "--calib-samples", "4", "--calib-seqlen", "32"]
    args = ["quantize", str(tiny_model_dir), "--method", "awq", "--group-size", "16", *calib, "--out", str(out)]
    result = runner.invoke(app, [*args, "--awq-clip-tokens", "64", "--awq-grid", "4", "--json"])
    assert result.exit_code == 0, result.output
    recipe = json.loads(result.stdout)["recipe"]
    assert [s["method"] for s in recipe] == ["awq", "rtn"]
    assert recipe[0]["clip_tokens"] == 64 and recipe[0]["n_grid"] == 4 and recipe[0]["auto_clip"] is True
    grid = ("bits", "symmetric", "group_size", "granularity", "clip")
    assert (
        {k: recipe[0][k] for k in grid}
        == {k: recipe[1][k] for k in grid}
        == {
            "bits": 4,
            "symmetric": False,
            "group_size": 16,
            "granularity": "group",
            "clip": "none",
        }
    )
    gptq = runner.invoke(
        app, [*args, "--bits", "3", "--weights", "gptq", "--no-awq-clip", "--awq-grid", "2", "--overwrite", "--json"]
    )
    assert gptq.exit_code == 0, gptq.output
    recipe = json.loads(gptq.stdout)["recipe"]
    assert [(s["method"], s["bits"]) for s in recipe] == [("awq", 3), ("gptq", 3)] and not recipe[0]["auto_clip"]
    for bad, message in [
        (["--awq-clip-tokens", "0"], "clip_tokens must be at least 1"),
        (["--alpha", "0.5"], "--alpha does not apply to --method awq"),
        (["--smooth-folds", "qk"], "folds must be"),
    ]:
        bad_out = tmp_path / "bad"
        result = runner.invoke(app, [*args[:-1], str(bad_out), *bad])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.stderr
        assert not bad_out.exists()


# -- before GPTQ ----------------------------------------------------------------------------------------------------
def test_the_step_after_awq_settles_its_search_and_clipping():
    gptq = parse_recipe([{"method": "awq"}, {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": False}])
    assert (gptq.steps[0].search_rounding, gptq.steps[0].auto_clip) == ("gptq", False)
    assert gptq.describe().startswith("awq(w4 g64 asym, no clip search, GPTQ-rounded scale search) -> gptq")
    rtn = parse_recipe([{"method": "awq"}, {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False}])
    assert (rtn.steps[0].search_rounding, rtn.steps[0].auto_clip) == ("rtn", True)
    given = parse_recipe([AWQ(search_rounding="rtn", auto_clip=True), recipe_from_options("gptq", {}).steps[0]])
    assert (given.steps[0].search_rounding, given.steps[0].auto_clip) == ("rtn", True)  # what the user says stays
    assert AWQ().clips and AWQ().search_rounding == "auto"  # no step after it: the paper's search
    from quantlm.methods import Recipe
    from quantlm.methods.gptq import GPTQ

    own = GPTQ(spec=QuantSpec(bits=4, group_size=64, clip="mse"), act_order=False, sink_weight=1.0, hessian_clip=True)
    by_hand = Recipe([AWQ(), own])  # built without parse_recipe: resolved all the same
    solver = by_hand.steps[0]._search_solver
    assert by_hand.steps[0].search_rounding == "gptq" and not by_hand.steps[0].auto_clip
    assert (solver.act_order, solver.sink_weight, solver.hessian_clip) == (False, 1.0, False)  # the step's solver
    assert solver.spec == QuantSpec(bits=4, group_size=64)  # on the search grid, without the MSE clip
    assert parse_recipe(by_hand.to_config()).steps[0]._search_solver == solver  # read back: resolved again
    old = AWQ.from_config({"method": "awq", "auto_clip": True})  # a recipe written before search_rounding
    assert (old.search_rounding, old.auto_clip) == ("rtn", True)
    with pytest.raises(InvalidSpecError, match="search_rounding must be one of auto, rtn, gptq"):
        AWQ(search_rounding="hqq")


def test_gptq_rounded_candidates_are_gptq_on_the_scaled_problem():
    from quantlm.methods.awq import scaled_gptq
    from quantlm.methods.gptq import GPTQ, gptq_quantize

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(12, 32, generator=g), torch.randn(200, 32, generator=g)
    x[:, 3] *= 20  # an outlier channel
    h = 2 * x.T @ x / x.shape[0]
    solver = GPTQ(spec=W4)
    plain = scaled_gptq(w, torch.ones(32), h, solver)
    torch.testing.assert_close(plain, solver.solve(w, h).dequantized, rtol=0, atol=0)
    s = awq_scales(x.abs().mean(0), 0.5)
    expected = gptq_quantize(w * s, h / torch.outer(s, s), W4, act_order=True, static_groups=True).dequantized / s
    torch.testing.assert_close(scaled_gptq(w, s, h, solver), expected, rtol=0, atol=0)
    # seen from X, the scaled problem is the same problem: its rounded weight is judged by the same output error
    for q in (plain, scaled_gptq(w, s, h, solver)):
        assert float((x @ (q - w).T).pow(2).mean()) < float((x @ (on_grid(w, W4) - w).T).pow(2).mean())


def test_awq_before_gptq_searches_with_gptq_and_beats_gptq_alone():
    base = with_outliers()
    reference = _logits(base)
    gptq = copy.deepcopy(base)
    _quantize(gptq, recipe_from_options("gptq", {"bits": 4, "group_size": 16}))
    awq = copy.deepcopy(base)
    log = _quantize(awq, recipe_from_options("awq", {"bits": 4, "group_size": 16}, weights="gptq"))
    groups = [r for r in log if "kind" in r["details"]]
    assert groups and not any("clip_ratio_mean" in r["details"] for r in log)  # no clipping search before GPTQ
    for r in groups:  # α = 0 is plain GPTQ on the searched windows: never beaten on the search's own objective
        assert r["error"] <= r["details"]["error_unscaled"]
    assert any(r["details"]["alpha"] > 0 for r in groups)
    assert _rel(_logits(awq), reference) < _rel(_logits(gptq), reference)
