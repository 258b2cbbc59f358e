"""QuantSpec: validation, inference of granularity, (de)serialization, labels."""

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlm.core import QuantSpec
from quantlm.errors import InvalidSpecError, QuantlmError


@st.composite
def valid_specs(draw):
    bits = draw(st.integers(2, 8))
    gran = draw(st.sampled_from(["tensor", "channel", "group", "token", None]))
    if gran == "group":
        gs = draw(st.integers(1, 4096))
    elif gran is None:
        gs = draw(st.sampled_from([-1, 32, 64, 128]))
    else:
        gs = -1
    return QuantSpec(
        bits=bits,
        symmetric=draw(st.booleans()),
        group_size=gs,
        granularity=gran,
        clip=draw(st.sampled_from(["none", "mse"])),
    )


def test_defaults():
    s = QuantSpec()
    assert (s.bits, s.symmetric, s.group_size, s.granularity, s.clip) == (4, False, -1, "channel", "none")
    assert s.maxq == 15


def test_granularity_inferred_from_group_size():
    assert QuantSpec(group_size=128).granularity == "group"
    assert QuantSpec(group_size=-1).granularity == "channel"
    assert QuantSpec(group_size=64) == QuantSpec(group_size=64, granularity="group")
    assert hash(QuantSpec(group_size=64)) == hash(QuantSpec(group_size=64, granularity="group"))


@pytest.mark.parametrize("bits, maxq", [(2, 3), (3, 7), (4, 15), (5, 31), (6, 63), (7, 127), (8, 255)])
def test_maxq(bits, maxq):
    assert QuantSpec(bits=bits).maxq == maxq


def test_frozen():
    s = QuantSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.bits = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(bits=9), r"^bits must be between 2 and 8, got 9$"),
        (dict(bits=1), r"^bits must be between 2 and 8, got 1$"),
        (dict(bits=0), r"bits must be between 2 and 8, got 0"),
        (dict(bits="4"), r"bits must be an integer between 2 and 8, got '4'"),
        (dict(bits=4.0), r"bits must be an integer between 2 and 8, got 4.0"),
        (dict(bits=True), r"bits must be an integer"),
        (dict(group_size=0), r"group_size must be -1 .* got 0"),
        (dict(group_size=-2), r"group_size must be -1 .* got -2"),
        (dict(group_size=1.5), r"group_size must be -1 .* got 1.5"),
        (dict(granularity="group"), r"granularity 'group' needs group_size > 0.*got group_size=-1"),
        (dict(granularity="channel", group_size=64), r"granularity 'channel' does not use groups: set group_size=-1"),
        (dict(granularity="tensor", group_size=64), r"granularity 'tensor' does not use groups"),
        (dict(granularity="token", group_size=32), r"granularity 'token' does not use groups"),
        (dict(granularity="row"), r"granularity must be one of tensor, channel, group, token.*got 'row'"),
        (dict(clip="max"), r"clip must be one of none, mse, fit, stats, got 'max'"),
        (dict(clip=None), r"clip must be one of none, mse, fit, stats, got None"),
        (dict(symmetric="yes"), r"symmetric must be True or False, got 'yes'"),
    ],
)
def test_validation_messages(kwargs, pattern):
    with pytest.raises(InvalidSpecError, match=pattern) as info:
        QuantSpec(**kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, QuantlmError)


@given(valid_specs())
@settings(max_examples=80, deadline=None)
def test_dict_round_trip_through_json(spec):
    d = spec.to_dict()
    assert set(d) == {"bits", "symmetric", "group_size", "granularity", "clip"}
    again = QuantSpec.from_dict(json.loads(json.dumps(d)))
    assert again == spec
    assert again.to_dict() == d
    assert d["granularity"] in ("tensor", "channel", "group", "token")


def test_from_dict_defaults_and_errors():
    assert QuantSpec.from_dict({"bits": 3}) == QuantSpec(bits=3)
    assert QuantSpec.from_dict({"bits": 3, "group_size": 32}).granularity == "group"
    with pytest.raises(InvalidSpecError, match="unknown quantization spec key.*groupsize"):
        QuantSpec.from_dict({"bits": 3, "groupsize": 32})
    with pytest.raises(InvalidSpecError, match="must be a dict"):
        QuantSpec.from_dict([("bits", 3)])  # type: ignore[arg-type]
    with pytest.raises(InvalidSpecError, match="bits must be between 2 and 8, got 12"):
        QuantSpec.from_dict({"bits": 12})


@pytest.mark.parametrize(
    "spec, text",
    [
        (QuantSpec(bits=4, group_size=64), "w4 g64 asym"),
        (QuantSpec(bits=8, symmetric=True), "w8 per-channel sym"),
        (QuantSpec(bits=8, symmetric=True, granularity="tensor"), "w8 per-tensor sym"),
        (QuantSpec(bits=8, granularity="token"), "w8 per-token asym"),
        (QuantSpec(bits=3, symmetric=True, group_size=128, clip="mse"), "w3 g128 sym mse"),
        (QuantSpec(bits=2, clip="mse"), "w2 per-channel asym mse"),
    ],
)
def test_describe(spec, text):
    assert spec.describe() == text


def test_qparams_shape():
    assert QuantSpec(group_size=4).qparams_shape(3, 10) == (3, 3)
    assert QuantSpec(group_size=5).qparams_shape(3, 10) == (3, 2)
    assert QuantSpec(group_size=64).qparams_shape(2, 10) == (2, 1)
    assert QuantSpec().qparams_shape(3, 10) == (3, 1)
    assert QuantSpec(granularity="token").qparams_shape(7, 10) == (7, 1)
    assert QuantSpec(granularity="tensor").qparams_shape(3, 10) == (1, 1)
