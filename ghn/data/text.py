"""Text datasets: Python's own help texts and source code (offline), WikiText-2/103 raw
files."""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

from ghn.data.dataset import DatasetNotFoundError, TextDataset, check_split, data_root, find_dir
from ghn.data.tokenizers import ByteTokenizer, get_tokenizer

PYDOC_VALIDATION_FRACTION = 0.1
PYTHON_SOURCE_VALIDATION_FRACTION = 0.1
# The standard library's top-level modules read for `python_source`, by sorted name.
PYTHON_SOURCE_MAX_FILES = 40

_WIKITEXT = {
    "wikitext2": ("WikiText-2", "wikitext-2-raw"),
    "wikitext103": ("WikiText-103", "wikitext-103-raw"),
}
_WIKITEXT_FILES = {
    "train": "wiki.train.raw",
    "validation": "wiki.valid.raw",
    "test": "wiki.test.raw",
}


def token_array(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """The smallest unsigned dtype that holds the ids (WikiText-103 as bytes is 0.5 GB)."""
    dtype = np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.int32
    return np.asarray(ids).astype(dtype, copy=False)


def tokenize(text: str, tokenizer) -> np.ndarray:
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(text.encode("utf-8"), np.uint8)
    return token_array(tokenizer.encode(text), tokenizer.vocab_size)


@functools.cache
def pydoc_corpus() -> tuple[str, str]:
    """(train, validation) text: pydoc_data.topics joined in sorted-key order, split at a line.

    Validation is the text from the first line break at or after 90% of the
    characters (about the last 10% of the bytes).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DatasetNotFoundError(
            "this Python has no pydoc_data.topics (some distributions package it separately, "
            "e.g. Debian's python3-doc / libpython3-stdlib); use another text dataset"
        ) from None
    text = "\n".join(topics[k] for k in sorted(topics))
    return _split_at_line(text, PYDOC_VALIDATION_FRACTION)


def _split_at_line(text: str, fraction: float) -> tuple[str, str]:
    """(train, validation): validation from the first line break at or after
    (1 - fraction) of the characters."""
    at = round((1 - fraction) * len(text))
    cut = (text.find("\n", at) + 1) or at
    return text[:cut], text[cut:]


@functools.cache
def python_source_corpus() -> tuple[str, str]:
    """(train, validation) text: the first `PYTHON_SOURCE_MAX_FILES` top-level modules of this
    Python's standard library (`*.py` by sorted name, ~1 MB here), joined, split at a line."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"))[:PYTHON_SOURCE_MAX_FILES]
    if not files:
        raise DatasetNotFoundError(
            f"no standard-library sources (*.py) in {lib}: this Python ships compiled modules "
            "only; use another text dataset"
        )
    text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    return _split_at_line(text, PYTHON_SOURCE_VALIDATION_FRACTION)


def python_source(
    split: str = "train", *, tokenizer: str = "byte", tokenizer_dir=None
) -> TextDataset:
    """Python code from this interpreter's standard library (offline): another byte corpus
    than `pydoc_text`'s English help texts, the offline check of what a GHN trained on
    those predicts for text it never saw. Its bytes follow the Python version."""
    check_split("python_source", split, ("train", "validation"))
    tok = get_tokenizer(tokenizer, tokenizer_dir)
    train, val = python_source_corpus()
    tokens = tokenize(train if split == "train" else val, tok)
    return TextDataset("python_source", split, tokens=tokens, tokenizer=tok)


def pydoc_text(split: str = "train", *, tokenizer: str = "byte", tokenizer_dir=None) -> TextDataset:
    """English help texts that ship with Python (~465k characters); always available offline."""
    check_split("pydoc_text", split, ("train", "validation"))
    tok = get_tokenizer(tokenizer, tokenizer_dir)
    train, val = pydoc_corpus()
    return TextDataset(
        "pydoc_text", split, tokens=tokenize(train if split == "train" else val, tok), tokenizer=tok
    )


def wikitext_dir(name: str, split: str, data_dir=None) -> Path:
    title, dirname = _WIKITEXT[name]
    root = data_root(data_dir)
    candidates = [root / dirname, root / f"{dirname}-v1" / dirname, root / f"{dirname}-v1", root]
    howto = (
        f"Download https://wikitext.smerity.com/{dirname}-v1.zip (or the Hugging Face "
        f"dataset Salesforce/wikitext, config {dirname}-v1) and unzip it into {root}."
    )
    return find_dir(candidates, [_WIKITEXT_FILES[split]], title, howto)


def _cached_encode(path: Path, tok, cache_dir) -> np.ndarray:
    if cache_dir is None:
        return tokenize(path.read_text(encoding="utf-8"), tok)
    st = path.stat()
    key = hashlib.sha256(
        f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{tok.fingerprint()}".encode()
    ).hexdigest()[:20]
    cache = Path(cache_dir).expanduser() / f"{path.stem}-{tok.name}-{key}.npy"
    if cache.is_file():
        return np.load(cache, allow_pickle=False)
    tokens = tokenize(path.read_text(encoding="utf-8"), tok)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, tokens, allow_pickle=False)
    os.replace(tmp, cache)
    return tokens


def wikitext(
    name: str,
    split: str = "train",
    *,
    data_dir=None,
    tokenizer: str = "byte",
    tokenizer_dir=None,
    cache_dir=None,
) -> TextDataset:
    """WikiText-2 or -103 raw text (`wiki.{train,valid,test}.raw`).

    Looks in `<data_dir>/wikitext-2-raw`, `<data_dir>/wikitext-2-raw-v1[/wikitext-2-raw]`,
    then `<data_dir>` itself. BPE encoding is pure Python (WikiText-103 takes
    many minutes), so `cache_dir` keeps the ids as .npy keyed by file and tokenizer.
    """
    check_split(name, split, tuple(_WIKITEXT_FILES))
    tok = get_tokenizer(tokenizer, tokenizer_dir)
    path = wikitext_dir(name, split, data_dir) / _WIKITEXT_FILES[split]
    if isinstance(tok, ByteTokenizer):
        tokens = np.fromfile(path, np.uint8)
    else:
        tokens = _cached_encode(path, tok, cache_dir)
    return TextDataset(name, split, tokens=tokens, tokenizer=tok)
