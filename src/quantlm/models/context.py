"""How many positions a model can attend over, and the check that a request fits in them.

A model with learned absolute position embeddings (GPT-2, OPT) has no position past its last one: asked for more,
it fails with an index error deep inside torch. Such requests are refused up front, naming the limit and the flag
to change. A rotary model (Llama, Qwen, Gemma, GPT-NeoX, ...) computes positions instead of looking them up, so it
runs past its training length (with worse predictions there); quantlm lets it, as transformers does."""

from __future__ import annotations

from quantlm.errors import InvalidSpecError

POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
ROTARY_FIELDS = ("rope_parameters", "rope_theta", "rope_scaling", "rotary_pct", "rotary_dim", "rotary_emb_base")


def _text_config(config):
    return getattr(config, "get_text_config", lambda: config)()


def context_length(config) -> int | None:
    """The number of positions in ``config`` (a transformers config, or the text config of a multimodal one);
    None where the config does not say."""
    config = _text_config(config)
    for field in POSITION_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def hard_context_length(config) -> int | None:
    """The positions a model cannot go past: its learned absolute positions; None for a rotary model."""
    if any(getattr(_text_config(config), field, None) is not None for field in ROTARY_FIELDS):
        return None
    return context_length(config)


def check_context(config, tokens: int, what: str) -> None:
    """Refuse ``tokens`` positions (``what``: the flag or setting asking for them) beyond the model's hard limit."""
    limit = hard_context_length(config)
    if limit is not None and tokens > limit:
        raise InvalidSpecError(
            f"{what} needs {tokens} positions but the model has only {limit} (learned positions, no more exist): "
            f"ask for {limit} or fewer"
        )
