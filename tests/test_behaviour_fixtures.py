"""Behaviour pinned by fixtures written with earlier code: quantized tensors byte for byte, and old checkpoints."""

from __future__ import annotations

import base64
import json

import pytest
import torch

import quantlm
from behaviour_cases import CASES, HASHES, HERE, quantized_checkpoint, tensor_hashes
from conftest import VOCAB

STORED = json.loads(HASHES.read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantized_tensors_are_byte_identical_to_the_fixture(tmp_path, case):
    torch.manual_seed(0)
    assert tensor_hashes(quantized_checkpoint(case, tmp_path / case)) == STORED[case]


def _v1_checkpoint(tmp_path):
    stored = json.loads((HERE / "fixtures" / "checkpoint_v1.json").read_text())
    path = tmp_path / "v1"
    path.mkdir()
    for name, content in stored["files"].items():
        if "base64" in content:
            (path / name).write_bytes(base64.b64decode(content["base64"]))
        else:
            (path / name).write_text(content["text"])
    return path


def test_a_format_version_1_checkpoint_loads_and_runs_as_when_it_was_written(tmp_path):
    old = _v1_checkpoint(tmp_path)
    assert json.loads((old / "config.json").read_text())["quantization_config"]["format_version"] == 1
    loaded = quantlm.load(old)
    fresh = quantlm.load(quantized_checkpoint("gptq-w4-g16-act-order-static", tmp_path / "fresh"))
    ids = torch.randint(0, VOCAB - 4, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, fresh(ids).logits)
    assert tensor_hashes(old) == STORED["gptq-w4-g16-act-order-static"]
