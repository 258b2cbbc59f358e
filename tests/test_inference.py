"""Loading for inference: kernels chosen per layer, compute dtype, generation and the bench command, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import quantlm
from conftest import byte_tokenizer, tiny_model
from quantlm.cli import app
from quantlm.core import QuantSpec
from quantlm.errors import QuantlmError
from quantlm.eval.speed import measure_speed
from quantlm.methods import RTN
from quantlm.nn import QuantLinear
from quantlm.nn.kernels import cpu_has_fast_int8

runner = CliRunner()
IDS = torch.tensor([[5, 80, 17, 200, 33, 9, 41, 120]])


def _checkpoint(tmp_path, spec, act_bits=None, name="q"):
    model = tiny_model("llama")
    quantlm.quantize(model, RTN(spec, act_bits=act_bits), progress=False)
    return quantlm.save(model, tmp_path / name, tokenizer=byte_tokenizer())


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def assert_close_logits(logits, reference, exact):
    """Exact paths agree to float rounding; the weight-only ops round 8 decode-sized rows to bf16
    (docs/inference.md)."""
    if exact:
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    else:
        assert float((logits - reference).norm() / reference.norm()) < 2e-2


@pytest.mark.parametrize(
    "spec, act_bits, fast, auto",
    [
        (QuantSpec(bits=4, group_size=32), None, "int4pack", "int4pack"),
        (QuantSpec(bits=3, group_size=32, symmetric=True), None, "int4pack", "int4pack"),
        (QuantSpec(bits=8, group_size=-1, symmetric=True), None, "int8pack", "int8pack"),
        (QuantSpec(bits=8, group_size=-1, symmetric=True), 8, "int8", "int8" if cpu_has_fast_int8() else "torch"),
    ],
)
def test_load_picks_the_fast_kernel_and_matches_the_reference(tmp_path, spec, act_bits, fast, auto):
    out = _checkpoint(tmp_path, spec, act_bits)
    assert set(quantlm.load(out).quantlm_kernels.values()) == {auto}
    model = quantlm.load(out, kernel=fast)
    reference = quantlm.load(out, kernel="torch")
    assert set(reference.quantlm_kernels.values()) == {"torch"}
    assert_close_logits(_logits(model), _logits(reference), exact=fast == "int8")


def test_odd_shapes_fall_back_silently_and_correctly(tmp_path):
    # intermediate 100: gate/up have N = 100 (padded to 112 for int4pack); down_proj has K = 100, no group fits
    model = tiny_model("llama", intermediate_size=100)
    quantlm.quantize(model, RTN(QuantSpec(bits=4, group_size=32)), progress=False)
    out = quantlm.save(model, tmp_path / "odd", tokenizer=byte_tokenizer())
    auto = quantlm.load(out)
    kernels = auto.quantlm_kernels
    assert kernels["model.layers.0.mlp.down_proj"] == "torch"
    assert kernels["model.layers.0.mlp.up_proj"] == "int4pack"
    assert_close_logits(_logits(auto), _logits(quantlm.load(out, kernel="torch")), exact=False)
    with pytest.raises(QuantlmError, match="kernel 'int4pack' cannot run"):
        quantlm.load(out, kernel="int4pack")


def test_bf16_compute_keeps_the_stored_scales(tmp_path):
    out = _checkpoint(tmp_path, QuantSpec(bits=4, group_size=32))
    model = quantlm.load(out, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.scales.dtype == torch.float16
    logits = _logits(model)
    reference = _logits(quantlm.load(out, kernel="torch"))
    assert float((logits - reference).norm() / reference.norm()) < 3e-2


def test_measure_speed_reports_every_figure(tmp_path, text_file):
    out = _checkpoint(tmp_path, QuantSpec(bits=4, group_size=32))
    model = quantlm.load(out)
    report = measure_speed(
        model, byte_tokenizer(), prefill_tokens=64, decode_prompt=16, decode_tokens=4, repeats=2, text=str(text_file)
    )
    assert len(report.prefill_runs) == len(report.decode_runs) == 2
    assert report.prefill_tok_s > 0 and report.decode_tok_s > 0 and report.decode_bound_tok_s > 0
    w = report.weight_bytes
    assert 0 < w["quantized_linear"] < 0.4 * w["quantized_linear_bf16"]
    # what decode reads: the int4 kernels' tensors, not the stored codes they were made from
    assert report.bytes_per_token < w["total"] + w["quantized_linear"]
    assert report.peak_rss_gb > 0


def test_bench_and_generate_commands(tmp_path, text_file):
    out = _checkpoint(tmp_path, QuantSpec(bits=4, group_size=32))
    result = runner.invoke(
        app,
        [
            "bench",
            str(out),
            "--dtype",
            "float32",
            "--prefill-tokens",
            "32",
            "--decode-prompt",
            "8",
            "--decode-tokens",
            "3",
            "--repeats",
            "1",
            "--data",
            str(text_file),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["extra"]["kernels"] == "int4pack x21" and report["decode_tokens"] == 3
    result = runner.invoke(app, ["bench", str(out), "--repeats", "0"])
    assert result.exit_code == 2 and "--repeats must be at least 1" in result.output
    result = runner.invoke(app, ["bench", str(out), "--kernel", "marlin"])
    assert result.exit_code == 2 and "unknown kernel 'marlin'" in result.output

    gen = runner.invoke(app, ["generate", str(out), "--prompt", "The quick", "--max-new-tokens", "4", "--verbose"])
    assert gen.exit_code == 0, gen.output
    assert "model.layers.0.self_attn.q_proj\tint4pack" in gen.output and "int4pack x21" in gen.output
    assert "\nThe quick" in gen.output  # the prompt, then the streamed continuation
    # --kernel torch runs every layer on the reference math (that the kernels agree with it is tests/test_kernels.py's
    # job: greedy text from a random tiny model flips on last-bit differences, so it is not compared here)
    gen_args = ["generate", str(out), "--prompt", "The quick", "--max-new-tokens", "4", "--dtype", "float32"]
    torch_gen = runner.invoke(app, [*gen_args, "--kernel", "torch", "--verbose"])
    assert torch_gen.exit_code == 0, torch_gen.output
    assert "torch x21" in torch_gen.output and "\nThe quick" in torch_gen.output


def test_w8a8_recipe_round_trips_and_refuses_other_activation_bits(tmp_path):
    step = RTN(QuantSpec(bits=8, group_size=-1, symmetric=True), act_bits=8)
    assert RTN.from_config(step.to_config()) == step
    assert "a8" in quantlm.parse_recipe(step).describe()
    with pytest.raises(QuantlmError, match="activation bits must be 8 .W8A8., 4"):
        RTN(QuantSpec(bits=8), act_bits=6)
    with pytest.raises(QuantlmError, match="per-tensor static activations need 8-bit"):
        RTN(QuantSpec(bits=8), act_bits=4, act_granularity="tensor")


def test_pipeline_keeps_no_dequantized_copies_after_a_block(text_file, monkeypatch):
    """Finished layers run on a dequantized copy while their block is calibrated; the copy goes with the block."""
    from quantlm.methods import GPTQ
    from quantlm.pipeline.dequantized import DequantizedCopy

    model = tiny_model("llama")
    copies, kernels = [], []
    original_copy, original_kernel = DequantizedCopy.__init__, QuantLinear.use_kernel

    def copy_spy(self, layer, dtype=torch.float32):
        copies.append(dtype)
        original_copy(self, layer, dtype)

    def kernel_spy(self, *args, **kwargs):
        kernels.append(args)
        return original_kernel(self, *args, **kwargs)

    monkeypatch.setattr(DequantizedCopy, "__init__", copy_spy)
    monkeypatch.setattr(QuantLinear, "use_kernel", kernel_spy)
    quantlm.quantize(model, GPTQ(QuantSpec(bits=4, group_size=32)), torch.randint(0, 256, (4, 32)), progress=False)
    assert copies and set(copies) == {torch.float32}  # in the model's dtype
    assert not kernels  # the pipeline takes no inference kernel
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 21 and all(m.kernel is None for m in layers)
