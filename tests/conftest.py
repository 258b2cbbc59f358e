"""Shared fixtures: tiny random models of several families, built from configs, and a byte-level tokenizer."""

from __future__ import annotations

import contextlib

import pytest
import torch

VOCAB = 260  # 256 byte tokens + specials


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    common = dict(vocab_size=VOCAB, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    if family in ("llama", "mistral", "qwen2", "qwen3", "phi3"):
        cfg = dict(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        )
        if family == "qwen3":
            cfg["head_dim"] = 16
    elif family == "gemma3_text":
        cfg = dict(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        )
    elif family == "gpt2":
        cfg = dict(n_embd=64, n_layer=3, n_head=4, n_positions=512)
    elif family == "opt":
        cfg = dict(
            hidden_size=64,
            ffn_dim=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=64,
        )
    elif family == "gpt_neox":
        cfg = dict(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=512,
        )
    else:
        raise ValueError(family)
    cfg.update(common)
    cfg.update(overrides)
    return AutoConfig.for_model(family, **cfg)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    # Random init gives near-uniform predictions; larger weights make quantization error visible in tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.normal_(0, 0.08)
    return model.eval()


FAMILIES = ["llama", "gpt2", "opt", "gpt_neox", "qwen2", "qwen3", "gemma3_text", "phi3", "mistral"]


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def llama():
    return tiny_model("llama")


def save_tiny_model(path, family: str = "llama"):
    """A tiny model saved as a plain Hugging Face directory at ``path``, with its tokenizer; returns ``path``."""
    tiny_model(family).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@contextlib.contextmanager
def unit_environment(unit_home):
    """The environment of unit tests (the throwaway QUANTLM_HOME, no hub), for module-scoped fixtures, which run
    outside the per-test isolation below."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTLM_HOME", str(unit_home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny Llama saved as a plain Hugging Face directory, with its tokenizer."""
    return save_tiny_model(tmp_path / "tiny-llama")


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization maps real numbers onto a small grid of integers, "
    "and a good grid keeps the model's predictions close to those of the full-precision model. "
) * 40


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_text(SAMPLE_TEXT)
    return path


@pytest.fixture(scope="session")
def unit_home(tmp_path_factory):
    return tmp_path_factory.mktemp("quantlm-home")


@pytest.fixture(autouse=True)
def _isolated_home(monkeypatch, request, unit_home):
    """Unit tests share a throwaway QUANTLM_HOME; integration tests use the user's cache (model and text)."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("QUANTLM_HOME", str(unit_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
