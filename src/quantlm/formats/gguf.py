"""GGUF for llama.cpp (and Ollama, LM Studio): quantlm layers written exactly as llama.cpp's own block types.

A quantized Linear goes into the block type whose grid is its grid (``quantlm.formats.gguf_blocks``: Q4_0, Q5_0,
Q8_0, Q4_1, Q5_1 and the K-quants Q2_K ... Q6_K), with its codes and scales as they are. Anything else (other group
sizes or bit widths, codebooks, HQQ's fitted zeros, W8A8) is refused with the reason.
Float tensors go in ``float_type`` (f32, f16 or bf16); 1-D ones (norms) always in F32, as llama.cpp writes them.

Layout (what llama.cpp's converter writes for the ``llama`` architecture): tensor names ``token_embd``,
``blk.N.attn_q`` ... ``output_norm``, ``output`` (left out when tied to the embedding); the rows of attn_q and attn_k
reordered from Hugging Face's rotate-half rotary layout to llama.cpp's interleaved pairs (``rope_row_order``);
the model's hyperparameters as ``llama.*`` keys; the tokenizer as ``tokenizer.ggml.*`` (GPT-2 BPE: tokens,
token types, merges, special ids, chat template). ``tokenizer.ggml.pre`` (llama.cpp's name for the pre-tokenizer's
regex) is taken from the GGUF the model came from when there is one, else ``default``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantlm._version import __version__
from quantlm.errors import QuantlmError
from quantlm.formats.gguf_blocks import GRIDS, block_bytes, block_problem, block_type, layer_from_blocks
from quantlm.formats.interchange import integer_grid_problem, refuse_layers
from quantlm.nn.qlinear import QuantLinear
from quantlm.paths import atomic_write_file

MARKER_KEY = "quantlm.version"  # written into every export: --overwrite replaces only files that carry it
FLOAT_TYPES = ("f32", "f16", "bf16")
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}  # model_type -> GGUF architecture written
LLAMA_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _gguf():
    import gguf

    return gguf


def why_not(module: QuantLinear) -> str | None:
    if module.act_bits is not None:
        return f"its activations are quantized (a{module.act_bits}), which llama.cpp's block types do not do"
    if module.g_idx is not None:
        return (
            "its groups are formed in a permuted column order (act-order without static groups), and llama.cpp's "
            "blocks keep columns in order: quantize with --static-groups (the default)"
        )
    problem = integer_grid_problem(module, super_blocks=True)
    if problem is not None:
        return problem
    kind = block_type(module)
    if kind is None:
        return (
            f"{module.spec.describe()} is none of llama.cpp's block grids (groups of 32: symmetric 4/5/8 bits for "
            "Q4_0/Q5_0/Q8_0, asymmetric 4/5 bits for Q4_1/Q5_1; the K-quant grids of --scale-bits): quantize "
            "with --target-format gguf-TYPE"
        )
    return block_problem(module, kind)


def float_data(w: torch.Tensor, float_type: str) -> tuple[np.ndarray, str]:
    """A float tensor as the array GGUFWriter takes for ``float_type`` (bf16 as its raw bytes), and the type."""
    if float_type == "bf16":
        return w.to(torch.bfloat16).view(torch.uint8).numpy(), "BF16"
    if float_type == "f16":
        return w.half().numpy(), "F16"
    return w.float().numpy(), "F32"


def rope_row_order(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order that takes a q/k projection from Hugging Face's rotary layout (per head: the first halves of all
    pairs, then the second halves) to llama.cpp's (per head: the two members of each pair side by side)."""
    half = head_dim // 2
    rows = torch.arange(n_heads * head_dim).view(n_heads, 2, half)
    return rows.transpose(1, 2).reshape(-1)


