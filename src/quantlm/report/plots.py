"""The report's plots, drawn with matplotlib's object interface on the Agg canvas (PNG files, no display, no
pyplot: nothing global is touched, and a figure is gone once its function returns).

Each ``draw_*`` function takes every run of the report (a run keeps one colour in every plot) and draws those that
have what the plot needs; ``PLOTS`` says which runs that is and what the report says when none does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from quantlm.report.gather import Run, Speed, finite

DPI = 150
_MIN_DECADES_FOR_LOG = 1.0  # an axis whose values span at least this many powers of ten is drawn logarithmic


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> None:
    figure.savefig(path, dpi=DPI)
    figure.clear()


def run_color(index: int) -> tuple[float, float, float, float]:
    """The colour of the ``index``-th run of the report, the same in every plot."""
    from matplotlib import colormaps

    return colormaps["tab10"](index % 10)


def format_amount(value: float | None) -> str | None:
    """A quantity with three or four significant digits and no exponent (0.262, 1.11, 54.2, 540, 1,105)."""
    if value is None or not finite(value):
        return None if value is None else str(value)
    for limit, digits in ((100, 0), (10, 1), (1, 2)):
        if abs(value) >= limit:
            return f"{value:,.{digits}f}"
    return f"{value:.3f}"


def _spans_decades(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) > 1 and math.log10(max(positive) / min(positive)) >= _MIN_DECADES_FOR_LOG


def _log_scale(ax, which: str) -> None:
    """Make the ``which`` ("x" or "y") axis logarithmic, with plain numbers at 1, 2 and 5 times each power of ten
    (0.02, 0.05, 0.1...)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


# ---------------------------------------------------------------------------------------------- pareto
def has_size_and_perplexity(run: Run) -> bool:
    return run.perplexity is not None and finite(run.perplexity.ppl) and run.size_mb is not None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (size, perplexity) points no other point beats: none is both as small and as good, and
    better in one; ordered by size."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def eval_setting(runs: Sequence[Run]) -> str:
    """What the perplexities were measured on, when every run says the same (else the empty string)."""
    settings = {run.perplexity.setting() for run in runs if run.perplexity is not None}
    return settings.pop() if len(settings) == 1 else ""


_LABEL_OFFSETS = [(dx, dy) for dy in (0, 11, -11, 22, -22, 33, -33) for dx in (7, -7)]  # points: right or left
_LABEL_BACKGROUND = {"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.75}


def _overlap(a, b) -> float:
    """The area two display-space boxes share."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(width, 0.0) * max(height, 0.0)


def _outside(box, frame) -> float:
    """How much of ``box`` lies outside ``frame`` (area)."""
    return box.width * box.height - _overlap(box, frame)


def _annotate(ax, point, label: str, offset: tuple[float, float], fontsize: float, line: bool = False):
    dx, dy = offset
    arrow = {"arrowstyle": "-", "color": "0.55", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 4} if line else None
    return ax.annotate(
        label,
        point,
        xytext=offset,
        textcoords="offset points",
        fontsize=fontsize,
        ha="left" if dx > 0 else "right",
        va="center",
        arrowprops=arrow,
        bbox=_LABEL_BACKGROUND,
    )


def place_labels(ax, points: Sequence[tuple[float, float]], labels: Sequence[str], fontsize: float = 8) -> None:
    """Label each point at the first position around it (right, left, then further up and down) where the text
    covers no earlier label and no point and stays inside the axes; failing that, at the least bad one. A label
    moved off its point's row gets a thin line to it."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    size = 10 * ax.figure.dpi / 72  # a marker's box, pixels
    markers = [Bbox.from_bounds(*(ax.transData.transform(p) - size / 2), size, size) for p in points]
    placed: list = []
    for k, (point, label) in enumerate(zip(points, labels)):
        obstacles = placed + markers[:k] + markers[k + 1 :]
        costs = []
        for offset in _LABEL_OFFSETS:
            text = _annotate(ax, point, label, offset, fontsize)
            box = text.get_window_extent(renderer).expanded(1.04, 1.15)
            text.remove()
            costs.append((sum(_overlap(box, o) for o in obstacles) + 10 * _outside(box, frame), offset, box))
            if costs[-1][0] == 0:
                break
        _, offset, box = min(costs, key=lambda c: c[0])
        _annotate(ax, point, label, offset, fontsize, line=offset[1] != 0)
        placed.append(box)


def _pareto_legend(figure, with_float: bool) -> None:
    from matplotlib.lines import Line2D

    handles = [
        Line2D(
            [],
            [],
            linestyle="--",
            color="0.45",
            marker="o",
            markerfacecolor="white",
            markeredgecolor="black",
            label="Pareto front: no other run is both smaller and lower",
        ),
    ]
    if with_float:
        handles.append(Line2D([], [], linestyle="", marker="*", markersize=11, color="0.6", label="float weights"))
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)


