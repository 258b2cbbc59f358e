"""The main job of a fresh checkout, on a tiny model: GPTQ into a checkpoint, evaluated, as a table."""

from __future__ import annotations

import json

import quantlm
from conftest import save_tiny_model
from quantlm import quickstart
from quantlm.methods import GPTQ


def test_quickstart_quantizes_with_gptq_and_reports_both_models(tmp_path):
    src = save_tiny_model(tmp_path / "fp")
    rows = quickstart.run(model=str(src), out=tmp_path / "q", max_windows=1, seqlen=64, calib_samples=2)
    assert [r.method for r in rows] == ["fp32", "gptq"]
    assert rows[1].bits == "4" and rows[1].group_size == "64" and rows[1].size_mb < rows[0].size_mb
    assert all(r.ppl > 1 for r in rows)
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    step = quantlm.parse_recipe(config["recipe"]).steps[0]
    assert isinstance(step, GPTQ) and step.to_config() == quickstart.best_recipe()[0].to_config()
    assert config["calibration"]["n_samples"] == 2
    table = quickstart.format_table(rows)
    assert "| gptq | 4 | 64 |" in table and not (tmp_path / ".q.work").exists()


def test_the_printed_command_makes_the_same_recipe(tmp_path, text_file):
    """The command the quickstart prints beside its table reproduces its recipe on the command line."""
    from typer.testing import CliRunner

    from quantlm.cli import app

    src = save_tiny_model(tmp_path / "fp")
    command = quickstart.recipe_command(str(src), tmp_path / "cli", calib_samples=2).split()
    assert command[:2] == ["quantlm", "quantize"]
    args = [*command[1:], "--calib", str(text_file), "--calib-seqlen", "64"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "cli" / "config.json").read_text())["quantization_config"]
    assert quantlm.parse_recipe(config["recipe"]).steps[0].to_config() == quickstart.best_recipe()[0].to_config()


def test_presets():
    fast, full = quickstart.PRESETS["fast"], quickstart.PRESETS["full"]
    assert (full.calib_samples, full.max_windows) == (128, 32)  # the benchmark protocol
    assert fast.calib_samples < full.calib_samples and fast.max_windows < full.max_windows
