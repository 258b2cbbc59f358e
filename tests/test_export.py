"""Exports to GPTQ and compressed-tensors, and reading them back: layouts checked against slow obvious versions,
round trips that must be bit-exact, and the refusals. The real clients' checks are in test_export_clients.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

import quantlm
from conftest import byte_tokenizer, tiny_model
from quantlm.api import quantize, save
from quantlm.cli import app
from quantlm.core import QuantSpec
from quantlm.core.packing import from_int32_words, pack, to_int32_words
from quantlm.errors import QuantlmError
from quantlm.formats.exchange import export_checkpoint, read_foreign
from quantlm.formats.gptq import GPTQFormat
from quantlm.formats.interchange import write_export
from quantlm.formats.native import load_checkpoint, quantized_modules
from quantlm.nn.qlinear import QuantLinear

IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 128, 64, 1]])
CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))

RECIPES = {
    "w4-g32-sym": {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True},
    "w4-g32-asym": {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False},
    "w8-channel-asym": {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": False},
    "w2-g32-sym": {"method": "rtn", "bits": 2, "group_size": 32, "symmetric": True},
    "w3-g32-asym": {"method": "rtn", "bits": 3, "group_size": 32, "symmetric": False},
    "gptq-w4-act-order": {
        "method": "gptq",
        "bits": 4,
        "group_size": 32,
        "symmetric": False,
        "act_order": True,
        "static_groups": False,
    },
    "w8a8": [
        {"method": "smoothquant"},
        {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True, "act_bits": 8},
    ],
    "w8a8-static": [
        {"method": "smoothquant"},
        {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True, "act_bits": 8, "act_granularity": "tensor"},
    ],
}
# what each format holds (the rest it refuses; test_refusals checks the reasons)
HOLDS = {
    "gptq": {"w4-g32-sym", "w4-g32-asym", "w8-channel-asym", "w2-g32-sym", "w3-g32-asym", "gptq-w4-act-order"},
    "compressed-tensors": {"w4-g32-sym", "w4-g32-asym", "w8-channel-asym", "w2-g32-sym", "w8a8", "w8a8-static"},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One tiny quantlm checkpoint per recipe."""
    root = tmp_path_factory.mktemp("export-sources")
    paths = {}
    for name, recipe in RECIPES.items():
        model = quantize(tiny_model(), recipe, CALIB, progress=False)
        paths[name] = save(model, root / name, tokenizer=byte_tokenizer())
    return paths


def _same_layers(a: dict[str, QuantLinear], b: dict[str, QuantLinear]) -> None:
    assert a.keys() == b.keys()
    for name, m in a.items():
        r = b[name]
        assert m.spec.bits == r.spec.bits and m.spec.group_size == r.spec.group_size, name
        assert torch.equal(m.codes(), r.codes()), name
        assert torch.equal(m.scales.float(), r.scales.float()), name
        assert torch.equal(m.zeros.float(), r.zeros.float()), name
        assert (m.g_idx is None) == (r.g_idx is None), name
        if m.g_idx is not None:
            assert torch.equal(m.g_idx, r.g_idx), name
        assert m.act_bits == r.act_bits and m.act_granularity == r.act_granularity, name
        if m.act_scale is not None:
            assert torch.equal(m.act_scale, r.act_scale), name


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_round_trip_is_bit_exact(checkpoints, tmp_path, fmt, recipe):
    """Export, then read back: the same codes, scales, zero points, groups and activation settings, and the same
    logits; or, for what the format cannot hold, a one-line refusal."""
    if recipe not in HOLDS[fmt]:
        with pytest.raises(QuantlmError, match=f"^{fmt} cannot hold "):
            export_checkpoint(checkpoints[recipe], tmp_path / "out", format=fmt)
        assert not (tmp_path / "out").exists()
        return
    out = export_checkpoint(checkpoints[recipe], tmp_path / "out", format=fmt)
    original = load_checkpoint(checkpoints[recipe])
    back = read_foreign(out)
    _same_layers(quantized_modules(original), quantized_modules(back))
    with torch.no_grad():
        assert torch.equal(original(IDS).logits, back(IDS).logits)
    # what quantlm.load and its tokenizer see: the same model on the same kernels
    loaded, native = quantlm.load(out), quantlm.load(checkpoints[recipe])
    assert loaded.quantlm_kernels == native.quantlm_kernels
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, native(IDS).logits)
    assert (
        quantlm.load_tokenizer(out)("hello").input_ids == quantlm.load_tokenizer(checkpoints[recipe])("hello").input_ids
    )


