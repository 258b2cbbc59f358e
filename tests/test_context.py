"""Requests past a model's positions: refused for learned absolute positions, allowed for rotary models."""

from __future__ import annotations

import pytest

from conftest import tiny_config
from quantlm.errors import InvalidSpecError
from quantlm.models.context import check_context, context_length, hard_context_length


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_learned_positions_are_a_hard_limit(family):
    config = tiny_config(family)
    assert context_length(config) == hard_context_length(config) == 512
    check_context(config, 512, "--seqlen 512")
    with pytest.raises(InvalidSpecError, match="--seqlen 513 needs 513 positions .* has only 512"):
        check_context(config, 513, "--seqlen 513")


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "gpt_neox"])
def test_rotary_models_may_run_past_their_training_length(family):
    config = tiny_config(family)
    assert context_length(config) == 512 and hard_context_length(config) is None
    check_context(config, 4096, "--seqlen 4096")
