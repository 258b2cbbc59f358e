"""Quantized KV cache: per-token grids, the real cache against the fake path, generation, checkpoints, PTQ."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from quantlm import api
from quantlm.core import QuantSpec
from quantlm.core.activation import (
    dequantize_per_token,
    fake_quantize_int8,
    fake_quantize_per_token,
    quantize_per_token,
)
from quantlm.errors import InvalidSpecError, QuantlmError
from quantlm.methods import RTN
from quantlm.nn.kv_cache import (
    KVQuantConfig,
    enable_fake_kv_quantization,
    enable_kv_quantization,
    kv_cache_nbytes,
    quantized_kv_cache,
)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    rows=st.integers(1, 6),
    cols=st.integers(1, 40),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_per_token_grid_error_is_at_most_half_a_step(bits, symmetric, rows, cols, scale, seed):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    codes, s, z = quantize_per_token(x, bits, symmetric)
    levels = (1 << bits) - 1
    assert codes.dtype == torch.uint8 and int(codes.max()) <= levels
    back = dequantize_per_token(codes, s, z, torch.float32)
    assert torch.all((back - x).abs() <= s / 2 * (1 + 1e-5) + 1e-12)
    assert torch.equal(fake_quantize_per_token(x, bits, symmetric), back)
    if symmetric:  # codes stay in the symmetric range: no -2**(b-1)
        assert int(codes.min()) >= 1


def test_8_bit_symmetric_grid_is_the_int8_activation_grid():
    x = torch.randn(5, 33) * 3
    assert torch.equal(fake_quantize_per_token(x, 8), fake_quantize_int8(x, "token"))


def test_fake_quantization_has_a_straight_through_gradient():
    x = torch.randn(4, 16, requires_grad=True)
    fake_quantize_per_token(x, 4).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # symmetric MinMax never clips


def _tiny_pair(bits=4, symmetric=True):
    model = tiny_model("llama")
    config = KVQuantConfig(bits, symmetric)
    fake = enable_fake_kv_quantization(copy.deepcopy(model), config)
    real = enable_kv_quantization(copy.deepcopy(model), config)
    return model, fake, real


@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, True), (4, False), (3, True)])
def test_real_cache_computes_exactly_what_the_fake_path_does(bits, symmetric):
    model, fake, real = _tiny_pair(bits, symmetric)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        a, b, fp = fake(ids).logits, real(ids, use_cache=False).logits, model(ids).logits
    assert torch.equal(a, b)
    assert (a - fp).abs().max() > 0  # the KV cache really is quantized


def test_incremental_decoding_with_the_cache_matches_the_full_forward():
    _, fake, real = _tiny_pair(4)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        cache = quantized_kv_cache(KVQuantConfig(4))
        real(ids[:, :10], cache=cache)
        for t in range(10, 16):
            step = real(ids[:, t : t + 1], cache=cache).logits[:, -1]
            full = fake(ids[:, : t + 1]).logits[:, -1]
            torch.testing.assert_close(step, full, rtol=0, atol=1e-5)
    assert cache.get_seq_length() == 16


def test_greedy_generation_is_the_same_with_the_real_and_the_fake_cache():
    _, fake, real = _tiny_pair(4)
    ids = torch.randint(0, 256, (1, 8))
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=258)
    assert torch.equal(fake.generate(ids, **kwargs), real.generate(ids, **kwargs))


def test_cache_memory_shrinks_with_the_bits():
    model = tiny_model("llama")  # 3 layers, 2 KV heads of 16 dims
    ids = torch.randint(0, 256, (1, 32))
    sizes = {}
    with torch.no_grad():
        for bits in (16, 8, 4):
            enable_kv_quantization(model, None if bits == 16 else KVQuantConfig(bits))
            sizes[bits] = kv_cache_nbytes(model(ids, use_cache=True).past_key_values)
    per_token = 3 * 2 * 2  # layers x (K, V) x heads
    assert sizes[16] == 32 * per_token * 16 * 4  # fp32 cache
    assert sizes[8] == 32 * per_token * (16 + 4)  # int8 codes + one fp32 scale
    assert sizes[4] == 32 * per_token * (8 + 4)  # two codes a byte


def test_bad_kv_bits_are_a_clear_error():
    with pytest.raises(InvalidSpecError, match="KV-cache bits"):
        KVQuantConfig(bits=16)
    with pytest.raises(InvalidSpecError, match="KV-cache bits"):
        KVQuantConfig(bits=1)


def test_a_prefilled_float_cache_is_refused():
    from transformers import DynamicCache

    model = enable_kv_quantization(tiny_model("llama"), KVQuantConfig(8))
    cache = DynamicCache(config=model.config)
    cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with pytest.raises(QuantlmError, match="pre-filled float cache"):
        model(torch.randint(0, 256, (1, 4)), cache=cache)


def test_ptq_with_a_quantized_kv_cache_round_trips_through_a_checkpoint(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 20))
    api.quantize(
        model, [RTN(QuantSpec(bits=8, group_size=-1, symmetric=True))], kv_cache=KVQuantConfig(4), progress=False
    )
    assert model.quantlm_kv_config == KVQuantConfig(4)
    api.save(model, tmp_path / "q")
    loaded = api.load(tmp_path / "q")
    assert loaded.quantlm_kv_config == KVQuantConfig(4)
    with torch.no_grad():
        quantized_kv = loaded(ids).logits
        enable_kv_quantization(loaded, None)
        float_kv = loaded(ids).logits
        fake_kv = enable_fake_kv_quantization(loaded, KVQuantConfig(4))(ids).logits
    assert torch.equal(quantized_kv, fake_kv)
    assert (quantized_kv - float_kv).abs().max() > 1e-4


def test_kv_bits_from_the_cli(tiny_model_dir, text_file, tmp_path):
    import json

    from typer.testing import CliRunner

    from quantlm.cli import app

    run = CliRunner().invoke
    out = tmp_path / "q"
    r = run(
        app,
        [
            "quantize",
            str(tiny_model_dir),
            "--bits",
            "8",
            "--group-size",
            "-1",
            "--sym",
            "--kv-bits",
            "4",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["kv_cache"] == {
        "bits": 4,
        "symmetric": True,
    }
    common = ["--data", str(text_file), "--split", "eval", "--seqlen", "32", "--max-windows", "2", "--json"]
    as_saved = json.loads(run(app, ["eval", str(out), *common]).stdout)
    float_kv = json.loads(run(app, ["eval", str(out), "--kv-bits", "16", *common]).stdout)
    assert as_saved["kv_cache"] == "kv4 per-token sym" and float_kv["kv_cache"] is None
    assert as_saved["ppl"] != float_kv["ppl"]
    r = run(app, ["quantize", str(tiny_model_dir), "--kv-bits", "12", "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "KV-cache bits" in r.output and not (tmp_path / "bad").exists()