def draw_pareto(runs: Sequence[Run], path: Path) -> None:
    """Perplexity against size on disk, one labelled point per run, the Pareto front as a dashed line through the
    black-edged points on it."""
    shown = [(i, run) for i, run in enumerate(runs) if has_size_and_perplexity(run)]
    points = [(run.size_mb, run.perplexity.ppl) for _, run in shown]
    front = pareto_front(points)
    figure = _figure(8.5, 5.6)
    ax = figure.add_subplot()
    for k, (i, run) in enumerate(shown):
        is_float = run.kind == "float model"
        ax.scatter(
            *points[k],
            s=(160 if is_float else 55) * (1.3 if k in front else 1.0),
            color=run_color(i),
            marker="*" if is_float else "o",
            edgecolors="black" if k in front else "none",
            linewidths=0.9,
            zorder=3,
        )
    ax.plot(
        [points[k][0] for k in front],
        [points[k][1] for k in front],
        linestyle="--",
        color="0.45",
        linewidth=1,
        zorder=2,
    )
    if _spans_decades([p[0] for p in points]):
        _log_scale(ax, "x")
    if _spans_decades([p[1] for p in points]):
        _log_scale(ax, "y")
    ax.margins(x=0.12, y=0.12)
    ax.set_xlabel("model size on disk (MB, weights files)")
    ax.set_ylabel("perplexity (lower is better)")
    setting = eval_setting([run for _, run in shown])
    ax.set_title("Perplexity against size" + (f": {setting}" if setting else ""))
    ax.grid(True, which="both", alpha=0.3)
    _pareto_legend(figure, any(run.kind == "float model" for _, run in shown))
    figure.canvas.draw()  # settles the layout and the limits, so that the labels can be placed around the points
    ax.set_autoscale_on(False)
    place_labels(ax, points, [run.label for _, run in shown])
    _save(figure, path)


# ---------------------------------------------------------------------------------------------- layer error
def has_layer_errors(run: Run) -> bool:
    return any(layer.block is not None for layer in run.layers)


def block_errors(run: Run) -> dict[int, list[float]]:
    """The relative weight errors of each decoder block's layers, by block index."""
    blocks: dict[int, list[float]] = {}
    for layer in run.layers:
        if layer.block is not None:
            blocks.setdefault(layer.block, []).append(layer.error)
    return dict(sorted(blocks.items()))


def kind_errors(run: Run) -> dict[str, dict[int, float]]:
    """Each kind of layer's (``self_attn.q_proj``...) error by block index, in the order the log lists them."""
    kinds: dict[str, dict[int, float]] = {}
    for layer in run.layers:
        if layer.block is not None:
            kinds.setdefault(layer.kind, {})[layer.block] = layer.error
    return kinds


def _plot_one_run_by_kind(ax, run: Run) -> list[float]:
    from matplotlib import colormaps

    kinds = kind_errors(run)
    palette = colormaps["tab10"] if len(kinds) <= 10 else colormaps["tab20"]
    for j, (kind, errors) in enumerate(kinds.items()):
        ax.plot(
            list(errors),
            list(errors.values()),
            marker="o",
            markersize=3,
            linewidth=1.2,
            color=palette(j % palette.N),
            label=kind,
        )
    blocks = block_errors(run)
    ax.plot(list(blocks), [mean(v) for v in blocks.values()], color="black", linewidth=2.2, label="mean of the block")
    return [layer.error for layer in run.layers if layer.block is not None]


def _plot_runs_by_mean(ax, runs: Sequence[Run]) -> list[float]:
    values = []
    for i, run in enumerate(runs):
        if not has_layer_errors(run):
            continue
        blocks = block_errors(run)
        x = list(blocks)
        color = run_color(i)
        ax.plot(
            x, [mean(v) for v in blocks.values()], marker="o", markersize=3, linewidth=1.6, color=color, label=run.label
        )
        lows, highs = [min(v) for v in blocks.values()], [max(v) for v in blocks.values()]
        ax.fill_between(x, lows, highs, color=color, alpha=0.12)
        values += [e for v in blocks.values() for e in v]
    return values


