"""`quantlm report` and `quantize --report`: runs gathered from checkpoints, float models and eval/bench JSON,
the Markdown, report.json and the PNG plots, on tiny random models (the bad-input cases are in fault_cases.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import save_tiny_model, unit_environment
from quantlm.cli import app
from quantlm.report import gather_runs, measurement_from_dict, write_report
from quantlm.report.gather import block_index, layer_kind
from quantlm.report.markdown import tasks_section
from quantlm.report.plots import pareto_front

runner = CliRunner()
PNGS = ("pareto.png", "layer_error.png", "speed.png")


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, unit_home):
    """A tiny Llama (plain Hugging Face directory) and two checkpoints of it: RTN W4 g16 and RTN W8 per channel."""
    from quantlm.api import quantize_to_checkpoint

    root = tmp_path_factory.mktemp("report-runs")
    with unit_environment(unit_home):
        model = save_tiny_model(root / "tiny-llama")
        quantize_to_checkpoint(model, [{"method": "rtn", "group_size": 16}], root / "w4", progress=False)
        w8 = {"method": "rtn", "bits": 8, "granularity": "channel", "symmetric": True}
        quantize_to_checkpoint(model, [w8], root / "w8", progress=False)
    return root


def _eval_json(model, ppl: float, **extra) -> dict:
    return {"model": str(model), "ppl": ppl, "tokens": 252, "windows": 4, "seqlen": 64, "data": "sample.txt", **extra}


def _bench_json(model, prefill: float, decode: float) -> dict:
    return {
        "model": str(model),
        "prefill_tokens": 64,
        "prefill_tok_s": prefill,
        "decode_prompt": 16,
        "decode_tokens": 16,
        "decode_tok_s": decode,
        "weight_bytes": {"total": 300_000},
        "threads": 2,
        "dtype": "float32",
        "peak_rss_gb": 0.5,
    }


def _tasks_json(model, **tasks) -> dict:
    return {"model": str(model), "tasks": tasks}


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _png_size(path: Path) -> tuple[int, int]:
    from matplotlib.image import imread

    pixels = imread(path)
    assert pixels.std() > 0, f"{path} is blank"
    return pixels.shape[1], pixels.shape[0]


# ---------------------------------------------------------------------------------------------- pure pieces
def test_block_index_and_layer_kind_come_from_module_names():
    assert block_index("model.layers.7.self_attn.q_proj") == 7
    assert block_index("transformer.h.11.attn.c_attn") == 11
    assert block_index("lm_head") is None
    assert layer_kind("model.layers.7.self_attn.q_proj") == "self_attn.q_proj"
    assert layer_kind("lm_head") == "lm_head"


def test_pareto_front_keeps_the_points_nothing_beats():
    points = [(100.0, 20.0), (50.0, 30.0), (100.0, 25.0), (200.0, 17.0), (200.0, 19.0), (300.0, 17.0)]
    assert pareto_front(points) == [1, 0, 3]


def test_zero_shot_table_has_tasks_as_columns_and_a_mean(tmp_path):
    a = measurement_from_dict(
        _tasks_json("a", piqa={"acc": 0.6, "acc_norm": 0.62, "n": 500}, boolq={"acc": 0.5, "n": 100}), "a.json"
    )
    b = measurement_from_dict(_tasks_json("b", piqa={"acc": 0.7, "acc_norm": 0.72, "n": 500}), "b.json")
    table = tasks_section(gather_runs([], measurements=[a, b]))
    lines = table.splitlines()
    assert "| run | boolq (acc) | piqa (acc_norm) | mean |" in lines
    assert "| a | 50.0 | 62.0 | 56.0 |" in lines
    assert "| b | - | 72.0 | 72.0* |" in lines  # the mean of the tasks it has, marked
    assert "boolq 100, piqa 500" in table


# ---------------------------------------------------------------------------------------------- gathering
def test_several_json_files_of_one_run_are_merged(runs_dir, tmp_path):
    w4 = runs_dir / "w4"
    ppl = _write(tmp_path / "ppl.json", _eval_json(w4, 12.5))
    tasks = _write(tmp_path / "tasks.json", _tasks_json(f"{w4}/", piqa={"acc": 0.6, "n": 10}))  # same dir, spelt apart
    bench = _write(tmp_path / "bench.json", _bench_json(w4, 150.0, 20.0))
    runs = gather_runs([str(w4), str(ppl), str(tasks), str(bench)])
    assert len(runs) == 1
    run = runs[0]
    assert run.label == "rtn(w4 g16 asym)" and run.kind == "checkpoint" and run.bits == "w4"
    assert run.perplexity.ppl == 12.5 and run.perplexity.setting() == "sample.txt, 4 x 64 tokens"
    assert [t.task for t in run.tasks] == ["piqa"] and run.speed.decode_tok_s == 20.0
    assert run.sources == (str(ppl), str(tasks), str(bench))
    assert run.size_bytes == (w4 / "model.safetensors").stat().st_size  # the files, not the bench's weight bytes
    assert len(run.layers) == 3 * 7 and all(layer.block in (0, 1, 2) for layer in run.layers)


def test_a_json_of_a_model_no_run_names_becomes_a_run_of_its_own(runs_dir, tmp_path):
    gone = _write(tmp_path / "gone.json", _eval_json("out/deleted-checkpoint", 30.0))
    bench = _write(tmp_path / "gone-bench.json", _bench_json("out/deleted-checkpoint", 100.0, 10.0))
    found = _write(tmp_path / "w8.json", _eval_json(runs_dir / "w8", 13.0))  # its checkpoint is read
    runs = gather_runs([str(runs_dir / "tiny-llama"), str(gone), str(bench), str(found)])
    assert [r.label for r in runs] == ["fp32 (tiny-llama)", "out/deleted-checkpoint", "rtn(w8 per-channel sym)"]
    measured = runs[1]
    assert measured.kind == "measured only" and measured.perplexity.ppl == 30.0
    assert measured.size_bytes == 300_000  # from the bench JSON, having no files here
    assert runs[2].kind == "checkpoint" and runs[2].perplexity.ppl == 13.0


# ---------------------------------------------------------------------------------------------- the command
def test_report_of_checkpoints_a_float_model_and_json(runs_dir, tmp_path):
    model, w4, w8 = runs_dir / "tiny-llama", runs_dir / "w4", runs_dir / "w8"
    files = [
        _write(tmp_path / "fp.json", _eval_json(model, 270.125)),
        _write(tmp_path / "w4.json", _eval_json(w4, 271.5)),
        _write(tmp_path / "w8.json", _eval_json(w8, 270.25)),
        _write(tmp_path / "w4-bench.json", _bench_json(w4, 150.0, 21.5)),
        _write(tmp_path / "fp-bench.json", _bench_json(model, 160.0, 19.0)),
        _write(tmp_path / "tasks.json", _tasks_json(w4, piqa={"acc": 0.61, "acc_norm": 0.63, "n": 50})),
    ]
    out = tmp_path / "report"
    result = _run("report", model, w4, w8, *files, "--out", out, "--label", f"{w8}=int8 weights", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["runs"] == ["fp32 (tiny-llama)", "rtn(w4 g16 asym)", "int8 weights"]
    assert summary["plots"] == sorted(PNGS)
    for name in PNGS:
        width, height = _png_size(out / name)
        assert width > 100 and height > 100, name
    text = (out / "report.md").read_text()
    for fragment in (
        "| fp32 (tiny-llama) | none (float weights) | fp32 |",
        "| rtn(w4 g16 asym) | rtn | w4 |",
        "| int8 weights | rtn | w8 |",
        "270.125",
        "271.500",
        "| 150 | 21.5 |",
        "## Zero-shot accuracy",
        "| rtn(w4 g16 asym) | 63.0 | 63.0 |",
        "![Perplexity against size](pareto.png)",
        "![Quantization error across depth](layer_error.png)",
        "![Speed](speed.png)",
        "Not in this plot (no quant log): fp32 (tiny-llama).",
        "Perplexity against size",
        f"checkpoint `{w4}`",
        str(files[3]),
    ):
        assert fragment in text, fragment
    data = json.loads((out / "report.json").read_text())
    assert data["format"] == "quantlm-report" and len(data["runs"]) == 3
    assert data["runs"][1]["layers"][0]["module"] == "model.layers.0.self_attn.q_proj"

    again = _run("report", model, "--out", out)  # refused without --overwrite: the report is intact
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert (out / "speed.png").is_file()
    replaced = _run("report", model, "--out", out, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "speed.png").exists() and "fp32 (tiny-llama)" in (out / "report.md").read_text()


def test_the_json_of_eval_and_bench_names_its_model_and_joins_its_run(runs_dir, text_file, tmp_path):
    w4 = runs_dir / "w4"
    evaluated = _run("eval", w4, "--data", text_file, "--seqlen", 32, "--max-windows", 1, "--json")
    bench_args = ("--prefill-tokens", 8, "--decode-prompt", 4, "--decode-tokens", 2, "--repeats", 1)
    benched = _run("bench", w4, "--data", text_file, *bench_args, "--json")
    assert evaluated.exit_code == 0 and benched.exit_code == 0, evaluated.output + benched.output
    files = [tmp_path / "eval.json", tmp_path / "bench.json"]
    for path, result in zip(files, (evaluated, benched)):
        path.write_text(result.stdout)
        assert json.loads(result.stdout)["model"] == str(w4)
    [run] = gather_runs([str(w4), *map(str, files)])
    assert run.perplexity.ppl == json.loads(evaluated.stdout)["ppl"] and run.speed.prefill_tokens == 8


def test_nothing_to_plot_still_writes_the_markdown(runs_dir, tmp_path):
    out = tmp_path / "report"
    result = _run("report", runs_dir / "tiny-llama", "--out", out)
    assert result.exit_code == 0, result.output
    assert "plots: none" in result.stdout
    text = (out / "report.md").read_text()
    assert text.count("No plot: ") == 3 and "fp32 (tiny-llama)" in text
    assert not list(out.glob("*.png"))


def test_quantize_report_end_to_end(runs_dir, tmp_path):
    import quantlm

    out = tmp_path / "q"
    result = _run("quantize", runs_dir / "tiny-llama", "--group-size", 16, "--out", out, "--report", "--json")
    assert result.exit_code == 0, result.output
    report = out / "report"
    assert json.loads(result.stdout)["report"] == str(report / "report.md")
    text = (report / "report.md").read_text()
    assert "rtn(w4 g16 asym)" in text and "(the whole quantize run)" in text
    assert _png_size(report / "layer_error.png")[0] > 100
    # the checkpoint still verifies and loads with its checksums checked, and quantize --overwrite replaces it
    assert _run("verify", out).exit_code == 0
    quantlm.load(out)
    again = _run("quantize", runs_dir / "tiny-llama", "--group-size", 32, "--out", out, "--overwrite")
    assert again.exit_code == 0, again.output
    assert not report.exists()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["recipe"][0]["group_size"] == 32


def test_quantize_report_shows_the_eval_perplexity(runs_dir, tmp_path):
    from quantlm.cli import _write_quantize_report
    from quantlm.eval.perplexity import PerplexityResult

    out = tmp_path / "w4"
    shutil.copytree(runs_dir / "w4", out)
    path = _write_quantize_report(out, 2.5, PerplexityResult(ppl=21.75, nll=1.0, tokens=65504, windows=32, seqlen=2048))
    text = path.read_text()
    assert "| rtn(w4 g16 asym) | rtn | w4 |" in text and "21.750 | 2.50 |" in text
    assert "21.7500 (enwiki, 32 x 2048 tokens), from `quantize --eval`" in text
    assert _png_size(out / "report" / "pareto.png")[0] > 100


def test_write_report_replaces_only_reports(runs_dir, tmp_path):
    from quantlm.report import ReportOutputError

    runs = gather_runs([str(runs_dir / "w8")])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n")
    with pytest.raises(ReportOutputError, match="only replaces earlier reports"):
        write_report(runs, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me\n" and len(list(mine.iterdir())) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_report(runs, empty, overwrite=True).is_file()
