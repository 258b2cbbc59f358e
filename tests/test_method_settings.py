"""Settings as one frozen dataclass per method: the generic converter, the registry, the command line's options
read from it, the quantization record and old (format version 1) recipes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quantlm
from conftest import tiny_model
from quantlm.core import QuantSpec
from quantlm.errors import InvalidSpecError, QuantlmError
from quantlm.formats.record import QuantizationRecord, upgrade_v1_recipe
from quantlm.methods import (
    GPTQ,
    RTN,
    LLMInt8,
    SmoothQuant,
    head_step,
    parse_recipe,
    recipe_from_options,
    registered_methods,
)
from quantlm.methods.base import Method, cli_settings, register, setting
from quantlm.methods.qat import QATConfig
from quantlm.methods.recipe import add_head_step

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(registered_methods()))
def test_every_method_is_frozen_and_round_trips_through_plain_data(name):
    cls = registered_methods()[name]
    step = cls()
    config = step.to_config()
    assert config["method"] == name and json.loads(json.dumps(config)) == config
    assert cls.from_config(config) == step and parse_recipe([config]).steps == [step]
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.__setattr__(dataclasses.fields(step)[0].name, None)
    assert isinstance(step.describe(), str) and step.describe().startswith(name.split("-")[0])


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    group=st.sampled_from([-1, 16, 64, 128]),
    clip=st.sampled_from(["none", "mse"]),
    damp=st.floats(1e-4, 1.0),
    act_order=st.booleans(),
    exclude=st.lists(st.sampled_from(["*.o_proj", "down_proj", "model.layers.0.*"]), max_size=2, unique=True),
)
def test_gptq_and_rtn_settings_survive_plain_data(bits, symmetric, group, clip, damp, act_order, exclude):
    spec = QuantSpec(bits=bits, symmetric=symmetric, group_size=group, clip=clip)
    for step in (GPTQ(spec, damp=damp, act_order=act_order, exclude=tuple(exclude)), RTN(spec, exclude=tuple(exclude))):
        again = parse_recipe(json.loads(json.dumps(step.to_config()))).steps[0]
        assert again == step and again.to_config() == step.to_config()


def test_unknown_settings_are_refused_naming_the_allowed_ones():
    with pytest.raises(InvalidSpecError, match=r"gptq has no setting dampening: its settings are .*damp"):
        parse_recipe([{"method": "gptq", "dampening": 0.1}])
    with pytest.raises(InvalidSpecError, match=r"unknown method 'spqr': choose one of .*gptq, .*llm-int8"):
        parse_recipe([{"method": "spqr"}])


def test_values_of_the_wrong_kind_are_one_line_errors():
    with pytest.raises(InvalidSpecError, match="act_order is a switch: true or false, got 'false'"):
        parse_recipe([{"method": "gptq", "act_order": "false"}])
    with pytest.raises(InvalidSpecError, match="damp must be a number, got '0.01'"):
        parse_recipe([{"method": "gptq", "damp": "0.01"}])
    with pytest.raises(InvalidSpecError, match="block_size must be an integer, got 1.5"):
        parse_recipe([{"method": "gptq", "block_size": 1.5}])
    assert parse_recipe([{"method": "gptq", "block_size": 64.0, "damp": 1}]).steps[0].damp == 1.0
    with pytest.raises(InvalidSpecError, match="weight bits must be 2..8, or 16"):
        QATConfig.from_options(w_bits=0)


def test_a_missing_grid_key_takes_the_methods_default_grid():
    step = parse_recipe([{"method": "rtn", "bits": 3}]).steps[0]
    assert step.spec == QuantSpec(bits=3, group_size=64)  # RTN's default grid, only the bits changed
    per_channel = parse_recipe([{"method": "gptq", "group_size": -1}]).steps[0]
    assert per_channel.spec == QuantSpec(bits=4, group_size=-1, granularity="channel")
    assert parse_recipe([{"method": "smoothquant", "folds": "norm,up-down"}]).steps[0].folds == ("norm", "up-down")
    inferred = parse_recipe([{"method": "rtn", "granularity": None}]).steps[0]
    assert inferred.spec == QuantSpec(bits=4, group_size=64)  # null: infer it from the (default) group size


def test_the_command_line_options_are_the_registrys_settings():
    from quantlm.cli import _method_settings

    table = _method_settings()
    for name, cls in registered_methods().items():
        if not cls.pipeline:
            continue
        for f in dataclasses.fields(cls):
            if f.metadata.get("help"):
                assert any((cls, f.name) in entry.targets for entry in table.values()), (name, f.name)
    # one flag, two fields: --a-granularity sets RTN's activations and SmoothQuant's search
    assert {(c.name, t) for c, t in table["a_granularity"].targets} >= {
        ("rtn", "act_granularity"),
        ("smoothquant", "search_granularity"),
    }


def test_recipes_from_command_line_options():
    plain = recipe_from_options("gptq", {"bits": 3, "act_order": False})
    assert plain.steps == [GPTQ(QuantSpec(bits=3, group_size=64), act_order=False)]
    smooth = recipe_from_options("smoothquant", {"alpha": "auto", "a_granularity": "tensor"})
    assert smooth.steps == [
        SmoothQuant(alpha="auto", search_granularity="tensor"),
        RTN(QuantSpec(bits=8, symmetric=True), act_bits=8, act_granularity="tensor"),
    ]
    assert recipe_from_options("smoothquant", {"bits": 4}, weights="gptq").steps[1].spec.bits == 4
    assert recipe_from_options("llm-int8", {"threshold": 4.0}).steps == [LLMInt8(threshold=4.0)]
    with pytest.raises(InvalidSpecError, match=r"--act-order/--no-act-order does not apply to --method rtn"):
        recipe_from_options("rtn", {"act_order": False})
    with pytest.raises(InvalidSpecError, match="--weights applies to methods that do not quantize"):
        recipe_from_options("rtn", {}, weights="gptq")
    with pytest.raises(InvalidSpecError, match="already quantizes the output projection"):
        recipe_from_options("rtn", {"lm_head": True}, head_bits=8)
    with pytest.raises(InvalidSpecError, match="already quantizes the output projection"):
        add_head_step(recipe_from_options("gptq", {}, head_bits=4), 8)
    with pytest.raises(InvalidSpecError, match="rounded by more than one step"):
        parse_recipe([RTN(lm_head=True), head_step(8)])
    with pytest.raises(InvalidSpecError, match="--weights after smoothquant must be one of gptq, rtn, got llm-int8"):
        recipe_from_options("smoothquant", {}, weights="llm-int8")
    assert recipe_from_options("gptq", {}, head_bits=4).describe().endswith("rtn-head(w4 g64 asym)")


def test_a_new_method_needs_only_its_own_class():
    @register
    @dataclasses.dataclass(frozen=True)
    class Halve(Method):
        """A made-up method: a setting with help is a flag at once."""

        spec: QuantSpec = QuantSpec(bits=4, group_size=32)
        strength: float = setting(0.5, "How hard to halve.")

        name = "halve-test"

    from quantlm.methods import base

    try:
        assert "halve-test" in registered_methods()
        entry = cli_settings([Halve])["strength"]
        assert entry.flag == "--strength" and entry.kind is float
        recipe = recipe_from_options("halve-test", {"strength": 2, "bits": 3})
        assert recipe.steps == [Halve(QuantSpec(bits=3, group_size=32), strength=2.0)]
        assert parse_recipe(recipe.to_config()).steps == recipe.steps
    finally:
        base._REGISTRY.pop("halve-test")


def test_qat_settings_use_the_weight_grid_vocabulary_and_read_back():
    config = QATConfig.from_bits("4-8-4", group_size=32, learnable_clip=True)
    assert config.weight == QuantSpec(bits=4, symmetric=True, group_size=32) and str(config.bits) == "4-8-4"
    assert parse_recipe([config.to_config()]).steps == [config]
    assert QATConfig.from_bits("16-8-16").weight is None and QATConfig.from_bits("16-8-16").kv_config is None
    with pytest.raises(QuantlmError, match="trains the whole model"):
        quantlm.quantize(tiny_model("llama"), [config.to_config()], progress=False)
    with pytest.raises(InvalidSpecError, match="cannot be combined"):
        parse_recipe([config, RTN()])


def test_format_version_1_recipes_are_upgraded():
    spec = QuantSpec(bits=4, group_size=64).to_dict()
    calibration = {"source": "enwiki", "split": "calibration", "n_samples": 4, "seqlen": 64, "seed": 0}
    v1 = [
        {"method": "gptq", **spec, "damp": 0.01, "exclude": [], "calibration": calibration},
        {
            "method": "rtn",
            **QuantSpec(bits=8, symmetric=True).to_dict(),
            "lm_head": True,
            "blocks": False,
            "exclude": [],
            "calibration": calibration,
        },
    ]
    recipe, calib, training = upgrade_v1_recipe(v1)
    assert calib == calibration and training is None
    assert [s.name for s in parse_recipe(recipe).steps] == ["gptq", "rtn-head"]
    qat_v1 = {
        "method": "qat",
        "bits": "4-8-4",
        "weight": QuantSpec(bits=4, symmetric=True).to_dict(),
        "act": {"bits": 8, "symmetric": True, "granularity": "token"},
        "kv": {"bits": 4, "symmetric": True},
        "learnable_clip": False,
        "exclude": [],
        "init": None,
        "training": {"steps": 3},
    }
    recipe, _, training = upgrade_v1_recipe([qat_v1])
    assert parse_recipe(recipe).steps == [QATConfig.from_bits("4-8-4")] and training == {"steps": 3, "init": None}


def test_the_record_stores_the_calibration_once(tmp_path, text_file):
    from conftest import byte_tokenizer

    model = tiny_model("llama")
    calib = quantlm.Calibration(source=str(text_file), n_samples=2, seqlen=32)
    quantlm.quantize(
        model,
        [{"method": "gptq", "group_size": 16}, {"method": "rtn-head"}],
        calib,
        tokenizer=byte_tokenizer(),
        progress=False,
    )
    record = model.quantlm_record
    assert isinstance(record, QuantizationRecord) and record.calibration["n_samples"] == 2 and record.seconds > 0
    quantlm.save(model, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 2 and qc["calibration"] == record.calibration
    assert all("calibration" not in step for step in qc["recipe"])
    loaded = quantlm.load(tmp_path / "q").quantlm_record
    assert loaded.recipe == record.recipe and loaded.log == record.log and loaded.calibration == record.calibration
    assert parse_recipe(loaded.recipe).to_config() == record.recipe


def test_save_writes_the_kv_cache_setting_the_model_runs_with(tmp_path):
    from quantlm.nn.kv_cache import KVQuantConfig, enable_kv_quantization

    model = quantlm.quantize(tiny_model("llama"), [{"method": "rtn", "group_size": 16}], progress=False)
    enable_kv_quantization(model, KVQuantConfig(8))
    quantlm.save(model, tmp_path / "kv8")
    assert quantlm.load(tmp_path / "kv8").quantlm_record.kv_cache == KVQuantConfig(8)
    loaded = quantlm.load(tmp_path / "kv8")
    enable_kv_quantization(loaded, None)
    quantlm.save(loaded, tmp_path / "float-kv")
    assert quantlm.load(tmp_path / "float-kv").quantlm_record.kv_cache is None


def test_docs_methods_md_is_the_registrys_catalog():
    from quantlm.methods.catalog import catalog_markdown

    assert (ROOT / "docs" / "methods.md").read_text() == catalog_markdown() + "\n", (
        "docs/methods.md is out of date: run quantlm methods --markdown > docs/methods.md"
    )