def draw_layer_error(runs: Sequence[Run], path: Path) -> None:
    """Relative weight error across depth: with one quantized run, a line per kind of layer and the block mean;
    with several, each run's block mean with its min-max band."""
    with_log = [run for run in runs if has_layer_errors(run)]
    figure = _figure(9.0, 5.6)
    ax = figure.add_subplot()
    if len(with_log) == 1:
        values = _plot_one_run_by_kind(ax, with_log[0])
        ax.set_title(f"Quantization error across depth: {with_log[0].label}")
        legend_title = None
    else:
        values = _plot_runs_by_mean(ax, runs)
        ax.set_title("Quantization error across depth")
        legend_title = "line: mean of the block's layers; band: their min to max"
    if _spans_decades(values):
        _log_scale(ax, "y")
    ax.set_ylabel("relative weight error ‖W − Ŵ‖ / ‖W‖")
    ax.set_xlabel("decoder block (0 = nearest the embeddings)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, which="both", alpha=0.3)
    columns = 4 if len(with_log) == 1 else 2
    figure.legend(
        loc="outside lower center", ncols=columns, fontsize=8, frameon=False, title=legend_title, title_fontsize=8
    )
    _save(figure, path)


# ---------------------------------------------------------------------------------------------- speed
def has_speed(run: Run) -> bool:
    return run.speed is not None


def speed_setting(speeds: Sequence[Speed]) -> str:
    """What was timed, when every run says the same, e.g. ``Speed (batch 1, median of the timed runs): prefill of
    a 2048-token prompt; decode of 128 new tokens after a 128-token prompt``."""
    prompts = {s.prefill_tokens for s in speeds}
    decodes = {(s.decode_tokens, s.decode_prompt) for s in speeds}
    parts = []
    if len(prompts) == 1 and None not in prompts:
        parts.append(f"prefill of a {prompts.pop()}-token prompt")
    if len(decodes) == 1 and None not in next(iter(decodes)):
        new, prompt = decodes.pop()
        parts.append(f"decode of {new} new tokens after a {prompt}-token prompt")
    return "Speed (batch 1, median of the timed runs)" + (": " + "; ".join(parts) if parts else "")


def draw_speed(runs: Sequence[Run], path: Path) -> None:
    """Prefill and decode throughput per run: two panels of horizontal bars, the value at each bar's end."""
    shown = [(i, run) for i, run in enumerate(runs) if has_speed(run)]
    figure = _figure(10.0, 1.8 + 0.45 * len(shown))
    panels = figure.subplots(1, 2, sharey=True)
    labels = [run.label for _, run in shown]
    colors = [run_color(i) for i, _ in shown]
    for ax, phase in zip(panels, ("prefill", "decode")):
        values = [getattr(run.speed, f"{phase}_tok_s") for _, run in shown]
        y = range(len(shown))
        ax.barh(y, values, color=colors, height=0.6)
        for row, value in zip(y, values):
            ax.annotate(
                format_amount(value), (value, row), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8
            )
        ax.set_xlim(0, max(values) * 1.18 if max(values) > 0 else 1)
        ax.set_xlabel(f"{phase} throughput (tokens/s, higher is better)")
        ax.set_title(phase.capitalize(), fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    panels[0].set_yticks(list(range(len(shown))), labels, fontsize=8)
    panels[0].invert_yaxis()  # the first run on top, as in the table
    figure.suptitle(speed_setting([run.speed for _, run in shown]), fontsize=10)
    _save(figure, path)


# ---------------------------------------------------------------------------------------------- the list
@dataclass(frozen=True)
class PlotSpec:
    file: str
    heading: str
    usable: Callable[[Run], bool]  # whether a run has what the plot needs
    draw: Callable[[Sequence[Run], Path], None]
    missing: str  # what the report says when no run is usable
    lacking: str  # what the runs left out of the plot lack


PLOTS = (
    PlotSpec(
        "pareto.png",
        "Perplexity against size",
        has_size_and_perplexity,
        draw_pareto,
        "no run has both a perplexity and a size (pass the JSON of `quantlm eval MODEL --json`)",
        "no perplexity, or no size",
    ),
    PlotSpec(
        "layer_error.png",
        "Quantization error across depth",
        has_layer_errors,
        draw_layer_error,
        "no run has a quant log with per-layer errors (only quantlm checkpoints do)",
        "no quant log",
    ),
    PlotSpec(
        "speed.png",
        "Speed",
        has_speed,
        draw_speed,
        "no run has speed measurements (pass the JSON of `quantlm bench MODEL --json`)",
        "no bench JSON",
    ),
)
