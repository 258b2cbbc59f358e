"""The report's Markdown: the runs table, the zero-shot table, the plots (or why one is missing) and each run's
details. Pure functions of the gathered runs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from statistics import mean

from quantlm.report.gather import Run, TaskScore, finite
from quantlm.report.plots import PLOTS, PlotSpec, eval_setting, format_amount

NONE = "-"


def _cell(value: object) -> str:
    text = NONE if value is None or value == "" else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.1f}"


# ---------------------------------------------------------------------------------------------- runs
RUNS_HEADER = (
    "run",
    "method",
    "bits",
    "size (MB)",
    "perplexity",
    "quantize (s)",
    "prefill (tok/s)",
    "decode (tok/s)",
)


def runs_row(run: Run) -> list[object]:
    ppl = run.perplexity.ppl if run.perplexity is not None else None
    speed = run.speed
    return [
        run.label,
        run.method,
        run.bits,
        format_amount(run.size_mb),
        None if ppl is None else (f"{ppl:.3f}" if finite(ppl) else str(ppl)),
        format_amount(run.quantize_seconds),
        None if speed is None else format_amount(speed.prefill_tok_s),
        None if speed is None else format_amount(speed.decode_tok_s),
    ]


def runs_notes(runs: Sequence[Run]) -> list[str]:
    notes = [
        "size: the weights files (.safetensors) on disk; perplexity: lower is better; tok/s: tokens per second.",
    ]
    if any(run.quantize_seconds is not None for run in runs):
        notes.append(
            "quantize (s): the run's wall time where the report was written by `quantize --report`, else the sum of "
            "the per-layer times in the quant log (without loading and calibration)."
        )
    measured = [run for run in runs if run.perplexity is not None]
    if len(measured) > 1 and not eval_setting(measured):
        settings = "; ".join(f"{run.label}: {run.perplexity.setting() or 'unknown'}" for run in measured)
        notes.append(f"**The perplexities were measured on different settings and are not comparable** ({settings}).")
    return notes


def runs_section(runs: Sequence[Run]) -> str:
    table = _table(RUNS_HEADER, [runs_row(run) for run in runs])
    return "## Runs\n\n" + table + "\n\n" + "\n".join(f"- {note}" for note in runs_notes(runs))


# ---------------------------------------------------------------------------------------------- zero-shot
def task_metric(task: str, runs: Sequence[Run]) -> str:
    """``acc_norm`` for a task when every run that has it reports it, else ``acc``."""
    scores = [s for run in runs for s in run.tasks if s.task == task]
    return "acc_norm" if scores and all(s.acc_norm is not None for s in scores) else "acc"


def _task_value(scores: Mapping[str, TaskScore], task: str, metric: str) -> float | None:
    score = scores.get(task)
    return None if score is None else getattr(score, metric)


def tasks_section(runs: Sequence[Run]) -> str | None:
    """The zero-shot accuracy table (%), tasks as columns and their mean; None when no run has tasks."""
    tasks = sorted({s.task for run in runs for s in run.tasks})
    if not tasks:
        return None
    metrics = {task: task_metric(task, runs) for task in tasks}
    rows, partial = [], False
    for run in runs:
        if not run.tasks:
            continue
        scores = {s.task: s for s in run.tasks}
        values = [_task_value(scores, task, metrics[task]) for task in tasks]
        known = [v for v in values if v is not None]
        partial |= len(known) < len(tasks)
        mark = "*" if len(known) < len(tasks) else ""
        rows.append([run.label, *(_percent(v) for v in values), f"{_percent(mean(known))}{mark}"])
    header = ["run", *(f"{task} ({metrics[task]})" for task in tasks), "mean"]
    sizes = {s.task: s.n for run in runs for s in run.tasks if s.n}
    notes = ["accuracy in %, higher is better; acc_norm: accuracy with length-normalised scores, where reported."]
    if sizes:
        notes.append("examples per task: " + ", ".join(f"{task} {n}" for task, n in sorted(sizes.items())) + ".")
    if partial:
        notes.append("\\* the mean of the tasks this run has: not comparable with the full means.")
    return "## Zero-shot accuracy\n\n" + _table(header, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)


# ---------------------------------------------------------------------------------------------- plots
def plot_section(spec: PlotSpec, skipped: str | None, runs: Sequence[Run]) -> str:
    if skipped is not None:
        return f"## {spec.heading}\n\nNo plot: {skipped}."
    text = f"## {spec.heading}\n\n![{spec.heading}]({spec.file})"
    left_out = [run.label for run in runs if not spec.usable(run)]
    if left_out:
        text += f"\n\nNot in this plot ({spec.lacking}): {', '.join(left_out)}."
    return text


# ---------------------------------------------------------------------------------------------- details
def describe_calibration(calibration: Mapping[str, object] | None) -> str | None:
    if not calibration:
        return None
    c = calibration
    if {"n_samples", "seqlen", "source"} <= set(c):
        split = f" ({c['split']} split)" if c.get("split") else ""
        seed = f", seed {c['seed']}" if c.get("seed") is not None else ""
        return f"{c['n_samples']} x {c['seqlen']} tokens of {c['source']}{split}{seed}"
    return json.dumps(dict(c), sort_keys=True, default=str)


def describe_quant_log(run: Run) -> str | None:
    if not run.layers:
        return None
    worst = max(run.layers, key=lambda layer: layer.error)
    text = (
        f"{len(run.layers)} layers; relative weight error mean {mean(layer.error for layer in run.layers):.4f}, "
        f"max {worst.error:.4f} (`{worst.module}`)"
    )
    outside = [layer for layer in run.layers if layer.block is None]
    if outside:
        text += "; outside the decoder blocks: " + ", ".join(f"`{layer.module}` {layer.error:.4f}" for layer in outside)
    return text


def _describe_perplexity(run: Run) -> str | None:
    p = run.perplexity
    if p is None:
        return None
    what = ", ".join(x for x in (p.setting(), p.dtype) if x)
    return f"{p.ppl:.4f}" + (f" ({what})" if what else "") + f", from `{p.source}`"


def _describe_tasks(run: Run) -> str | None:
    if not run.tasks:
        return None
    parts = []
    for s in run.tasks:
        norm = f", acc_norm {_percent(s.acc_norm)}%" if s.acc_norm is not None else ""
        parts.append(f"{s.task} acc {_percent(s.acc)}%{norm}" + (f" (n {s.n})" if s.n else ""))
    sources = sorted({f"`{s.source}`" for s in run.tasks})
    return "; ".join(parts) + ", from " + ", ".join(sources)


def _describe_speed(run: Run) -> str | None:
    s = run.speed
    if s is None:
        return None
    setting = [x for x in (s.dtype, f"{s.threads} threads" if s.threads else None, s.kernels) if x]
    if s.peak_rss_gb is not None:
        setting.append(f"peak RSS {s.peak_rss_gb:.2f} GB")
    return (
        f"prefill {format_amount(s.prefill_tok_s)} tok/s, decode {format_amount(s.decode_tok_s)} tok/s"
        + (f" ({', '.join(setting)})" if setting else "")
        + f", from `{s.source}`"
    )


def _describe_where(run: Run) -> str:
    if run.directory is None:
        return f"measured only: `{run.model}` is not a directory here, so only its JSON files are shown"
    text = f"{run.kind} `{run.directory}`"
    if run.model != run.directory:
        text += f" (given as `{run.model}`)"
    if run.made_from:
        text += f", made from `{run.made_from}`"
    return text


def run_details(run: Run) -> str:
    size = f"{format_amount(run.size_mb)} MB ({run.size_from})" if run.size_mb is not None else None
    seconds = f"{format_amount(run.quantize_seconds)} s ({run.seconds_from})" if run.quantize_seconds else None
    recipe = f"`{json.dumps([dict(step) for step in run.recipe], sort_keys=True)}`" if run.recipe else None
    items = [
        ("where", _describe_where(run)),
        ("recipe", recipe),
        ("calibration", describe_calibration(run.calibration)),
        ("training", json.dumps(dict(run.training), default=str) if run.training else None),
        ("KV cache", run.kv_cache),
        ("quant log", describe_quant_log(run)),
        ("size", size),
        ("quantize", seconds),
        ("perplexity", _describe_perplexity(run)),
        ("zero-shot", _describe_tasks(run)),
        ("speed", _describe_speed(run)),
    ]
    lines = [f"- {name}: {text}" for name, text in items if text]
    return f"### {run.label}\n\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the page
def report_markdown(runs: Sequence[Run], skipped: Mapping[str, str | None], version: str) -> str:
    """The whole report; ``skipped`` maps each plot's file to why it was not drawn (None: it was)."""
    sections = [
        f"# quantlm report\n\n{len(runs)} run{'s' if len(runs) != 1 else ''}, written by quantlm {version}. "
        "The data behind this page is in [report.json](report.json).",
        runs_section(runs),
    ]
    tasks = tasks_section(runs)
    if tasks:
        sections.append(tasks)
    sections += [plot_section(spec, skipped.get(spec.file), runs) for spec in PLOTS]
    sections.append("## Run details\n\n" + "\n\n".join(run_details(run) for run in runs))
    return "\n\n".join(sections) + "\n"
