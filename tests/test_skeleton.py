"""Skeletons are built without weight initialization, yet every buffer a model computes in its modules' __init__
(rotary frequencies, Gemma's embedding scale, ...) must be exactly what a normally built model has."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, tiny_config
from quantlm.models.skeleton import empty_model


@pytest.mark.parametrize("family", FAMILIES)
def test_skeleton_has_meta_parameters_and_the_real_buffers(family):
    config = tiny_config(family)
    reference = AutoModelForCausalLM.from_config(config)
    skeleton = empty_model(config, torch.float32)
    assert all(p.is_meta for p in skeleton.parameters())
    skeleton.tie_weights()  # as the loaders do once the tensors are assigned
    assert [n for n, _ in skeleton.named_parameters()] == [n for n, _ in reference.named_parameters()]
    buffers = dict(skeleton.named_buffers())
    assert buffers.keys() == dict(reference.named_buffers()).keys()
    for name, buffer in reference.named_buffers():
        assert not buffers[name].is_meta, name
        assert torch.equal(buffers[name], buffer), name
