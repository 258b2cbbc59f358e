"""Evaluation reports (``quantlm report``): runs gathered from checkpoints, model directories and the JSON of
``quantlm eval --json`` / ``quantlm bench --json`` (``gather``), drawn as PNG plots (``plots``) and written up as
Markdown (``markdown``) in one atomically written directory (``writer``). See docs/report.md."""

from quantlm.report.gather import (
    LayerError,
    Measurement,
    Perplexity,
    ReportInputError,
    Run,
    Speed,
    TaskScore,
    gather_runs,
    measurement_from_dict,
    read_measurement,
    read_run,
)
from quantlm.report.writer import ReportOutputError, check_report_output, is_report, write_report

__all__ = [
    "LayerError",
    "Measurement",
    "Perplexity",
    "ReportInputError",
    "ReportOutputError",
    "Run",
    "Speed",
    "TaskScore",
    "check_report_output",
    "gather_runs",
    "is_report",
    "measurement_from_dict",
    "read_measurement",
    "read_run",
    "write_report",
]
