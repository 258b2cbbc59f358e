"""LoRA adapters on quantlm's QuantLinear, through peft.

peft wraps layers it knows (nn.Linear, bitsandbytes, HQQ, ...) and lets a library register its own LoRA layer for
its own layer type (``LoraConfig._register_custom_module``). ``QuantLoraLinear`` is that layer for ``QuantLinear``:
y = base(x) + B(A(dropout(x))) · alpha / r, the base frozen and run on its kernel (its input gradient recomputes the
dense weight one layer at a time: ``quantlm.nn.autograd``). Float Linears (a float base model, or layers a recipe
left unquantized) get peft's own LoRA layer.

``pooled=True`` makes QA-LoRA's group-pooled adapters (Xu et al. 2023): A reads the mean of each quantization
group of the input, so the adapter's update B A is constant over the columns of a group,
ΔW[o, j] = E[o, g(j)] / |g(j)| with E = B A · alpha / r, and it folds exactly into the zero points:
s (q − z) + ΔW = s (q − (z − E / (|g| s))). ``quantlm.finetune.merge`` does that fold.

peft does not save a registered layer type in ``adapter_config.json``, so quantlm writes ``quantlm_adapter.json``
beside it (the pooled flag, how the adapter was trained) and ``load_adapters`` registers the layer again before
``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantlm.errors import InvalidSpecError, QuantlmError
from quantlm.finetune.lora_init import check_lora_init
from quantlm.models.blocks import find_decoder_blocks, is_linear
from quantlm.nn.qlinear import QuantLinear

ADAPTER_INFO_FILE = "quantlm_adapter.json"
_ATTENTION_WORDS = ("attn", "attention")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str = "all"  # all | attn | mlp | comma-separated layer names such as q_proj,v_proj
    pooled: bool = False  # QA-LoRA group-pooled adapters: what --merge exact needs
    init: str = "auto"  # how adapters on quantized layers start: quantlm.finetune.lora_init.LORA_INITS

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise InvalidSpecError(f"--lora-r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise InvalidSpecError(f"--lora-alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise InvalidSpecError(f"--lora-dropout must be in [0, 1), got {self.dropout!r}")
        if not str(self.targets).strip():
            raise InvalidSpecError("--targets is all, attn, mlp or layer names such as q_proj,v_proj")
        check_lora_init(self.init)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- which layers
def adapter_targets(model: nn.Module, targets: str) -> list[str]:
    """Full names of the linear layers (float or quantized) inside the decoder blocks that ``targets`` selects:
    ``all``, ``attn`` (layers under an attention module), ``mlp`` (the others), or comma-separated layer names
    (the last part of a module name: ``q_proj,v_proj``)."""
    blocks = find_decoder_blocks(model)
    found: dict[str, str] = {}  # full name -> name relative to its block
    for index, block in enumerate(blocks.blocks):
        for rel, module in block.named_modules():
            if is_linear(module) or isinstance(module, QuantLinear):
                found[f"{blocks.name(index)}.{rel}"] = rel
    if not found:
        raise InvalidSpecError("the model's decoder blocks hold no linear layer to put adapters on")

    def in_attention(rel: str) -> bool:
        return any(word in part.lower() for part in rel.split(".")[:-1] for word in _ATTENTION_WORDS)

    if targets == "all":
        return list(found)
    if targets in ("attn", "mlp"):
        chosen = [name for name, rel in found.items() if in_attention(rel) == (targets == "attn")]
        if not chosen:
            raise InvalidSpecError(f"--targets {targets}: this model has no such layers; name them instead")
        return chosen
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    leaves = sorted({rel.rsplit(".", 1)[-1] for rel in found.values()})
    unknown = [t for t in wanted if t not in leaves]
    if unknown:
        raise InvalidSpecError(
            f"--targets: no layer named {', '.join(unknown)} in the decoder blocks; use all, attn, mlp or some of "
            f"{', '.join(leaves)}"
        )
    return [name for name, rel in found.items() if rel.rsplit(".", 1)[-1] in wanted]


# ---------------------------------------------------------------------------------------------- the LoRA layers
def group_index(layer: QuantLinear) -> Tensor:
    """The quantization group of every input column of ``layer`` (int64 [in_features])."""
    if layer.g_idx is not None:
        return layer.g_idx.long()
    if layer.spec.granularity == "group":
        return torch.arange(layer.in_features, device=layer.qweight.device) // layer.spec.group_size
    return torch.zeros(layer.in_features, dtype=torch.long, device=layer.qweight.device)


def pooling_problem(layer: QuantLinear) -> str | None:
    """Why group-pooled adapters cannot fold exactly into ``layer`` (None when they can)."""
    if layer.spec.granularity != "group":
        return f"pool over quantization groups; a {layer.describe()} layer has one group per row (a rank-1 update)"
    if not layer.spec.has_zero_point:
        return f"fold into zero points; a {layer.describe()} layer has none"
    if layer.act_bits is not None:
        return f"add to the weight an int8-rounded input multiplies; a {layer.describe()} layer would not be exact"
    return None


def _peft_lora():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def _lora_layer_classes() -> tuple[type, type]:
    """(QuantLoraLinear, PooledQuantLoraLinear), built on first use so that importing quantlm needs no peft."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _make_lora_classes(_peft_lora())
    return _CLASSES


