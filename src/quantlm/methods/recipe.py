"""A recipe: the ordered list of steps of one quantization run, as Python objects or as plain data.

As data it is a list of dicts, each with a ``method`` key and that method's settings, e.g.
``[{"method": "rtn", "bits": 4, "group_size": 64, "symmetric": false}]``; JSON or YAML files hold the same list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from quantlm.errors import InvalidSpecError
from quantlm.methods.gptq import GPTQ
from quantlm.methods.llm_int8 import LLMInt8
from quantlm.methods.rtn import RTN
from quantlm.methods.smoothquant import SmoothQuant
from quantlm.pipeline.runner import Step

METHODS: dict[str, type] = {"rtn": RTN, "gptq": GPTQ, "smoothquant": SmoothQuant, "llm-int8": LLMInt8}


@dataclass
class Recipe:
    steps: list[Step]

    def to_config(self) -> list[dict[str, Any]]:
        return [step.to_config() for step in self.steps]

    @property
    def needs_calibration(self) -> bool:
        return any(s.needs_calibration for s in self.steps)

    def describe(self) -> str:
        def label(step) -> str:
            if hasattr(step, "describe"):
                return step.describe()
            if not hasattr(step, "spec"):
                return step.name
            act = getattr(step, "act_bits", None)
            per_tensor = " per-tensor" if act and getattr(step, "act_granularity", "token") == "tensor" else ""
            return f"{getattr(step, 'label', step.name)}({step.spec.describe()}{f' a{act}' if act else ''}{per_tensor})"

        return " -> ".join(label(s) for s in self.steps)


def _step_from_dict(d: dict[str, Any]) -> Step:
    if not isinstance(d, dict) or "method" not in d:
        raise InvalidSpecError(f'each recipe step must be a mapping with a "method" key, got {d!r}')
    method = METHODS.get(d["method"])
    if method is None:
        raise InvalidSpecError(f"unknown method '{d['method']}': choose one of {', '.join(sorted(METHODS))}")
    try:
        return method.from_config(d)
    except TypeError as e:
        raise InvalidSpecError(f"bad settings for {d['method']}: {e}") from None


def parse_recipe(recipe: "Recipe | Step | Sequence[Step | dict] | dict | str | Path") -> Recipe:
    """Accept a Recipe, one step, a list of steps or dicts, or a path to a JSON/YAML recipe file."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, Path)):
        path = Path(recipe)
        if not path.is_file():
            raise InvalidSpecError(f"recipe file not found: {path}")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise InvalidSpecError("YAML recipes need PyYAML (pip install pyyaml), or write the recipe as JSON") from None
            data = yaml.safe_load(text)
        else:
            try:
                data = json.loads(text)
            except ValueError as e:
                raise InvalidSpecError(f"{path} is not valid JSON: {e}") from None
        return parse_recipe(data)
    if isinstance(recipe, dict):
        recipe = [recipe]
    if not isinstance(recipe, (list, tuple)):
        recipe = [recipe]
    steps = [_step_from_dict(s) if isinstance(s, dict) else s for s in recipe]
    if not steps:
        raise InvalidSpecError("a recipe needs at least one step")
    _check_order(steps)
    return Recipe(steps)


def _check_order(steps: list[Step]) -> None:
    """Smoothing changes float Linears, so it must come before the step that quantizes them."""
    quantizing = [i for i, s in enumerate(steps) if s.name != SmoothQuant.name]
    smoothing = [i for i, s in enumerate(steps) if s.name == SmoothQuant.name]
    if quantizing and smoothing and max(smoothing) > min(quantizing):
        raise InvalidSpecError("smoothquant must come before the step that quantizes the weights (e.g. smoothquant -> rtn)")
