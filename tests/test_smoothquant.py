"""SmoothQuant: scale math, exact folds on every family, alpha search, error paths, recipes, CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

import quantlm
from conftest import FAMILIES, tiny_model
from quantlm.cli import app
from quantlm.core import QuantSpec
from quantlm.errors import QuantlmError
from quantlm.methods import RTN, SmoothQuant, parse_recipe
from quantlm.methods.smoothquant import quantized_output_error, smoothing_scales
from quantlm.models.smoothing import divide_norm_output, kv_head_map, norm_weight_offset
from quantlm.nn import QuantLinear

W8 = QuantSpec(bits=8, symmetric=True)
IDS = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(1))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def with_outliers(family="llama"):
    """A tiny model whose norms make a few channels huge, as trained LLMs have them."""
    model = tiny_model(family)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 40.0
            layer.post_attention_layernorm.weight[7] = 30.0
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothing_keeps_the_float_model_unchanged(family):
    model = tiny_model(family)
    with torch.no_grad():  # trained norms have weights far from 1 and (LayerNorm) nonzero biases
        for name, p in model.named_parameters():
            if (
                p.dim() == 1
                and "norm" in name
                or name.endswith(("ln_1.weight", "ln_2.weight", "ln_1.bias", "ln_2.bias"))
            ):
                p.add_(torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.8 - 0.2)
    reference = _logits(model)
    quantlm.quantize(model, [SmoothQuant(alpha=0.5)], IDS, batch_size=2, progress=False)
    assert _rel(_logits(model), reference) < 1e-4
    kinds = {r["details"]["kind"] for r in model.quantlm_record.log}
    assert "norm" in kinds
    if family in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt"):
        assert kinds == {"norm", "v-o", "up-down"}
    # smoothing changed the weights (it is not a no-op that passes trivially)
    assert any(r["details"]["scale_max"] > 1.01 or r["details"]["scale_min"] < 0.99 for r in model.quantlm_record.log)


def test_norm_groups_found_generically_for_llama_and_gpt2():
    model = tiny_model("llama")
    quantlm.quantize(model, [SmoothQuant(folds=("norm",))], IDS, batch_size=2, progress=False)
    groups = {
        r["module"]: r["details"]["targets"]
        for r in model.quantlm_record.log
        if r["module"].startswith("model.layers.0.")
    }
    assert groups == {
        "model.layers.0.input_layernorm": [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"],
        "model.layers.0.post_attention_layernorm": ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
    }
    gpt2 = tiny_model("gpt2")
    quantlm.quantize(gpt2, [SmoothQuant(folds=("norm",))], IDS, batch_size=2, progress=False)
    groups = {
        r["module"]: r["details"]["targets"]
        for r in gpt2.quantlm_record.log
        if r["module"].startswith("transformer.h.0.")
    }
    assert groups == {
        "transformer.h.0.ln_1": ["transformer.h.0.attn.c_attn"],
        "transformer.h.0.ln_2": ["transformer.h.0.mlp.c_fc"],
    }


def test_gemma_norm_folds_through_its_one_plus_weight():
    model = tiny_model("gemma3_text")
    norm = model.model.layers[0].input_layernorm
    assert norm_weight_offset(norm) == 1.0
    assert norm_weight_offset(tiny_model("llama").model.layers[0].input_layernorm) == 0.0
    x = torch.randn(3, norm.weight.numel())
    s = torch.rand(norm.weight.numel()) + 0.5
    before = norm(x)
    divide_norm_output(norm, s)
    torch.testing.assert_close(norm(x), before / s, rtol=1e-5, atol=1e-6)


def test_layernorm_with_bias_is_a_plain_norm():
    norm = nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    assert norm_weight_offset(norm) == 0.0
    x = torch.randn(3, 8)
    s = torch.rand(8) + 0.5
    before = norm(x)
    divide_norm_output(norm, s)
    torch.testing.assert_close(norm(x), before / s, rtol=1e-5, atol=1e-6)


def test_smoothing_must_come_before_quantizing():
    with pytest.raises(QuantlmError, match="must come before"):
        parse_recipe([{"method": "rtn", "bits": 8}, {"method": "smoothquant"}])


def test_grouped_kv_heads_share_their_scales():
    head_map = kv_head_map(8, 4, 2)  # 4 query heads of dim 2 reading 2 KV heads
    assert head_map.tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
    assert kv_head_map(6, 6, 2) is None


def test_smoothing_lowers_the_w8a8_error_on_outlier_channels():
    base = with_outliers()
    reference = _logits(base)
    errors = {}
    for key, recipe in {
        "none": [RTN(W8, act_bits=8)],
        "0.5": [SmoothQuant(0.5), RTN(W8, act_bits=8)],
        "auto": [SmoothQuant("auto"), RTN(W8, act_bits=8)],
        "static": [RTN(W8, act_bits=8, act_granularity="tensor")],
        "static-smoothed": [SmoothQuant(0.5), RTN(W8, act_bits=8, act_granularity="tensor")],
    }.items():
        model = copy.deepcopy(base)
        quantlm.quantize(model, recipe, IDS, batch_size=2, progress=False)
        errors[key] = _rel(_logits(model), reference)
    assert errors["0.5"] < 0.7 * errors["none"]
    assert errors["auto"] <= errors["0.5"] * 1.05
    assert errors["static-smoothed"] < 0.5 * errors["static"]


def test_auto_alpha_records_its_search_and_beats_no_smoothing():
    model = with_outliers()
    quantlm.quantize(model, [SmoothQuant("auto", search_tokens=64)], IDS, batch_size=2, progress=False)
    record = model.quantlm_record.log[0]
    assert record["details"]["alpha"] in [float(a) for a in record["details"]["search"]]
    assert record["error"] == min(record["details"]["search"].values())
    assert record["error"] <= record["details"]["error_unsmoothed"]


def test_the_alpha_search_rounds_on_the_grids_of_the_step_after_it():
    """W4A4 wants another α than W8A8: the search takes the weight grid and activation bits of the quantizing step
    after it, and W4A4 with smoothing beats W4A4 without on a model with outlier channels."""
    w4 = QuantSpec(bits=4, symmetric=True)
    recipe = parse_recipe([SmoothQuant("auto", search_tokens=64), RTN(w4, act_bits=4)])
    assert recipe.steps[0].search_target == (w4, 4)
    assert SmoothQuant("auto").search_target == (W8, 8)  # alone: W8A8, the paper's
    mse = parse_recipe([SmoothQuant("auto"), RTN(QuantSpec(bits=4, clip="mse"))])
    assert mse.steps[0].search_target == (QuantSpec(bits=4), 8)  # no MSE clip in the search; A8 without --a-bits
    base = with_outliers()
    reference = _logits(base)
    errors, alphas = {}, {}
    for key, steps in {
        "none": [RTN(w4, act_bits=4)],
        "w4a4": [SmoothQuant("auto", search_tokens=64), RTN(w4, act_bits=4)],
        "w8a8": [SmoothQuant("auto", search_tokens=64), RTN(W8, act_bits=8)],
    }.items():
        model = copy.deepcopy(base)
        quantlm.quantize(model, steps, IDS, batch_size=2, progress=False)
        errors[key] = _rel(_logits(model), reference)
        alphas[key] = [r["details"]["alpha"] for r in model.quantlm_record.log if r["method"] == "smoothquant"]
    assert errors["w4a4"] < errors["none"] and alphas["w4a4"] != alphas["w8a8"]


@settings(max_examples=30, deadline=None)
@given(st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_scales_are_positive_finite_and_balance_the_maxima(alpha, seed):
    g = torch.Generator().manual_seed(seed)
    act = torch.rand(16, generator=g) * 100
    weight = torch.rand(16, generator=g) + 1e-3
    act[3] = 0.0  # a dead channel
    weight[4] = 0.0
    s = smoothing_scales(act, weight, alpha)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    assert s[3] == 1 and s[4] == 1
    live = (act > 0) & (weight > 0)
    # after smoothing, max|X_j| / s_j = max|X_j|^(1-α) max|W_j|^(1-α) and max|W_j| s_j = max|X_j|^α max|W_j|^α
    torch.testing.assert_close(
        (act / s)[live], (act.pow(1 - alpha) * weight.pow(1 - alpha))[live], rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close((weight * s)[live], (act.pow(alpha) * weight.pow(alpha))[live], rtol=1e-4, atol=1e-5)


def test_search_error_falls_when_scales_tame_an_outlier_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    w = torch.randn(16, 32, generator=g)
    x[:, 3] *= 100
    unsmoothed = quantized_output_error(x, [w], torch.ones(32))
    s = smoothing_scales(x.abs().amax(dim=0), w.abs().amax(dim=0), 0.5)
    assert quantized_output_error(x, [w], s) < 0.5 * unsmoothed
    assert quantized_output_error(x, [w], s, "tensor") < quantized_output_error(x, [w], torch.ones(32), "tensor")


def test_all_zero_channels_give_finite_results():
    model = tiny_model("llama")
    with torch.no_grad():  # input channel 2 of every q/k/v and gate/up is exactly zero
        for layer in model.model.layers:
            layer.input_layernorm.weight[2] = 0.0
            layer.post_attention_layernorm.weight[2] = 0.0
    quantlm.quantize(model, [SmoothQuant(0.5), RTN(W8, act_bits=8)], IDS, batch_size=2, progress=False)
    assert bool(torch.isfinite(_logits(model)).all())
    assert any(r["details"].get("dead_channels", 0) > 0 for r in model.quantlm_record.log)


class _PostNormBlock(nn.Module):
    """A block whose norm output also feeds the residual (post-norm): no exact fold exists."""

    def __init__(self, width=16):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x, *args, **kwargs):
        h = self.norm(x)
        return (h + self.fc(h),)


class _PostNormModel(nn.Module):
    def __init__(self, width=16, n=2):
        super().__init__()
        self.embed = nn.Embedding(64, width)
        self.layers = nn.ModuleList(_PostNormBlock(width) for _ in range(n))

    def forward(self, input_ids, **kwargs):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)[0]
        return h


def test_a_fold_that_would_change_the_model_is_a_clear_error():
    model = _PostNormModel()
    with torch.no_grad():
        model.layers[0].norm.weight.uniform_(0.5, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantlmError, match="cannot fold layers.0.norm -> layers.0.fc exactly"):
        quantlm.quantize(model, [SmoothQuant(0.5)], torch.randint(0, 64, (2, 8)), batch_size=2, progress=False)
    for k, v in model.state_dict().items():  # the block is left as it was
        assert torch.equal(v, before[k]), k


class _NoNormBlock(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x, *args, **kwargs):
        return (x + self.fc(torch.relu(x)),)


def test_a_block_with_nothing_to_fold_into_is_a_clear_error():
    model = _PostNormModel()
    model.layers = nn.ModuleList(_NoNormBlock() for _ in range(2))
    with pytest.raises(QuantlmError, match="found nothing to smooth"):
        quantlm.quantize(model, [SmoothQuant(0.5)], torch.randint(0, 64, (2, 8)), batch_size=2, progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": 1.5}, "alpha must be"),
        ({"alpha": "often"}, "alpha must be"),
        ({"folds": ("norm", "x")}, "folds must be"),
        ({"search_granularity": "row"}, "search_granularity"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(QuantlmError, match=message):
        SmoothQuant(**kwargs)


def test_recipes_round_trip_and_compose_with_gptq(tmp_path):
    recipe = parse_recipe(
        [
            {"method": "smoothquant", "alpha": "auto", "folds": ["norm", "up-down"]},
            {"method": "gptq", "bits": 4, "group_size": 32, "act_bits": 8},
        ]
    )
    assert parse_recipe(recipe.to_config()).to_config() == recipe.to_config()
    assert recipe.describe() == "smoothquant(alpha auto, folds norm+up-down) -> gptq(w4 g32 asym a8)"
    model = with_outliers()
    reference = _logits(model)
    quantlm.quantize(model, recipe, IDS, batch_size=2, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.act_bits == 8 and m.spec.bits == 4 for m in layers)
    assert _rel(_logits(model), reference) < 0.5
    static = parse_recipe(
        [
            {"method": "smoothquant"},
            {"method": "gptq", "bits": 8, "symmetric": True, "act_bits": 8, "act_granularity": "tensor"},
        ]
    )
    model = with_outliers()
    quantlm.quantize(model, static, IDS, batch_size=2, progress=False)
    assert all(
        m.act_scale is not None and float(m.act_scale) > 0 for m in model.modules() if isinstance(m, QuantLinear)
    )


def test_checkpoint_of_a_smoothed_static_w8a8_model_loads_identically(tmp_path):
    from conftest import byte_tokenizer

    model = with_outliers()
    quantlm.quantize(
        model, [SmoothQuant(0.5), RTN(W8, act_bits=8, act_granularity="tensor")], IDS, batch_size=2, progress=False
    )
    out = quantlm.save(model, tmp_path / "sq", tokenizer=byte_tokenizer())
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [s["method"] for s in config["recipe"]] == ["smoothquant", "rtn"]
    loaded = quantlm.load(out, kernel="torch")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = None
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_cli_smoothquant_and_errors(tiny_model_dir, text_file, tmp_path):
    runner = CliRunner()
    out = tmp_path / "sq"
    args = [
        "quantize",
        str(tiny_model_dir),
        "--method",
        "smoothquant",
        "--alpha",
        "auto",
        "--a-granularity",
        "tensor",
        "--calib",
        str(text_file),
        "--calib-samples",
        "4",
        "--calib-seqlen",
        "32",
        "--out",
        str(out),
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["recipe"][0]["method"] == "smoothquant" and summary["recipe"][0]["alpha"] == "auto"
    assert summary["recipe"][1] == {
        "method": "rtn",
        "bits": 8,
        "symmetric": True,
        "group_size": -1,
        "granularity": "channel",
        "clip": "none",
        "lm_head": False,
        "exclude": [],
        "act_bits": 8,
        "act_granularity": "tensor",
    }
    text = runner.invoke(app, args[:-1] + ["--overwrite"])
    assert text.exit_code == 0 and "smoothed" in text.stdout
    bad = runner.invoke(
        app,
        ["quantize", str(tiny_model_dir), "--method", "smoothquant", "--alpha", "2", "--out", str(tmp_path / "bad")],
    )
    assert bad.exit_code == 2 and "alpha must be" in bad.stderr and not (tmp_path / "bad").exists()
    folds = runner.invoke(
        app,
        [
            "quantize",
            str(tiny_model_dir),
            "--method",
            "smoothquant",
            "--smooth-folds",
            "qk",
            "--out",
            str(tmp_path / "bad"),
        ],
    )
    assert folds.exit_code == 2 and "folds must be" in folds.stderr
    unused = runner.invoke(
        app, ["quantize", str(tiny_model_dir), "--method", "rtn", "--alpha", "0.7", "--out", str(tmp_path / "bad")]
    )
    assert unused.exit_code == 2 and "--alpha does not apply to --method rtn" in unused.stderr