_CLASSES: tuple[type, type] | None = None


def _make_lora_classes(LoraLayer):  # noqa: N803 - a class passed in
    class QuantLoraLinear(nn.Module, LoraLayer):
        """LoRA on a frozen QuantLinear: base(x) + B(A(dropout(x))) · scaling."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kw):
            if config.use_dora or config.lora_bias or getattr(config, "use_rslora", False):
                raise QuantlmError("quantlm's LoRA layer trains plain LoRA: drop use_dora, lora_bias and use_rslora")
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def adapter_input(self, x: Tensor) -> Tensor:
            return x

        def delta(self, adapter: str) -> Tensor:
            """B A · scaling in fp32: [out, in] (pooled: [out, groups])."""
            a, b = self.lora_A[adapter].weight.float(), self.lora_B[adapter].weight.float()
            return (b @ a) * self.scaling[adapter]

        def get_delta_weight(self, adapter: str) -> Tensor:
            """The update of the dense weight [out, in] in fp32 (peft's name)."""
            return self.delta(adapter)

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise QuantlmError(
                "merge a quantlm model's adapters with quantlm.finetune.merge.merge_adapters (float, requant or "
                "exact), not peft's merge: the base weight is packed"
            )

        def unmerge(self) -> None:
            raise QuantlmError("quantlm's LoRA layers are never merged in place: there is nothing to unmerge")

        def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
            self._check_forward_args(x, *args, **kwargs)
            if kwargs.pop("adapter_names", None) is not None:
                raise QuantlmError("quantlm's LoRA layer applies the active adapters to every row: drop adapter_names")
            result = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_a, lora_b = self.lora_A[name], self.lora_B[name]
                h = self.adapter_input(self.lora_dropout[name](x.to(lora_a.weight.dtype)))
                result = result + (lora_b(lora_a(h)) * self.scaling[name]).to(result.dtype)
            return result

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    class PooledQuantLoraLinear(QuantLoraLinear):
        """QA-LoRA: A reads the mean of each quantization group of the input."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kw):
            base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
            why = pooling_problem(base)
            if why is not None:
                raise QuantlmError(
                    f"pooled adapters {why}: train plain adapters (no --pooled), merge with float or requant"
                )
            index = group_index(base)
            self._groups = int(base.scales.shape[1])
            super().__init__(base_layer, adapter_name, config, r=r, lora_alpha=lora_alpha, **kw)
            self.register_buffer("group_of_column", index, persistent=False)
            sizes = torch.bincount(index, minlength=self._groups).float().clamp_min(1)
            self.register_buffer("group_size", sizes, persistent=False)

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return self._groups, module.out_features

        def adapter_input(self, x: Tensor) -> Tensor:
            pooled = x.new_zeros(*x.shape[:-1], self._groups).index_add_(-1, self.group_of_column, x)
            return pooled / self.group_size.to(x.dtype)

        def get_delta_weight(self, adapter: str) -> Tensor:
            per_group = self.delta(adapter) / self.group_size
            return per_group[:, self.group_of_column]

    return QuantLoraLinear, PooledQuantLoraLinear


def quant_lora_layer(pooled: bool) -> type:
    return _lora_layer_classes()[1 if pooled else 0]


def is_quant_lora_layer(module: nn.Module) -> bool:
    return _CLASSES is not None and isinstance(module, _CLASSES[0])


def is_pooled_lora_layer(module: nn.Module) -> bool:
    return _CLASSES is not None and isinstance(module, _CLASSES[1])


# ---------------------------------------------------------------------------------------------- peft models
def lora_config(settings: LoraSettings, target_modules: list[str]):
    """peft's LoraConfig for ``settings`` with quantlm's LoRA layer registered for QuantLinear."""
    from peft import LoraConfig

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return register_quant_layers(config, settings.pooled)


@contextlib.contextmanager
def _quiet_peft():
    """peft 0.21 calls a transformers method that transformers 5 marks deprecated, on every wrap: not the user's
    concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def register_quant_layers(config, pooled: bool):
    config._register_custom_module({QuantLinear: quant_lora_layer(pooled)})
    return config


def attach_adapters(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """``model`` wrapped in a peft model with fresh adapters on the layers ``settings.targets`` selects; only the
    adapters train."""
    from peft import get_peft_model

    names = adapter_targets(model, settings.targets)
    if settings.pooled:
        floats = [n for n in names if not isinstance(model.get_submodule(n), QuantLinear)]
        if floats:
            raise InvalidSpecError(
                f"pooled adapters fold into quantized layers; {floats[0]} is a float layer: train plain adapters "
                "(no --pooled), or target only quantized layers"
            )
    with _quiet_peft():
        return get_peft_model(model, lora_config(settings, names))


def adapter_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA layers of a peft model by their name in the underlying model."""
    from peft.tuners.lora import LoraLayer

    inner = peft_model.get_base_model()
    return {name: m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}


def is_adapter_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds adapters written by quantlm finetune (what --overwrite may replace)."""
    return (Path(path) / ADAPTER_INFO_FILE).is_file()


def check_adapter_output(path: str | os.PathLike, overwrite: bool) -> None:
    from quantlm.formats.native import check_output

    check_output(path, overwrite, replaceable=is_adapter_directory, kind="adapter directory")


def write_adapter_info(directory: Path, info: dict[str, Any]) -> None:
    (directory / ADAPTER_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_adapter_info(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_INFO_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QuantlmError(f"{path} is missing: {directory} is not an adapter written by quantlm finetune") from None
    except (OSError, ValueError) as e:
        raise QuantlmError(f"cannot read {path}: {e}") from None
    if not isinstance(info, dict) or not isinstance(info.get("lora"), dict):
        raise QuantlmError(f"{path} is damaged: run quantlm finetune again")
    return info


def adapter_config(directory: str | os.PathLike):
    """The LoraConfig saved in ``directory`` with quantlm's layer registered: pass it to
    ``PeftModel.from_pretrained(model, directory, config=...)`` for a quantlm-loaded model."""
    from peft import LoraConfig

    info = read_adapter_info(directory)
    try:
        config = LoraConfig.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as e:
        raise QuantlmError(f"cannot read the adapter config in {directory}: {e}") from None
    return register_quant_layers(config, bool(info["lora"].get("pooled", False)))


def load_adapters(model: nn.Module, directory: str | os.PathLike, *, trainable: bool = False) -> nn.Module:
    """``model`` (a quantlm-loaded model, or the float model the adapters were trained on) with the adapters saved
    in ``directory`` (peft's format, written by ``quantlm finetune``)."""
    from peft import PeftModel

    config = adapter_config(directory)
    with _quiet_peft():
        return PeftModel.from_pretrained(model, str(directory), config=config, is_trainable=trainable)