def test_gptq_layout_matches_the_obvious_one(checkpoints, tmp_path):
    """qweight[i, j] holds codes (j, 8i..8i+7) of a 4-bit layer, lowest bits first; qzeros the same along the
    output; v1 stores zero - 1, v2 the zero; scales [groups, out] fp16; g_idx each column's group."""
    for fmt, recipe, minus in (("gptq", "w4-g32-sym", 1), ("gptq-v2", "w4-g32-asym", 0)):
        out = export_checkpoint(checkpoints[recipe], tmp_path / fmt, format=fmt)
        tensors = load_file(str(out / "model.safetensors"))
        layer = quantized_modules(load_checkpoint(checkpoints[recipe]))["model.layers.1.mlp.down_proj"]
        codes, zeros = layer.codes().long(), layer.zeros.long()
        qweight = tensors["model.layers.1.mlp.down_proj.qweight"].long() & 0xFFFFFFFF
        qzeros = tensors["model.layers.1.mlp.down_proj.qzeros"].long() & 0xFFFFFFFF
        for i in range(qweight.shape[0]):
            for j in range(0, qweight.shape[1], 7):
                assert qweight[i, j] == sum(int(codes[j, 8 * i + k]) << (4 * k) for k in range(8))
        for g in range(qzeros.shape[0]):
            for w in range(qzeros.shape[1]):
                assert qzeros[g, w] == sum(((int(zeros[8 * w + k, g]) - minus) & 15) << (4 * k) for k in range(8))
        scales = tensors["model.layers.1.mlp.down_proj.scales"]
        assert scales.dtype == torch.float16 and torch.equal(scales, layer.scales.T.half())
        g_idx = tensors["model.layers.1.mlp.down_proj.g_idx"]
        assert torch.equal(g_idx, torch.arange(layer.in_features, dtype=torch.int32) // 32)
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        assert config == json.loads((out / "quantize_config.json").read_text())
        assert config["checkpoint_format"] == ("gptq" if minus else "gptq_v2")
        assert (config["bits"], config["group_size"], config["sym"], config["desc_act"]) == (4, 32, minus == 1, False)


def test_gptq_writes_v1_for_symmetric_and_v2_for_asymmetric_grids(checkpoints, tmp_path):
    formats = {}
    for recipe in ("w4-g32-sym", "w4-g32-asym", "gptq-w4-act-order"):
        out = export_checkpoint(checkpoints[recipe], tmp_path / recipe, format="gptq")
        formats[recipe] = json.loads((out / "config.json").read_text())["quantization_config"]
    assert formats["w4-g32-sym"]["checkpoint_format"] == "gptq"
    assert formats["w4-g32-asym"]["checkpoint_format"] == "gptq_v2"
    assert formats["gptq-w4-act-order"]["desc_act"] is True


def test_compressed_tensors_layout(checkpoints, tmp_path):
    """weight_packed holds quantlm's packed bytes; an asymmetric zero point is packed down the output; W8A8 is
    int8 codes counted from the middle; config groups name their modules; fp32 models get fp32 scales."""
    out = export_checkpoint(checkpoints["w4-g32-asym"], tmp_path / "w4", format="compressed-tensors")
    tensors = load_file(str(out / "model.safetensors"))
    layer = quantized_modules(load_checkpoint(checkpoints["w4-g32-asym"]))["model.layers.0.self_attn.q_proj"]
    packed = tensors["model.layers.0.self_attn.q_proj.weight_packed"]
    assert packed.dtype == torch.int32 and torch.equal(packed.view(torch.uint8), layer.qweight)
    zp = tensors["model.layers.0.self_attn.q_proj.weight_zero_point"]
    assert zp.shape == (layer.out_features * 4 // 32, 2)
    assert torch.equal(from_int32_words(zp.T.contiguous(), 4, layer.out_features), pack(layer.zeros.T, 4))
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float32
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert len(group["targets"]) == 21 and group["weights"]["strategy"] == "group"

    out = export_checkpoint(checkpoints["w8a8"], tmp_path / "w8a8", format="compressed-tensors")
    tensors = load_file(str(out / "model.safetensors"))
    layer = quantized_modules(load_checkpoint(checkpoints["w8a8"]))["model.layers.0.mlp.up_proj"]
    weight = tensors["model.layers.0.mlp.up_proj.weight"]
    assert weight.dtype == torch.int8 and torch.equal(weight.long() + 128, layer.codes().long())
    (group,) = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert group["format"] == "int-quantized"
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"] is True


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    n=st.integers(1, 80),
    rows=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_int32_words_hold_the_bit_stream(bits, n, rows, seed):
    """Code i of a row sits at bits [i*bits, (i+1)*bits) of the row's words, bit j in bit j % 32 of word j // 32."""
    codes = torch.randint(0, 1 << bits, (rows, n), generator=torch.Generator().manual_seed(seed))
    words = to_int32_words(pack(codes, bits))
    assert words.shape == (rows, -(-n * bits // 32))
    stream = [[(int(w) & 0xFFFFFFFF) >> b & 1 for w in row for b in range(32)] for row in words]
    for r in range(rows):
        for i in range(n):
            assert sum(stream[r][i * bits + b] << b for b in range(bits)) == codes[r, i]
    assert torch.equal(from_int32_words(words, bits, n), pack(codes, bits))


def _refusal(tmp_path, recipe, fmt):
    model = quantize(tiny_model(), recipe, CALIB, progress=False)
    path = save(model, tmp_path / "src", tokenizer=byte_tokenizer(), overwrite=True)
    with pytest.raises(QuantlmError) as info:
        export_checkpoint(path, tmp_path / "out", format=fmt)
    assert not (tmp_path / "out").exists()
    return str(info.value)


@pytest.mark.parametrize(
    ("recipe", "fmt", "reason"),
    [
        ({"method": "nf4", "group_size": 32}, "gptq", "codebook grid"),
        ({"method": "hqq", "bits": 4, "group_size": 32}, "compressed-tensors", "zero points are fractional"),
        ({"method": "rtn", "bits": 4, "group_size": 64}, "gptq", "not a whole number of groups of 64"),
        ({"method": "rtn", "bits": 3, "group_size": 32}, "compressed-tensors", "3-bit codes"),
        ([{"method": "smoothquant"}, {"method": "rtn", "act_bits": 8}], "gptq", "activations are quantized (a8)"),
        (
            {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True, "act_bits": 4},
            "compressed-tensors",
            "4-bit activations have no compressed-tensors kernel",
        ),
        ({"method": "rtn", "bits": 4, "group_size": 32, "lm_head": True}, "gptq", "quantized lm_head"),
    ],
)
def test_refusals_say_why_in_one_line(tmp_path, recipe, fmt, reason):
    message = _refusal(tmp_path, recipe, fmt)
    assert reason in message and "\n" not in message


def test_gptq_refuses_mixed_grids(tmp_path):
    """GPTQ has one grid per model: a layer of another bit width is refused, naming it."""
    model = load_checkpoint(
        save(
            quantize(tiny_model(), {"method": "rtn", "bits": 4, "group_size": 32}, progress=False),
            tmp_path / "src",
        )
    )
    name = "model.layers.2.mlp.down_proj"
    odd = quantized_modules(model)[name]
    other = QuantLinear.from_weight(odd.dequantize_weight(), QuantSpec(bits=8, group_size=32))
    model.get_submodule("model.layers.2.mlp").down_proj = other
    with pytest.raises(QuantlmError, match=f"{name} is w8 g32"):
        write_export(model, quantized_modules(model), GPTQFormat(), tmp_path / "out", source=None, overwrite=False)


def test_export_refuses_bad_sources_and_outputs(checkpoints, tmp_path):
    with pytest.raises(QuantlmError, match="not a quantlm checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "out")
    with pytest.raises(QuantlmError, match="unknown export format 'awq'"):
        export_checkpoint(checkpoints["w4-g32-sym"], tmp_path / "out", format="awq")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(QuantlmError, match="already exists"):
        export_checkpoint(checkpoints["w4-g32-sym"], tmp_path / "taken")
    with pytest.raises(QuantlmError, match="not a quantlm gptq export"):
        export_checkpoint(checkpoints["w4-g32-sym"], tmp_path / "taken", overwrite=True)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    out = export_checkpoint(checkpoints["w4-g32-sym"], tmp_path / "out")
    assert export_checkpoint(checkpoints["w4-g32-asym"], out, overwrite=True) == out  # an earlier export: replaced
    assert json.loads((out / "config.json").read_text())["quantization_config"]["sym"] is False


def test_cli_export(checkpoints, tmp_path):
    runner = CliRunner()
    out = tmp_path / "ct"
    result = runner.invoke(
        app, ["export", str(checkpoints["w4-g32-sym"]), "--format", "compressed-tensors", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and "wrote" in result.output
    result = runner.invoke(
        app, ["export", str(checkpoints["w4-g32-sym"]), "--format", "awq", "-o", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "unknown --format 'awq'" in result.output
    result = runner.invoke(
        app, ["export", str(checkpoints["w3-g32-asym"]), "--format", "compressed-tensors", "-o", str(tmp_path / "y")]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output and "3-bit codes" in result.output


# --------------------------------------------------------------------------------------------------------- GGUF
def bpe_tokenizer():
    """The byte tokenizer plus one merge: GGUF (and llama.cpp) need a BPE vocabulary with merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258, "Ġt": 259})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


GGUF_RECIPES = {
    "Q4_0": {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True},
    "Q5_0": {"method": "rtn", "bits": 5, "group_size": 32, "symmetric": True},
    "Q8_0": {"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True},
}


@pytest.fixture(scope="module")
def gguf_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-sources")
    return {
        kind: save(quantize(tiny_model(), recipe, None, progress=False), root / kind, tokenizer=bpe_tokenizer())
        for kind, recipe in GGUF_RECIPES.items()
    }


@pytest.mark.parametrize("kind", list(GGUF_RECIPES))
def test_gguf_blocks_are_the_layers_bit_for_bit(gguf_checkpoints, tmp_path, kind):
    """The gguf package's own dequantization of every block tensor gives quantlm's weight exactly (q and k with
    their rows in llama.cpp's rotary order); float tensors are there in F32; the vocabulary is the tokenizer's."""
    import gguf

    from quantlm.formats.gguf import gguf_name, rope_row_order

    out = export_checkpoint(gguf_checkpoints[kind], tmp_path / "m.gguf", format="gguf")
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    model = load_checkpoint(gguf_checkpoints[kind])
    for name, layer in quantized_modules(model).items():
        t = tensors[f"{gguf_name(name)}.weight"]
        assert t.tensor_type.name == kind
        want = layer.dequantize_weight()
        if name.endswith(("q_proj", "k_proj")):
            heads = 4 if name.endswith("q_proj") else 2
            want = want[rope_row_order(heads, 16)]
        assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), want.numpy()), name
    assert tensors["token_embd.weight"].tensor_type.name == "F32" and "output.weight" not in tensors  # tied
    assert len(reader.tensors) == 3 * 9 + 2
    field = reader.get_field("tokenizer.ggml.tokens")
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    tok = quantlm.load_tokenizer(gguf_checkpoints[kind])
    assert tokens[259] == "Ġt" and tok.convert_tokens_to_ids(tokens[:259]) == list(range(259))
    assert reader.get_field("llama.attention.head_count_kv").contents() == 2


def test_rope_row_order_pairs_the_halves():
    from quantlm.formats.gguf import rope_row_order

    assert rope_row_order(1, 8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert rope_row_order(2, 4).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize(
    ("recipe", "reason"),
    [
        ({"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}, "Q4_1 stores the offset"),
        ({"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True}, "none of llama.cpp's block grids"),
        ({"method": "rtn", "bits": 3, "group_size": 32, "symmetric": True}, "none of llama.cpp's block grids"),
    ],
)
def test_gguf_refusals(tmp_path, recipe, reason):
    path = save(quantize(tiny_model(), recipe, None, progress=False), tmp_path / "src", tokenizer=bpe_tokenizer())
    with pytest.raises(QuantlmError, match=reason):
        export_checkpoint(path, tmp_path / "m.gguf", format="gguf")
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(QuantlmError, match="must name a .gguf file"):
        export_checkpoint(path, tmp_path / "m.bin", format="gguf")


def test_gguf_of_a_float_model(tmp_path):
    """A float model (here a directory) exports in the chosen float type; an existing non-GGUF file is kept."""
    import gguf

    source = tmp_path / "float"
    tiny_model().save_pretrained(source)
    bpe_tokenizer().save_pretrained(source)
    out = export_checkpoint(source, tmp_path / "f16.gguf", format="gguf", gguf_type="f16")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert kinds["blk.0.attn_q.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"
    (tmp_path / "notes.gguf").write_text("mine")
    with pytest.raises(QuantlmError, match="not a GGUF file"):
        export_checkpoint(source, tmp_path / "notes.gguf", format="gguf", overwrite=True)
    assert (tmp_path / "notes.gguf").read_text() == "mine"


@pytest.mark.parametrize("kind", list(GGUF_RECIPES))
def test_gguf_reads_back_as_the_same_quantized_model(gguf_checkpoints, tmp_path, kind):
    """quantlm.load of a GGUF export: QuantLinears with the checkpoint's codes, scales and zero points, and the
    same logits (its float parts and tokenizer come through transformers' GGUF reader)."""
    out = export_checkpoint(gguf_checkpoints[kind], tmp_path / "m.gguf", format="gguf")
    back = quantlm.load(out, kernel="torch", dtype="float32")
    native = quantlm.load(gguf_checkpoints[kind], kernel="torch", dtype="float32")
    _same_layers(quantized_modules(native), quantized_modules(back))
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, native(IDS).logits)


@pytest.mark.parametrize("kind", ["Q4_1", "Q5_1", "Q4_0", "Q5_0", "Q8_0"])
def test_gguf_blocks_of_other_tools_read_as_quantized_layers(kind):
    """Blocks the gguf package quantizes (as llama-quantize --pure does) read as QuantLinears whose weight is the
    package's dequantization: exactly for the symmetric types, to fp32 rounding for Q4_1/Q5_1 (whose offset becomes
    a float zero point)."""
    import gguf

    from quantlm.formats.gguf import layer_from_blocks

    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(3))
    w[:4, :32] = 0.3  # constant blocks: llama.cpp stores d = 0 (and m = the value for Q4_1/Q5_1)
    w = w.numpy()
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    blocks = gguf.quants.quantize(w, qtype)
    layer = layer_from_blocks(blocks, kind, 24, 96)
    want = torch.from_numpy(gguf.quants.dequantize(blocks, qtype))
    tolerance = 0.0 if kind.endswith("_0") else 1e-6 * want.abs().max().item()
    assert (layer.dequantize_weight() - want).abs().max().item() <= tolerance


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_v1_zero_points_read_as_gptqmodel_writes_them(bits):
    """GPTQModel writes v1 by subtracting 1 from whole 32-bit words of packed zeros, so a zero of 0 borrows from
    the next field; quantlm's reader adds the 1 back the same way and recovers every zero, 0 and the top code
    included."""
    from quantlm.formats.gptq import gptq_layer

    out_f, in_f, maxq = 64, 64, (1 << bits) - 1
    zeros = torch.randint(0, maxq + 1, (2, out_f), generator=torch.Generator().manual_seed(bits))
    zeros[0, :8], zeros[1, :8] = 0, maxq
    ones = sum(1 << (bits * i) for i in range(32 // bits))
    v2 = to_int32_words(pack(zeros, bits)).to(torch.int64) & 0xFFFFFFFF
    v1 = ((v2 - ones) & 0xFFFFFFFF).to(torch.uint32).view(torch.int32)
    codes = torch.randint(0, maxq + 1, (out_f, in_f), generator=torch.Generator().manual_seed(0))
    tensors = {
        "qweight": to_int32_words(pack(codes, bits)).T.contiguous(),
        "qzeros": v1,
        "scales": torch.rand(2, out_f).half() + 0.01,
        "g_idx": torch.arange(in_f, dtype=torch.int32) // 32,
    }
    layer = gptq_layer(tensors, None, bits=bits, group_size=32, v1=True, symmetric=False)
    assert torch.equal(layer.zeros.long(), zeros.T)
    assert torch.equal(layer.codes().long(), codes)


def test_int32_words_leave_their_input_alone():
    words = torch.full((2, 4), -1, dtype=torch.int32)
    from_int32_words(words, 4, 31)  # 31 codes: the last byte is half used
    assert torch.equal(words, torch.full((2, 4), -1, dtype=torch.int32))


@pytest.mark.parametrize(("bits", "kind"), [(4, "Q4_1"), (5, "Q5_1")])
def test_gguf_q4_1_and_q5_1_blocks_of_exact_offsets(bits, kind):
    """An asymmetric g32 layer whose offsets -zero * scale are fp16 numbers goes into Q4_1/Q5_1 exactly."""
    import gguf

    from quantlm.formats.gguf import block_bytes, layer_from_blocks, why_not

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (8, 64), generator=g)
    scales = 2.0 ** -torch.randint(3, 8, (8, 2), generator=g).float()  # powers of two: -zero * scale is exact
    zeros = torch.randint(0, 1 << bits, (8, 2), generator=g)
    layer = QuantLinear.from_codes(codes, scales.half(), zeros, QuantSpec(bits=bits, group_size=32))
    assert why_not(layer) is None
    data, written = block_bytes(layer)
    assert written == kind
    got = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, kind))
    assert np.array_equal(got, layer.dequantize_weight().numpy())
    back = layer_from_blocks(data, kind, 8, 64)
    assert torch.equal(back.dequantize_weight(), layer.dequantize_weight())


def test_overwrite_replaces_only_quantlm_exports(gguf_checkpoints, tmp_path):
    """--overwrite replaces a GGUF quantlm wrote, never another tool's GGUF or the file being read."""
    import gguf

    theirs = tmp_path / "theirs.gguf"
    writer = gguf.GGUFWriter(str(theirs), "llama")
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    before = theirs.read_bytes()
    with pytest.raises(QuantlmError, match="not a GGUF file quantlm wrote"):
        export_checkpoint(gguf_checkpoints["Q4_0"], theirs, format="gguf", overwrite=True)
    assert theirs.read_bytes() == before
    ours = export_checkpoint(gguf_checkpoints["Q4_0"], tmp_path / "ours.gguf", format="gguf")
    assert export_checkpoint(gguf_checkpoints["Q8_0"], ours, format="gguf", overwrite=True) == ours
    with pytest.raises(QuantlmError, match="would replace the model it reads"):
        export_checkpoint(ours, ours, format="gguf", overwrite=True)


def test_sharded_checkpoints_read_back(checkpoints, tmp_path):
    """A GPTQ directory whose tensors are split over several safetensors files (as large models are) reads whole."""
    from safetensors.torch import save_file

    out = export_checkpoint(checkpoints["w4-g32-asym"], tmp_path / "gptq", format="gptq")
    tensors = load_file(str(out / "model.safetensors"))
    names = sorted(tensors)
    (out / "model.safetensors").unlink()
    save_file({n: tensors[n] for n in names[::2]}, str(out / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[1::2]}, str(out / "model-00002-of-00002.safetensors"))
    original = load_checkpoint(checkpoints["w4-g32-asym"])
    _same_layers(quantized_modules(original), quantized_modules(read_foreign(out)))
