"""Model sources: aliases, directories, GGUF files, hub ids, and their errors."""

from __future__ import annotations

import pytest

from quantlm.errors import ModelSourceError
from quantlm.models.sources import ALIASES, resolve_model_dir
from quantlm.paths import quantlm_home


def test_directory_is_used_as_is(tiny_model_dir):
    assert resolve_model_dir(str(tiny_model_dir)) == tiny_model_dir


@pytest.mark.parametrize(
    "source,message",
    [
        ("no-such-alias", "unknown model 'no-such-alias'.*smollm2-135m"),
        ("./missing-dir", "model directory not found"),
        ("/tmp/missing/a/b", "model directory not found"),
        ("missing.gguf", "GGUF file not found"),
    ],
)
def test_bad_sources_give_one_clear_line(source, message):
    with pytest.raises(ModelSourceError, match=message) as info:
        resolve_model_dir(source)
    assert "\n" not in str(info.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model_dir(str(tmp_path))


def test_hub_id_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        resolve_model_dir("some-org/some-model")


def test_a_failed_gguf_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLM_HOME", str(tmp_path / "home"))  # its own cache: other tests convert GGUFs too
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(ModelSourceError, match="cannot read GGUF file"):
        resolve_model_dir(str(bad))
    models = quantlm_home() / "models"
    assert not models.exists() or not any(models.iterdir())


def test_default_alias_is_listed():
    assert "smollm2-135m" in ALIASES
