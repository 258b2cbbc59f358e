"""--dtype auto: bf16 only where the CPU runs it natively and a probe finds it faster; fp32 everywhere else."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from quantlm import hardware
from quantlm.errors import InvalidSpecError
from quantlm.qat.trainer import TrainSettings


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """Pretend to be a CPU with the given flags and probe result; count the probes."""
    monkeypatch.setenv("QUANTLM_HOME", str(tmp_path / "home"))
    probes = []

    def pretend(flags, fp32_s=1.0, bf16_s=0.5, onednn=True):
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(hardware, "_onednn_bf16", lambda: onednn)

        def seconds(dtype, shape):
            probes.append(dtype)
            return fp32_s if dtype == torch.float32 else bf16_s

        monkeypatch.setattr(hardware, "_gemm_seconds", seconds)
        return probes

    return pretend


def test_an_explicit_dtype_is_taken_as_asked():
    for name, dtype in hardware.DTYPES.items():
        assert hardware.choose_dtype(name).dtype == dtype
    assert hardware.choose_dtype(torch.float16).dtype == torch.float16


def test_an_unknown_dtype_is_one_line_naming_the_choices():
    with pytest.raises(InvalidSpecError, match="auto, float32, bfloat16, float16"):
        hardware.choose_dtype("fp8")


def test_avx2_only_gets_fp32_without_probing(cpu):
    probes = cpu({"avx2", "fma"})
    choice = hardware.choose_dtype("auto", "cpu")
    assert choice.dtype == torch.float32 and "no native bf16" in choice.reason and not probes


def test_decoding_is_probed_even_without_bf16_instructions(cpu):
    """One row at a time a matmul is bound by memory, where bf16's half-size weights can pay on any CPU."""
    probes = cpu({"avx2", "fma"}, fp32_s=1.0, bf16_s=0.4)
    choice = hardware.choose_dtype("auto", "cpu", rows=1)
    assert choice.dtype == torch.bfloat16 and "1-row" in choice.reason and len(probes) == 2
    cpu({"avx2", "fma"}, fp32_s=1.0, bf16_s=1.0)  # a new probe shape per rows: 8 rows is not memory-bound
    assert hardware.choose_dtype("auto", "cpu", rows=8).dtype == torch.float32


def test_each_kind_of_work_has_its_own_probe(cpu):
    probes = cpu({"avx512_bf16"})
    for rows in (1, 64, 2048, 4096):  # rows beyond the cap share the capped probe
        hardware.choose_dtype("auto", "cpu", rows=rows)
    assert len(probes) == 2 * 3
    assert hardware.probe_shape(1)[1:] == hardware.MEMORY_BOUND_WEIGHT
    assert hardware.probe_shape(4096) == (hardware.PROBE_MAX_ROWS, *hardware.COMPUTE_BOUND_WEIGHT)


def test_bf16_flags_held_back_by_onednn_get_fp32(cpu):
    probes = cpu({"avx2", "avx512f", "avx512_bf16"}, onednn=False)
    choice = hardware.choose_dtype("auto", "cpu")
    assert choice.dtype == torch.float32 and "ISA" in choice.reason and not probes


def test_native_bf16_that_probes_faster_gets_bf16_and_the_probe_is_cached(cpu):
    probes = cpu({"avx512f", "avx512_bf16"}, fp32_s=1.0, bf16_s=0.5)
    first = hardware.choose_dtype("auto", "cpu")
    assert first.dtype == torch.bfloat16 and "2.00x" in first.reason and len(probes) == 2
    second = hardware.choose_dtype("auto", "cpu")
    assert second.dtype == torch.bfloat16 and "cached" in second.reason and len(probes) == 2


def test_native_bf16_that_probes_slower_gets_fp32(cpu):
    cpu({"avx512f", "avx512_bf16"}, fp32_s=1.0, bf16_s=0.95)
    choice = hardware.choose_dtype("auto", "cpu")
    assert choice.dtype == torch.float32 and "only 1.05x" in choice.reason


def test_a_damaged_probe_cache_is_measured_again(cpu):
    probes = cpu({"amx_bf16"})
    hardware.choose_dtype("auto", "cpu")
    probe_file = hardware._probe_file(hardware.probe_shape(hardware.PROBE_MAX_ROWS))
    probe_file.write_text("{not json")
    assert hardware.choose_dtype("auto", "cpu").dtype == torch.bfloat16 and len(probes) == 4
    assert json.loads(probe_file.read_text())["speedup"] == 2.0


def test_an_unwritable_cache_only_costs_a_new_probe(cpu, monkeypatch, tmp_path):
    probes = cpu({"avx512_bf16"})
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("QUANTLM_HOME", str(blocker))  # a file: nothing can be created under it
    assert hardware.choose_dtype("auto", "cpu").dtype == torch.bfloat16
    assert hardware.choose_dtype("auto", "cpu").dtype == torch.bfloat16 and len(probes) == 4


def test_training_accepts_auto_bf16_and_fp32_only():
    assert TrainSettings().dtype == "auto"
    with pytest.raises(InvalidSpecError, match="auto, bfloat16, float32"):
        TrainSettings(dtype="float16")


def test_an_isa_held_to_avx2_really_gets_fp32(tmp_path):
    """No mocks: torch itself held to AVX2 (as on an AVX2-only machine) makes auto take fp32."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "QUANTLM_HOME": str(tmp_path)}
    code = "from quantlm.hardware import choose_dtype; print(choose_dtype('auto', 'cpu').name)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "float32"


def test_verbose_says_which_dtype_and_why(tiny_model_dir, capsys, monkeypatch):
    from quantlm.cli import main

    args = ["generate", str(tiny_model_dir), "--prompt", "ab", "--max-new-tokens", "2", "--verbose", "--json"]
    monkeypatch.setattr(sys, "argv", ["quantlm", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    err = capsys.readouterr().err
    assert "dtype: " in err and "auto" in err and "CPU " in err


def test_bench_times_prefill_and_decoding_each_in_its_own_auto_dtype(tmp_path, monkeypatch, text_file):
    """Where auto differs by phase (a CPU without bf16 instructions: fp32 prefill, bf16 decoding), bench switches
    the loaded model between the two measurements; the quantized layers keep their kernels."""
    import json

    from typer.testing import CliRunner

    import quantlm
    from conftest import byte_tokenizer, tiny_model
    from quantlm import api
    from quantlm.cli import app

    real = api.choose_dtype

    def by_phase(requested="auto", device=None, *, rows=512, training=False):
        if requested != "auto":
            return real(requested, device, rows=rows, training=training)
        return hardware.DTypeChoice(torch.bfloat16 if rows == 1 else torch.float32, "auto: pretended")

    monkeypatch.setattr(api, "choose_dtype", by_phase)
    model = quantlm.quantize(tiny_model("llama"), [{"method": "rtn", "group_size": 32}], progress=False)
    ckpt = quantlm.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    args = ["bench", str(ckpt), "--prefill-tokens", "16", "--decode-prompt", "4", "--decode-tokens", "2"]
    result = CliRunner().invoke(app, [*args, "--repeats", "1", "--data", str(text_file), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["prefill_dtype"] == "float32" and report["dtype"] == "bfloat16"
    assert report["extra"]["kernels"] == "int4pack x21" and report["decode_tok_s"] > 0
