"""A recipe: the ordered list of steps of one quantization run, as Python objects or as plain data.

As data it is a list of dicts, each with a ``method`` key (a registered method) and that method's settings, e.g.
``[{"method": "rtn", "bits": 4, "group_size": 64, "symmetric": false}]``; JSON or YAML files hold the same list.
``recipe_from_options`` makes one from a method name and the options a user gave on the command line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantlm.core import QuantSpec
from quantlm.errors import InvalidSpecError
from quantlm.methods.base import (
    Method,
    cli_settings,
    method_class,
    registered_methods,
    settings_from_flags,
    settings_keys,
)
from quantlm.methods.head import HeadRounding, head_step


@dataclass
class Recipe:
    steps: list

    def __post_init__(self) -> None:
        """Steps built by hand are checked and resolved as ``parse_recipe`` does (their order, and the settings a
        step leaves to the step after it)."""
        self.steps = list(self.steps)
        _check_order(self.steps)

    def to_config(self) -> list[dict[str, Any]]:
        return [step.to_config() for step in self.steps]

    @property
    def needs_calibration(self) -> bool:
        return any(s.needs_calibration for s in self.steps)

    @property
    def trained(self) -> bool:
        """A recipe of a method that trains the whole model (QAT) instead of running the layer-wise pipeline."""
        return any(not getattr(s, "pipeline", True) for s in self.steps)

    def describe(self) -> str:
        return " -> ".join(s.describe() for s in self.steps)


def _step_from_dict(d: dict[str, Any]):
    if not isinstance(d, dict) or "method" not in d:
        raise InvalidSpecError(f'each recipe step must be a mapping with a "method" key, got {d!r}')
    return method_class(d["method"]).from_config(d)


def _read_recipe_file(path: Path) -> Any:
    if not path.is_file():
        raise InvalidSpecError(f"recipe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidSpecError(f"{path} is not a text file (not UTF-8): a recipe is JSON or YAML text") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InvalidSpecError(
                "YAML recipes need PyYAML (pip install pyyaml), or write the recipe as JSON"
            ) from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InvalidSpecError(f"{path} is not valid YAML ({first}): fix the file") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise InvalidSpecError(f"{path} is not valid JSON: {e}") from None


def parse_recipe(recipe: Recipe | Any | Sequence[Any | dict] | dict | str | Path) -> Recipe:
    """Accept a Recipe, one step, a list of steps or dicts, or a path to a JSON/YAML recipe file."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, Path)):
        path = Path(recipe)
        try:
            return parse_recipe(_read_recipe_file(path))
        except InvalidSpecError as e:
            if str(path) in str(e):
                raise
            raise InvalidSpecError(f"{path}: {e}") from None
    if isinstance(recipe, dict):
        recipe = [recipe]
    if not isinstance(recipe, (list, tuple)):
        recipe = [recipe]
    for step in recipe:
        if not isinstance(step, (dict, Method)):
            raise InvalidSpecError(
                f"a recipe step is a mapping like {{method: rtn, bits: 4}} or a method object, got {step!r}"
            )
    steps = [_step_from_dict(s) if isinstance(s, dict) else s for s in recipe]
    if not steps:
        raise InvalidSpecError("a recipe needs at least one step")
    return Recipe(steps)  # checks the order


def _check_order(steps: list) -> None:
    """A step that only changes float weights (smoothing) must come before the step that quantizes them; a trained
    method (QAT) is a recipe of its own. Each such step is replaced by itself as resolved for the step after it
    (``Method.followed_by``)."""
    if any(not getattr(s, "pipeline", True) for s in steps) and len(steps) > 1:
        raise InvalidSpecError("QAT trains the whole model: it cannot be combined with other steps in one recipe")
    heads = [s.name for s in steps if getattr(s, "quantizes_head", False)]
    if len(heads) > 1:
        raise InvalidSpecError(
            f"the output projection is rounded by more than one step ({', '.join(heads)}): keep one "
            "(--lm-head, --head-bits or a step with lm_head)"
        )
    quantizing = [i for i, s in enumerate(steps) if getattr(s, "quantizes_weights", True)]
    preparing = [i for i, s in enumerate(steps) if not getattr(s, "quantizes_weights", True)]
    if quantizing and preparing and max(preparing) > min(quantizing):
        late = steps[max(preparing)].name
        raise InvalidSpecError(f"{late} must come before the step that quantizes the weights (e.g. {late} -> rtn)")
    for i in preparing:  # the step that quantizes the blocks after it (a head-only step rounds lm_head alone)
        following = next((steps[j] for j in quantizing if j > i and not isinstance(steps[j], HeadRounding)), None)
        if following is not None:
            steps[i].check_next_step(following)
            steps[i] = steps[i].followed_by(following)


def offered_methods() -> dict[str, type]:
    """The methods ``quantlm quantize --method`` offers."""
    return {n: c for n, c in registered_methods().items() if c.offered and c.pipeline}


