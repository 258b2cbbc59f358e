"""How a model was quantized, as one value: what ``save`` writes into a checkpoint and ``load`` reads back.

A ``QuantizationRecord`` holds the recipe (plain data, one dict per step), the calibration it ran on (stated once
for the whole recipe), the per-module quant log, the seconds the run took (kept in memory only: a resumed run
writes the same bytes), the KV-cache setting, for QAT how it was trained, and the quantlm version that made it.
PTQ (``quantlm.quantize``) and QAT both produce one; the model carries it as ``model.quantlm_record``.

Checkpoints of format version 1 stored the calibration in every step, wrote a head-only RTN step as
``{"method": "rtn", "blocks": false, "lm_head": true}`` and QAT's settings in a vocabulary of their own;
``upgrade_v1_recipe`` turns such a recipe into today's, so old checkpoints read back like new ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quantlm._version import __version__
from quantlm.nn.kv_cache import KVQuantConfig


@dataclass(frozen=True)
class QuantizationRecord:
    recipe: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    seconds: float | None = None  # not written: a run resumed after an interruption must write the same bytes
    kv_cache: KVQuantConfig | None = None
    training: dict[str, Any] | None = None  # QAT: the trainer's settings, data, losses and starting checkpoint
    version: str = __version__

    def config_entries(self) -> dict[str, Any]:
        """What goes into ``quantization_config`` (the log goes to a file of its own)."""
        entries: dict[str, Any] = {"quantlm_version": self.version, "recipe": self.recipe}
        if self.calibration is not None:
            entries["calibration"] = self.calibration
        if self.training is not None:
            entries["training"] = self.training
        if self.kv_cache is not None:
            entries["kv_cache"] = self.kv_cache.to_dict()
        return entries

    @classmethod
    def from_config_entries(cls, qc: dict[str, Any], log: list[dict[str, Any]]) -> QuantizationRecord:
        recipe, calibration, training = qc.get("recipe") or [], qc.get("calibration"), qc.get("training")
        if qc.get("format_version", 1) < 2:
            recipe, calibration, training = upgrade_v1_recipe(recipe)
        kv = qc.get("kv_cache")
        return cls(
            recipe=recipe,
            calibration=calibration,
            log=log,
            kv_cache=None if kv is None else KVQuantConfig.from_dict(kv),
            training=training,
            version=qc.get("quantlm_version", "unknown"),
        )


def upgrade_v1_recipe(steps: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict | None, dict | None]:
    """A format-version-1 recipe as (today's recipe, its calibration, QAT's training record)."""
    calibration = training = None
    upgraded = []
    for step in steps:
        step = dict(step)
        calibration = step.pop("calibration", None) or calibration
        if step.get("method") == "rtn" and step.pop("blocks", True) is False:
            step = {"method": "rtn-head", **{k: v for k, v in step.items() if k not in ("method", "lm_head")}}
            step.pop("exclude", None)
        elif step.get("method") == "qat":
            step, training = _upgrade_v1_qat(step)
        upgraded.append(step)
    return upgraded, calibration, training


def _upgrade_v1_qat(step: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    act, kv = step.get("act"), step.get("kv")
    new = {
        "method": "qat",
        "weight": step.get("weight"),
        "act_bits": None if act is None else act["bits"],
        "a_symmetric": True if act is None else act.get("symmetric", True),
        "kv_bits": None if kv is None else kv["bits"],
        "kv_symmetric": True if kv is None else kv.get("symmetric", True),
        "learnable_clip": step.get("learnable_clip", False),
        "exclude": step.get("exclude", []),
    }
    return new, {**(step.get("training") or {}), "init": step.get("init")}