def gguf_name(name: str) -> str | None:
    """llama.cpp's name for a module of a Hugging Face llama model (None: not one it has)."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    parts = name.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"]:
        local = ".".join(parts[3:])
        if local in LLAMA_NAMES:
            return f"blk.{parts[2]}.{LLAMA_NAMES[local]}"
    return None


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special: dict[str, int]
    add_bos: bool
    chat_template: str | None
    pre: str


def vocabulary(tokenizer_dir: Path, pre: str, vocab_size: int) -> Vocabulary:
    """A GPT-2-style BPE tokenizer (tokenizer.json) as GGUF's token list, types, merges and special ids, padded
    with unused entries to the model's ``vocab_size`` (the rows of its embedding)."""
    gguf = _gguf()
    try:
        data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QuantlmError(f"GGUF export needs the model's tokenizer.json: {e}") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise QuantlmError("GGUF export writes GPT-2-style byte-level BPE tokenizers only (tokenizer.json model BPE)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    vocab.update({content: t["id"] for content, t in added.items()})
    size = max(vocab.values()) + 1
    if size > vocab_size:
        raise QuantlmError(f"the tokenizer has {size} tokens, more than the model's {vocab_size} embedding rows")
    size = vocab_size
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        entry = added.get(text)
        types[i] = (
            gguf.TokenType.NORMAL
            if entry is None
            else gguf.TokenType.CONTROL
            if entry.get("special")
            else gguf.TokenType.USER_DEFINED
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # llama.cpp refuses a BPE vocabulary without merges, and GGUF cannot store an empty list
        raise QuantlmError("GGUF export needs a BPE tokenizer with merges; this tokenizer.json has none")
    config = {}
    if (tokenizer_dir / "tokenizer_config.json").is_file():
        try:
            config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise QuantlmError(f"cannot read {tokenizer_dir / 'tokenizer_config.json'}: {e}") from None
    special = {}
    for key in ("bos", "eos", "unk", "pad"):
        token = config.get(f"{key}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and token in vocab:
            special[key] = vocab[token]
    template = config.get("chat_template")
    if template is None and (tokenizer_dir / "chat_template.jinja").is_file():
        template = (tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return Vocabulary(
        tokens, [int(t) for t in types], merges, special, bool(config.get("add_bos_token")), template, pre
    )


def pre_tokenizer_name(model_dir: Path | None) -> str:
    """llama.cpp's pre-tokenizer name: from the GGUF the model was converted from, else ``default``."""
    source = None if model_dir is None else model_dir / "quantlm_source.json"
    if source is not None and source.is_file():
        gguf = _gguf()
        try:
            origin = json.loads(source.read_text(encoding="utf-8")).get("gguf")
            field = gguf.GGUFReader(origin).get_field("tokenizer.ggml.pre")
            if field is not None:
                return str(field.contents())
        except Exception:  # an unreadable record or origin: llama.cpp's default regex, as for any other model
            pass
    return "default"


def write_gguf(
    model: nn.Module,
    out: Path,
    *,
    tokenizer_dir: Path,
    float_type: str = "f32",
    name: str | None = None,
    model_dir: Path | None = None,
) -> dict[str, int]:
    """Write ``model`` (quantized or float) as a GGUF file at ``out`` (through a temporary file and a rename).
    Returns how many tensors went into each GGML type."""
    gguf = _gguf()
    config = model.config
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise QuantlmError(
            f"GGUF export writes the llama architecture (llama, mistral), not {config.model_type}: export this model "
            "as gptq or compressed-tensors"
        )
    if float_type not in FLOAT_TYPES:
        raise QuantlmError(f"unknown --gguf-type {float_type!r}: use one of {', '.join(FLOAT_TYPES)}")
    refuse_layers("gguf", {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}, why_not)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise QuantlmError(
            f"GGUF export writes plain RoPE only, and this model scales it ({rope.get('rope_type', rope.get('type'))}):"
            " export it as gptq or compressed-tensors"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    vocab = vocabulary(tokenizer_dir, pre_tokenizer_name(model_dir), config.vocab_size)
    tensors: list[tuple[str, np.ndarray, Any]] = []
    counts: dict[str, int] = {}  # tensors per type (returned)
    weights: dict[str, int] = {}  # weights per type (general.file_type)
    for module_name, module in model.named_modules():
        target = gguf_name(module_name)
        if target is None:
            continue
        if target == "output" and getattr(config, "tie_word_embeddings", False):
            continue  # llama.cpp reads the tied head from token_embd
        order = None
        kind_of = target.rsplit(".", 1)[-1]
        if kind_of in heads:
            order = rope_row_order(heads[kind_of], head_dim)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and not bias.is_meta:  # llama.cpp reads optional biases of these tensors
            b = bias.detach().float()
            b = b if order is None else b[order]
            tensors.append((f"{target}.bias", b.numpy(), gguf.GGMLQuantizationType.F32))
        if isinstance(module, QuantLinear):
            data, kind = block_bytes(module)
            data = data if order is None else data[order.numpy()]
            n_weights = module.out_features * module.in_features
        else:
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.is_meta:
                continue
            w = weight.detach().float()
            data, kind = float_data(w if order is None else w[order], "f32" if w.dim() == 1 else float_type)
            n_weights = w.numel()
        tensors.append((f"{target}.weight", data, getattr(gguf.GGMLQuantizationType, kind)))
        counts[kind] = counts.get(kind, 0) + 1
        weights[kind] = weights.get(kind, 0) + n_weights

    def write(path: str) -> None:
        writer = gguf.GGUFWriter(path, arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or Path(getattr(config, "_name_or_path", "") or "model").name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_dimension_count(head_dim)
        if head_dim * config.num_attention_heads != config.hidden_size:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(len(vocab.tokens))
        writer.add_file_type(file_type(weights, float_type))
        writer.add_string(MARKER_KEY, __version__)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.token_types)
        writer.add_token_merges(vocab.merges)
        for key, token_id in vocab.special.items():
            getattr(writer, {"unk": "add_unk_token_id"}.get(key, f"add_{key}_token_id"))(token_id)
        writer.add_add_bos_token(vocab.add_bos)
        if vocab.chat_template:
            writer.add_chat_template(vocab.chat_template)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor_name, data, kind in tensors:
            writer.add_tensor(tensor_name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write_file(out, write)
    return counts


def file_type(counts: dict[str, int], float_type: str) -> int:
    """``general.file_type``: the block type most weights are in (llama.cpp's MOSTLY_*; a K type as the mix
    llama-quantize names after it), else the float type. ``counts``: weights per type."""
    gguf = _gguf()
    blocks = {k: n for k, n in counts.items() if k in GRIDS}
    if blocks:
        kind = max(blocks, key=blocks.get)
        if kind in ("Q4_K", "Q5_K"):  # llama-quantize's _M mixes put some tensors in Q6_K, its _S ones do not
            kind += "_M" if "Q6_K" in blocks else "_S"
        return getattr(gguf.LlamaFileType, f"MOSTLY_{'Q3_K_S' if kind == 'Q3_K' else kind}")
    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}.get(
        float_type, gguf.LlamaFileType.MOSTLY_BF16
    )


def is_gguf_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a GGUF file quantlm wrote (what ``--overwrite`` may replace)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        return _gguf().GGUFReader(str(path)).get_field(MARKER_KEY) is not None
    except Exception:  # unreadable or not GGUF after all: not ours
        return False


# ------------------------------------------------------------------------------------------------------- reading
def read_gguf_layers(path: Path, model: nn.Module) -> dict[str, QuantLinear]:
    """The Linears of ``model`` (a float model read from the GGUF at ``path``) whose GGUF tensors are blocks of a
    type in ``GRIDS``, as QuantLinears holding those blocks; none for GGUFs of other architectures than
    llama (whose tensor names and row orders this module knows)."""
    gguf = _gguf()
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field("general.architecture")
    if arch is None or str(arch.contents()) != "llama":  # the rotary row order is llama's; others stay float
        return {}
    tensors = {t.name: t for t in reader.tensors}
    layers = {}
    for name, module in model.named_modules():
        target = gguf_name(name)
        t = tensors.get(f"{target}.weight") if target is not None else None
        if not isinstance(module, nn.Linear) or t is None or t.tensor_type.name not in GRIDS:
            continue
        data = np.asarray(t.data).reshape(module.out_features, -1)
        kind_of = target.rsplit(".", 1)[-1]
        if kind_of in heads:  # back from llama.cpp's rotary row order to the model's
            data = data[torch.argsort(rope_row_order(heads[kind_of], head_dim)).numpy()]
        bias = None if module.bias is None else module.bias.detach().clone()
        layers[name] = layer_from_blocks(data, t.tensor_type.name, module.out_features, module.in_features, bias)
    return layers
