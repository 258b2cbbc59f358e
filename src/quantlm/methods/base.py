"""What a method is: a frozen dataclass of settings with a registered name, turned into and out of plain data by
one generic converter.

A method's settings are the fields of its class, each with its default stated once, in the field. A field's
``metadata`` says how the command line offers it (``setting(...)``: the help text, and the flag where it is not
``--field-name``); a field of type ``QuantSpec`` is written flat, its keys beside the method's own
(``{"method": "rtn", "bits": 4, "group_size": 64, ...}``), and its command-line flags are QuantSpec's.

``register`` puts a method class in the registry under its ``name``; every module of ``quantlm.methods`` is
imported the first time the registry is read, so a new method is one new file. The recipe reader, the command
line, the checkpoint and the docs all read the registry.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from quantlm.core import QuantSpec
from quantlm.errors import InvalidSpecError

_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make the method ``cls.name`` known to recipes, the command line and checkpoints."""
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
        raise TypeError(f"{cls.__name__}: a method's settings are a frozen dataclass")
    known = _REGISTRY.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise TypeError(f"two methods are named {cls.name!r}: {known.__qualname__} and {cls.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


@functools.cache
def _discover() -> None:
    """Import every module of ``quantlm.methods`` once (each registers its methods)."""
    import quantlm.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def registered_methods() -> dict[str, type]:
    """Every method by name (importing the method modules on first use)."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def method_class(name: str) -> type:
    methods = registered_methods()
    if name not in methods:
        raise InvalidSpecError(f"unknown method '{name}': choose one of {', '.join(methods)}")
    return methods[name]


def method_quantizes_weights(name: str | None) -> bool:
    """Whether the registered method ``name`` quantizes weights (unknown names: assumed so); steps that only prepare
    float weights (SmoothQuant, AWQ) log no weight error."""
    return getattr(registered_methods().get(name or ""), "quantizes_weights", True)


def setting(
    default: Any = dataclasses.MISSING,
    help: str | None = None,
    *,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    cli: str | None = None,
) -> Any:
    """A settings field with its command-line face: ``help`` (without help it is not offered), ``flag`` (default
    ``--field-name``; ``--x/--no-x`` for a two-way switch), ``aliases``, and ``cli``: the key of the flag's value
    where two methods take one flag under different field names (``--a-granularity`` sets RTN's
    ``act_granularity`` and SmoothQuant's ``search_granularity``)."""
    metadata = {k: v for k, v in {"help": help, "flag": flag, "aliases": aliases, "cli": cli}.items() if v}
    return dataclasses.field(default=default, metadata=metadata)


# -- the generic converter -------------------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def flat_spec_field(cls: type) -> dataclasses.Field | None:
    """The field whose QuantSpec is written flat (the first QuantSpec-typed field without None in its type)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if hints[f.name] is QuantSpec:
            return f
    return None


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _plain(value: Any) -> Any:
    if isinstance(value, QuantSpec):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def settings_to_dict(settings: Any) -> dict[str, Any]:
    """Every field as plain data (JSON-ready), the flat QuantSpec's keys first."""
    flat = flat_spec_field(type(settings))
    data = dict(getattr(settings, flat.name).to_dict()) if flat is not None else {}
    for f in dataclasses.fields(settings):
        if f is not flat:
            data[f.name] = _plain(getattr(settings, f.name))
    return data


_UNION_TYPE = type(int | None)


def _options(hint: Any) -> tuple:
    """The types a field takes: the members of a union (``int | None`` -> int, NoneType), else the type itself."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UNION_TYPE) else (hint,)


def _is_tuple(hint: Any) -> bool:
    return hint is tuple or typing.get_origin(hint) is tuple


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Plain data into a field's type where that is unambiguous (lists and comma strings into tuples, a dict into a
    QuantSpec, an int into a float), and a one-line error for a value of the wrong kind (``"false"`` for a switch,
    ``"0.01"`` for a number). Ranges are checked by the class's own validation."""
    options = _options(hint)
    if value is None:
        if type(None) in options:
            return None
        raise InvalidSpecError(f"{name} needs a value, got null")
    if any(_is_tuple(o) for o in options):
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, (list, tuple)):
            return tuple(value)
    if QuantSpec in options and isinstance(value, (dict, QuantSpec)):
        return value if isinstance(value, QuantSpec) else QuantSpec.from_dict(value)
    if str in options and isinstance(value, str):
        return value
    if bool in options:
        if isinstance(value, bool):
            return value
        raise InvalidSpecError(f"{name} is a switch: true or false, got {value!r}")
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if int in options and numeric and float(value).is_integer():
        return int(value)
    if float in options and numeric:
        return float(value)
    if int in options or float in options:
        kind = "an integer" if int in options and float not in options else "a number"
        raise InvalidSpecError(f"{name} must be {kind}, got {value!r}")
    return value


def spec_with(default: QuantSpec, given: dict[str, Any]) -> QuantSpec:
    """``default`` with the keys in ``given`` changed; a changed group size re-derives the granularity."""
    data = {**default.to_dict(), **given}
    if "group_size" in given and "granularity" not in given:
        data["granularity"] = None
    if "granularity" in given and "group_size" not in given and given["granularity"] not in (None, "group"):
        data["group_size"] = -1
    return QuantSpec.from_dict(data)


def settings_keys(cls: type) -> set[str]:
    """The keys a method's plain data may have: its fields, with a flat QuantSpec's keys in place of that field."""
    flat = flat_spec_field(cls)
    own = {f.name for f in dataclasses.fields(cls) if f is not flat}
    return own | ({f.name for f in dataclasses.fields(QuantSpec)} if flat is not None else set())


def settings_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """The inverse of ``settings_to_dict``: missing keys take the class's defaults (a flat QuantSpec's missing keys
    those of the class's default grid), unknown keys are an error naming the allowed ones."""
    label = getattr(cls, "name", cls.__name__)
    if not isinstance(data, dict):
        raise InvalidSpecError(f"the settings of {label} must be a mapping, got {type(data).__name__}")
    flat = flat_spec_field(cls)
    spec_keys = {f.name for f in dataclasses.fields(QuantSpec)} if flat is not None else set()
    own = {f.name: f for f in dataclasses.fields(cls) if f is not flat}
    unknown = sorted(str(k) for k in data if k not in own and k not in spec_keys)
    if unknown:
        allowed = ", ".join(sorted(settings_keys(cls)))
        raise InvalidSpecError(f"{label} has no setting {', '.join(unknown)}: its settings are {allowed}")
    hints = _hints(cls)
    kwargs = {name: _coerce(name, hints[name], data[name]) for name in own if name in data}
    if flat is not None:
        given = {k: data[k] for k in spec_keys if k in data}
        kwargs[flat.name] = spec_with(field_default(flat), given) if given else field_default(flat)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise InvalidSpecError(f"bad settings for {label}: {e}") from None


# -- the command-line face of the settings -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CliSetting:
    """One command-line flag: its value's key, the flag names, its type, help, and the fields it sets."""

    key: str
    flags: tuple[str, ...]
    kind: type
    help: str
    targets: tuple[tuple[type, str], ...]  # (settings class, field name); "spec." prefixes a flat QuantSpec field

    @property
    def flag(self) -> str:
        return self.flags[0]


def _cli_kind(hint: Any) -> type:
    options = tuple(o for o in _options(hint) if o is not type(None))
    if options == (bool,):
        return bool
    if options == (int,):
        return int
    if options == (float,):
        return float
    return str


def _field_cli(cls: type, f: dataclasses.Field, hint: Any, target: str) -> CliSetting | None:
    help_text = f.metadata.get("help")
    if not help_text:
        return None
    flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    key = f.metadata.get("cli") or flag.split("/")[0].removeprefix("--").replace("-", "_")
    return CliSetting(key, (flag, *f.metadata.get("aliases", ())), _cli_kind(hint), help_text, ((cls, target),))


def cli_settings(classes) -> dict[str, CliSetting]:
    """The flags of ``classes`` by key; a flag several classes take is listed once with all its targets."""
    table: dict[str, CliSetting] = {}
    for cls in classes:
        flat = flat_spec_field(cls)
        entries = []
        if flat is not None:
            spec_hints = _hints(QuantSpec)
            entries += [_field_cli(cls, f, spec_hints[f.name], f"spec.{f.name}") for f in dataclasses.fields(QuantSpec)]
        hints = _hints(cls)
        entries += [_field_cli(cls, f, hints[f.name], f.name) for f in dataclasses.fields(cls) if f is not flat]
        for entry in filter(None, entries):
            known = table.get(entry.key)
            if known is None:
                table[entry.key] = entry
            else:
                table[entry.key] = dataclasses.replace(known, targets=known.targets + entry.targets)
    return table


def settings_from_flags(cls: type, flags: dict[str, Any], table: dict[str, CliSetting]) -> tuple[dict, set[str]]:
    """The plain-data settings of ``cls`` among the given flag values (key -> value), and the keys it took."""
    data, used = {}, set()
    for key, value in flags.items():
        for target_cls, target in table[key].targets:
            if target_cls is cls:
                data[target.removeprefix("spec.")] = value
                used.add(key)
    return data, used


class Method:
    """What every method class has besides its settings (mixed into the frozen dataclasses).

    ``name``: the registered name; ``offered``: a choice of the command line's ``--method``. ``pipeline``: a step
    of the layer-wise pipeline (False for QAT, which trains the whole model). ``quantizes_weights``: False for a
    step that only changes float weights (smoothing), which must come before a step that quantizes them;
    ``next_step_defaults`` are the settings the command line gives that step unless the user says otherwise."""

    name: ClassVar[str]
    offered: ClassVar[bool] = True  # a choice of ``quantlm quantize --method``
    pipeline: ClassVar[bool] = True
    quantizes_weights: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    quantizes_head: bool = False  # rounds the output projection (a recipe may do that once)
    next_step_defaults: ClassVar[dict[str, Any]] = {}

    def to_config(self) -> dict[str, Any]:
        return {"method": self.name, **settings_to_dict(self)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Any:
        config = dict(config)
        method = config.pop("method", cls.name)
        if method != cls.name:
            raise InvalidSpecError(f"a {cls.name} step cannot read settings of method '{method}'")
        return settings_from_dict(cls, config)

    def describe(self) -> str:
        """A short label, e.g. ``gptq(w4 g64 asym a8)``; methods with other settings say more."""
        spec = getattr(self, "spec", None)
        if spec is None:
            return self.name
        act = getattr(self, "act_bits", None)
        per_tensor = " per-tensor" if act and getattr(self, "act_granularity", "token") == "tensor" else ""
        return f"{self.name}({spec.describe()}{f' a{act}' if act else ''}{per_tensor})"

    def check_next_step(self, step) -> None:
        """A step that only prepares float weights may refuse the step that quantizes them after it (AWQ: one on
        another grid than the one it searched on) with a one-line ``InvalidSpecError``."""

    def followed_by(self, step) -> Any:
        """This step as it runs before ``step`` (the one that quantizes the weights it prepared): itself, or a copy
        whose "auto" settings are resolved for ``step``."""
        return self

    def process_block(self, ctx) -> list:
        return []

    def finalize(self, model) -> list:
        return []
