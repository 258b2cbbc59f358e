"""The CLI: commands over the API, --json output, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from quantlm.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_models_and_data_listings():
    assert "smollm2-135m" in json.loads(_run("models", "--json").stdout)
    assert "enwiki" in json.loads(_run("data", "--json").stdout)
    assert "smollm2-135m" in _run("models").stdout


def test_quantize_eval_generate_on_a_tiny_model(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "q"
    result = _run("quantize", tiny_model_dir, "--bits", 4, "--group-size", 16, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["quantized_modules"] == 3 * 7 and (out / "model.safetensors").is_file()
    assert summary["recipe"][0] == {
        "method": "rtn",
        "bits": 4,
        "symmetric": False,
        "group_size": 16,
        "granularity": "group",
        "clip": "none",
        "lm_head": False,
        "exclude": [],
        "act_bits": None,
        "act_granularity": "token",
    }

    fp = json.loads(
        _run("eval", tiny_model_dir, "--data", text_file, "--seqlen", 64, "--max-windows", 3, "--json").stdout
    )
    q = json.loads(_run("eval", out, "--data", text_file, "--seqlen", 64, "--max-windows", 3, "--json").stdout)
    assert fp["tokens"] == q["tokens"] == 3 * 63
    assert q["ppl"] != fp["ppl"] and q["ppl"] > 1

    gen = _run("generate", out, "--prompt", "The quick", "--max-new-tokens", 5, "--json")
    assert gen.exit_code == 0, gen.output
    assert isinstance(json.loads(gen.stdout)["text"], str)
    streamed = _run("generate", out, "--prompt", "The quick", "--max-new-tokens", 5)
    assert streamed.exit_code == 0 and streamed.stdout.startswith("The quick")


def test_quantize_refuses_an_existing_output_before_doing_any_work(tiny_model_dir, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    result = _run("quantize", tiny_model_dir, "--out", out)
    assert result.exit_code == 2
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert _run("quantize", tiny_model_dir, "--group-size", 16, "--out", out, "--overwrite").exit_code == 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["quantize", "no-such-model", "--out", "{tmp}/x"], "unknown model"),
        (["quantize", "{model}", "--bits", "9", "--out", "{tmp}/x"], "bits must be between 2 and 8"),
        (["quantize", "{model}", "--group-size", "0", "--out", "{tmp}/x"], "group_size must be"),
        (["eval", "{tmp}/nothing-here"], "model directory not found"),
        (["eval", "{model}", "--data", "{tmp}/none.txt"], "text file not found"),
        (["eval", "{tmp}"], "no config.json"),
        (["quantize", "{model}", "--recipe", "{tmp}/missing.json", "--out", "{tmp}/x"], "recipe file not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, tiny_model_dir, tmp_path):
    args = [a.format(tmp=tmp_path, model=tiny_model_dir) for a in args]
    result = _run(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_corrupt_checkpoint_is_one_line(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    assert _run("quantize", tiny_model_dir, "--group-size", 16, "--out", out).exit_code == 0
    (out / "model.safetensors").write_bytes(b"garbage")
    result = _run("eval", out)
    assert result.exit_code == 2 and "corrupt" in result.stderr


def test_recipe_file(tiny_model_dir, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps([{"method": "rtn", "bits": 3, "group_size": 32, "symmetric": True}]))
    out = tmp_path / "q"
    result = _run("quantize", tiny_model_dir, "--recipe", recipe, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["recipe"][0]["bits"] == 3 and config["recipe"][0]["symmetric"] is True
    recipe.write_text(json.dumps([{"method": "magic"}]))
    bad = _run("quantize", tiny_model_dir, "--recipe", recipe, "--out", tmp_path / "q2")
    assert bad.exit_code == 2 and "unknown method 'magic'" in bad.stderr


def test_head_bits_gives_the_output_projection_its_own_grid(tiny_model_dir, text_file, tmp_path):
    import torch

    import quantlm

    out = tmp_path / "g"
    result = _run(
        "quantize",
        tiny_model_dir,
        "--method",
        "gptq",
        "--group-size",
        32,
        "--head-bits",
        8,
        "--calib",
        text_file,
        "--calib-samples",
        2,
        "--calib-seqlen",
        32,
        "--out",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    recipe = json.loads(result.stdout)["recipe"]
    assert [r["method"] for r in recipe] == ["gptq", "rtn-head"] and recipe[1]["bits"] == 8
    assert json.loads(result.stdout)["quantized_modules"] == 3 * 7 + 1
    model = quantlm.load(out, dtype=torch.bfloat16)
    assert (
        model.quantlm_kernels["lm_head"] == "int8pack"
        and model.quantlm_kernels["model.layers.0.mlp.up_proj"] == "int4pack"
    )
    both = _run("quantize", tiny_model_dir, "--lm-head", "--head-bits", 8, "--out", tmp_path / "x")
    assert both.exit_code == 2 and "pass one" in both.stderr and not (tmp_path / "x").exists()
    bad = _run("quantize", tiny_model_dir, "--head-bits", 5, "--out", tmp_path / "x")
    assert bad.exit_code == 2 and "head bits must be 8, 4, 3 or 2" in bad.stderr
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps([{"method": "rtn", "bits": 4, "group_size": 32, "lm_head": True}]))
    twice = _run("quantize", tiny_model_dir, "--recipe", recipe, "--head-bits", 8, "--out", tmp_path / "x")
    assert twice.exit_code == 2 and "already quantizes the output projection" in twice.stderr
    assert not (tmp_path / "x").exists()
    attention = _run("generate", out, "--prompt", "The", "--max-new-tokens", 2, "--attention", "flash")
    assert attention.exit_code == 2 and "unknown attention 'flash'" in attention.stderr


def test_gptq_from_the_cli_with_local_calibration_text(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "g"
    result = _run(
        "quantize",
        tiny_model_dir,
        "--method",
        "gptq",
        "--bits",
        4,
        "--group-size",
        16,
        "--calib",
        text_file,
        "--calib-samples",
        4,
        "--calib-seqlen",
        64,
        "--out",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    recipe = json.loads(result.stdout)["recipe"][0]
    assert recipe["method"] == "gptq" and recipe["damp"] == 0.01
    assert recipe["act_order"] is True and recipe["static_groups"] is True  # the defaults
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["calibration"]["n_samples"] == 4
    log = json.loads((out / "quant_log.json").read_text())
    assert all(r["details"]["hessian_tokens"] == 4 * 64 for r in log)
    in_order = _run(
        "quantize",
        tiny_model_dir,
        "--method",
        "gptq",
        "--bits",
        4,
        "--group-size",
        16,
        "--no-act-order",
        "--no-static-groups",
        "--calib",
        text_file,
        "--calib-samples",
        4,
        "--calib-seqlen",
        64,
        "--out",
        tmp_path / "g3",
        "--json",
    )
    assert in_order.exit_code == 0, in_order.output
    recipe = json.loads(in_order.stdout)["recipe"][0]
    assert recipe["act_order"] is False and recipe["static_groups"] is False
    rtn = _run("quantize", tiny_model_dir, "--no-act-order", "--out", tmp_path / "r")
    assert rtn.exit_code != 0 and "--no-act-order does not apply to --method rtn" in rtn.stderr
    text = _run(
        "quantize",
        tiny_model_dir,
        "--method",
        "gptq",
        "--group-size",
        16,
        "--calib",
        text_file,
        "--calib-samples",
        2,
        "--calib-seqlen",
        32,
        "--out",
        tmp_path / "g2",
    )
    assert "Hessian samples: 64 tokens per module" in text.stdout


def test_hessian_clip_from_the_cli(tiny_model_dir, text_file, tmp_path):
    common = ("--calib", text_file, "--calib-samples", 2, "--calib-seqlen", 32, "--json")
    result = _run(
        "quantize",
        tiny_model_dir,
        "--method",
        "gptq",
        "--group-size",
        16,
        "--clip",
        "mse",
        "--hessian-clip",
        *common,
        "--out",
        tmp_path / "h",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["recipe"][0]["hessian_clip"] is True
    no_mse = _run(
        "quantize",
        tiny_model_dir,
        "--method",
        "gptq",
        "--group-size",
        16,
        "--hessian-clip",
        *common,
        "--out",
        tmp_path / "n",
    )
    assert no_mse.exit_code != 0 and "--clip mse" in no_mse.stderr and "Traceback" not in no_mse.output
    rtn = _run("quantize", tiny_model_dir, "--clip", "mse", "--hessian-clip", "--out", tmp_path / "r")
    assert rtn.exit_code != 0 and "--hessian-clip does not apply to --method rtn" in rtn.stderr
    sq = _run(
        "quantize",
        tiny_model_dir,
        "--method",
        "smoothquant",
        "--clip",
        "mse",
        "--hessian-clip",
        *common,
        "--out",
        tmp_path / "s",
    )
    assert sq.exit_code != 0 and "--weights gptq" in sq.stderr
    assert not any((tmp_path / d).exists() for d in ("n", "r", "s"))


def test_calibration_problems_are_caught_before_loading(tiny_model_dir, tmp_path):
    result = _run(
        "quantize", tiny_model_dir, "--method", "gptq", "--calib", tmp_path / "none.txt", "--out", tmp_path / "g"
    )
    assert result.exit_code == 2 and "text file not found" in result.stderr
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    result = _run(
        "quantize", tiny_model_dir, "--method", "gptq", "--calib", short, "--calib-seqlen", 64, "--out", tmp_path / "g"
    )
    assert result.exit_code == 2 and "fewer than one window" in result.stderr
    assert not (tmp_path / "g").exists() and not (tmp_path / ".g.work").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["quantize"], "Missing argument 'model'"),
        (["quantize", "m", "--out", "o", "--bits"], "Option '--bits' requires an argument"),
        (["quantize", "m", "--out", "o", "--method", "spqr"], "'spqr' is not one of"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ],
)
def test_usage_errors_are_one_line_that_names_help(args, message, tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "quantlm.cli", *args], capture_output=True, text=True, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0] and "--help" in lines[0]
