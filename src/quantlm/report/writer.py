"""Writing a report directory: ``report.md``, ``report.json`` (the gathered data, to re-plot elsewhere) and the
PNG plots, assembled in a temporary directory and renamed into place (``quantlm.paths.atomic_directory``).

An existing output is replaced only with ``overwrite``, and only when it is an earlier report or an empty
directory: a mistyped ``--out`` never deletes someone's files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quantlm._version import __version__
from quantlm.errors import QuantlmError
from quantlm.paths import atomic_directory, output_lock
from quantlm.report.gather import Run
from quantlm.report.markdown import report_markdown
from quantlm.report.plots import PLOTS

REPORT_FORMAT = "quantlm-report"
REPORT_FORMAT_VERSION = 1
MARKDOWN_FILE = "report.md"
DATA_FILE = "report.json"


class ReportOutputError(QuantlmError):
    """The report's output directory cannot be written (or would replace something that is not a report)."""


def is_report(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory that ``write_report`` wrote (its report.json says so)."""
    try:
        data = json.loads((Path(path) / DATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == REPORT_FORMAT


def check_report_output(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an output that exists, unless ``overwrite``; and even then anything but an earlier report or an
    empty directory."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ReportOutputError(f"output directory {out} already exists: choose another path or pass --overwrite")
    if not out.is_dir():
        raise ReportOutputError(f"{out} exists and is not a directory: choose another output")
    if any(out.iterdir()) and not is_report(out):
        raise ReportOutputError(
            f"{out} is not a quantlm report: --overwrite only replaces earlier reports (or empty directories); "
            "choose another output"
        )


def report_data(runs: Sequence[Run], skipped: dict[str, str | None]) -> dict[str, Any]:
    """What report.json holds: every run as plain data, and which plots were drawn (null) or why not."""
    return {
        "format": REPORT_FORMAT,
        "format_version": REPORT_FORMAT_VERSION,
        "quantlm_version": __version__,
        "plots": skipped,
        "runs": [dataclasses.asdict(run) for run in runs],
    }


def draw_plots(runs: Sequence[Run], directory: Path) -> dict[str, str | None]:
    """Draw every plot some run has data for into ``directory``; ``{file: None}`` for those drawn and
    ``{file: why not}`` for the others."""
    skipped: dict[str, str | None] = {}
    for spec in PLOTS:
        if any(spec.usable(run) for run in runs):
            spec.draw(runs, directory / spec.file)
            skipped[spec.file] = None
        else:
            skipped[spec.file] = spec.missing
    return skipped


def write_report(runs: Sequence[Run], out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the report of ``runs`` into the directory ``out``; return the path of its Markdown file."""
    out = Path(out)
    with output_lock(out):
        check_report_output(out, overwrite)
        with atomic_directory(out, overwrite=overwrite) as tmp:
            skipped = draw_plots(runs, tmp)
            (tmp / MARKDOWN_FILE).write_text(report_markdown(runs, skipped, __version__), encoding="utf-8")
            data = json.dumps(report_data(runs, skipped), indent=1, default=str, allow_nan=True)
            (tmp / DATA_FILE).write_text(data + "\n", encoding="utf-8")
    return out / MARKDOWN_FILE