def weights_methods(preparing: type) -> list[str]:
    """The methods that can quantize the weights after ``preparing`` (a step that only prepares float weights):
    those that take every setting of its ``next_step_defaults``."""
    return [
        name
        for name, cls in offered_methods().items()
        if cls.quantizes_weights and set(preparing.next_step_defaults) <= settings_keys(cls)
    ]


def recipe_from_options(
    method: str, options: dict[str, Any], *, weights: str | None = None, head_bits: int | None = None
) -> Recipe:
    """The recipe the command line means: ``method`` with the options the user gave (keys as in
    ``cli_settings``: ``bits``, ``sym``, ``a_bits``, ...). A method that does not quantize weights (smoothquant) is
    followed by ``weights`` (default rtn) with the method's ``next_step_defaults``; ``head_bits`` adds a step that
    rounds the output projection. An option no step of the recipe takes is an error that names the flag."""
    first = method_class(method)
    classes = [first]
    if not first.quantizes_weights:
        choices = weights_methods(first)
        if (weights or "rtn") not in choices:
            raise InvalidSpecError(f"--weights after {method} must be one of {', '.join(choices)}, got {weights}")
        classes.append(method_class(weights or "rtn"))
    elif weights is not None:
        raise InvalidSpecError(f"--weights applies to methods that do not quantize weights themselves, not {method}")
    table = cli_settings(offered_methods().values())
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(k for k in given if k not in table)
    if unknown:
        raise InvalidSpecError(f"unknown option(s) {', '.join(unknown)}")
    steps, used = [], set()
    defaults: dict[str, Any] = {}
    for cls in classes:
        data, took = settings_from_flags(cls, given, table)
        steps.append(cls.from_config({**defaults, **data}))
        used |= took
        defaults = dict(cls.next_step_defaults)
    unused = sorted(set(given) - used)
    if unused:
        entry = table[unused[0]]
        takers = sorted({c.name for c, _ in entry.targets if c.offered})
        hint = ""
        if len(classes) > 1:
            weights_takers = [t for t in takers if t in weights_methods(first)]
            hint = f", or add --weights {weights_takers[0]}" if weights_takers else ""
        raise InvalidSpecError(
            f"{entry.flag} does not apply to --method {method}"
            + (f" with --weights {classes[-1].name}" if len(classes) > 1 else "")
            + f" (only to {', '.join(takers)}): drop it{hint}"
        )
    return add_head_step(parse_recipe(steps), head_bits)


def add_head_step(recipe: Recipe, head_bits: int | None) -> Recipe:
    """``recipe`` with a last step that rounds the output projection to ``head_bits`` (None: as it is)."""
    if head_bits is None:
        return recipe
    if any(getattr(step, "quantizes_head", False) for step in recipe.steps):
        raise InvalidSpecError(
            "the recipe already quantizes the output projection (--lm-head, or a step with lm_head) "
            "and --head-bits would round it again: pass one"
        )
    return parse_recipe([*recipe.steps, head_step(head_bits)])


GRID_KEYS = ("bits", "symmetric", "group_size", "granularity", "scale_bits", "codebook")  # what a grid sets
PER_LAYER_METHODS = ("rtn", "gptq")  # steps that quantize each Linear on its own grid, nothing shared


def per_layer_grids(recipe: Recipe, grids: dict[str, QuantSpec]) -> Recipe:
    """``recipe`` with its weight step (rtn or gptq) split into one step per grid of ``grids`` (module name ->
    grid; its clip setting stays the step's own), in the order the grids first occur. Each step excludes the
    Linears of other grids that are still float when it runs (the steps of one block run in order, each seeing
    only the Linears the steps before left), written as the Linear's local name where that covers every block.
    The step's own exclusions stay excluded in every step."""
    import dataclasses

    quantizing = [i for i, s in enumerate(recipe.steps) if getattr(s, "quantizes_weights", True)]
    weight_steps = [i for i in quantizing if not isinstance(recipe.steps[i], HeadRounding)]
    if len(weight_steps) != 1 or recipe.steps[weight_steps[0]].name not in PER_LAYER_METHODS:
        raise InvalidSpecError(
            f"per-layer grids (--target-format) need one weight step of {' or '.join(PER_LAYER_METHODS)}, "
            f"got {recipe.describe()}"
        )
    at = weight_steps[0]
    step = recipe.steps[at]
    order = list(dict.fromkeys(grids.values()))
    local = {name: name.rsplit(".", 1)[-1] for name in grids}
    split, done = [], set()
    for grid in order:
        others = {n for n, g in grids.items() if g != grid and n not in done}
        whole = {local[n] for n in others} - {local[n] for n in grids if n not in others}
        exclude = [*step.exclude, *sorted(whole), *sorted(n for n in others if local[n] not in whole)]
        spec = dataclasses.replace(step.spec, **{k: getattr(grid, k) for k in GRID_KEYS})
        split.append(dataclasses.replace(step, spec=spec, exclude=tuple(exclude)))
        done |= {n for n, g in grids.items() if g == grid}
    return Recipe([*recipe.steps[:at], *split, *recipe.steps[at + 1 :]])
