"""Every registered method and its settings, as data and as the Markdown of docs/methods.md (``quantlm methods``).

docs/methods.md is this module's output (``quantlm methods --markdown > docs/methods.md``; a test keeps the two
equal), so the documented settings and defaults are the ones the code has.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

from quantlm.core import QuantSpec
from quantlm.methods.base import cli_settings, field_default, flat_spec_field, registered_methods


def _type_name(hint: Any) -> str:
    text = str(hint) if typing.get_origin(hint) else getattr(hint, "__name__", str(hint))
    return text.replace("typing.", "").replace("NoneType", "None")


def method_settings(cls: type) -> list[dict[str, Any]]:
    """One row per setting of ``cls``: key, type, default, command-line flag and help (a flat QuantSpec's keys
    first)."""
    hints = typing.get_type_hints(cls)
    offered = cls.offered and cls.pipeline  # only ``quantlm quantize --method`` choices have flags
    flags = {target: entry for entry in cli_settings([cls]).values() for _, target in entry.targets} if offered else {}
    rows = []
    flat = flat_spec_field(cls)
    if flat is not None:
        spec_hints = typing.get_type_hints(QuantSpec)
        for f in dataclasses.fields(QuantSpec):
            entry = flags.get(f"spec.{f.name}")
            rows.append(_row(f.name, spec_hints[f.name], getattr(field_default(flat), f.name), entry))
    for f in dataclasses.fields(cls):
        if f is not flat:
            rows.append(_row(f.name, hints[f.name], field_default(f), flags.get(f.name)))
    return rows


def _row(key: str, hint: Any, default: Any, entry) -> dict[str, Any]:
    if isinstance(default, QuantSpec):
        default = default.to_dict()
    elif isinstance(default, tuple):
        default = list(default)
    return {
        "key": key,
        "type": _type_name(hint),
        "default": default,
        "flag": None if entry is None else " ".join(entry.flags),
        "help": None if entry is None else entry.help,
    }


def catalog() -> dict[str, dict[str, Any]]:
    """Every registered method: what it is and its settings."""
    result = {}
    for name, cls in registered_methods().items():
        doc = inspect.getdoc(cls) or ""
        result[name] = {
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "summary": " ".join(doc.split("\n\n")[0].split()),
            "offered": bool(cls.offered and cls.pipeline),
            "needs_calibration": cls.needs_calibration if isinstance(cls.needs_calibration, bool) else "settings",
            "quantizes_weights": cls.quantizes_weights,
            "pipeline": cls.pipeline,
            "next_step_defaults": dict(cls.next_step_defaults),
            "settings": method_settings(cls),
        }
    return result


def _needs(value) -> str:
    return {True: "needed", False: "none"}.get(value, "depends on the settings")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    text = value if isinstance(value, str) else repr(value).replace("'", '"')
    return text.replace("|", "\\|")


def catalog_markdown() -> str:
    lines = [
        "# Methods and their settings",
        "",
        "Generated from the method registry by `quantlm methods --markdown > docs/methods.md`; do not edit by hand.",
        'A recipe step is `{"method": NAME, ...settings}` (JSON/YAML, or the Python classes); a setting left out',
        "takes the default below. Flags are the `quantlm quantize` options; a setting without a flag is set in a",
        "recipe file. `bits`, `symmetric`, `group_size`, `granularity` and `clip` are the weight grid (`QuantSpec`).",
        "",
    ]
    for name, entry in catalog().items():
        where = "`quantlm quantize --method " + name + "`" if entry["offered"] else "not a `--method` choice"
        lines += [
            f"## {name}",
            "",
            entry["summary"],
            "",
            f"Class `{entry['class']}`; {where}; calibration data: {_needs(entry['needs_calibration'])}.",
            "",
        ]
        if entry["next_step_defaults"]:
            settings_text = ", ".join(f"`{k}={v!r}`" for k, v in entry["next_step_defaults"].items())
            lines += [
                "It does not quantize weights: on the command line the `--weights` method follows it (default rtn), "
                f"with {settings_text} unless given.",
                "",
            ]
        lines += ["| setting | type | default | flag | what it does |", "|---|---|---|---|---|"]
        for row in entry["settings"]:
            lines.append(
                f"| `{row['key']}` | {_cell(row['type'])} | `{_cell(row['default'])}` | "
                f"{_cell(row['flag'] and '`' + row['flag'] + '`')} | {_cell(row['help'])} |"
            )
        lines.append("")
    return "\n".join(lines)
