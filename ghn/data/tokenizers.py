"""Tokenizers: UTF-8 bytes (always available) and GPT-2 byte-level BPE from local files."""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import numpy as np

from ghn.data.dataset import DatasetNotFoundError

# GPT-2's pre-tokenizer (openai/gpt-2 src/encoder.py). It needs Unicode classes
# (\p{L}, \p{N}) that only the third-party `regex` module has.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Fallback for the stdlib `re`: letters are [^\W\d_] and numbers are \d. It is
# exact on ASCII text; elsewhere it differs where Unicode's L/N classes differ
# from \w (combining marks, non-decimal numerals such as "½").
GPT2_PATTERN_STDLIB = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
)

GPT2_FILES = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
GPT2_HOWTO = (
    "Copy GPT-2's vocab.json and merges.txt (Hugging Face 'gpt2' repository) or encoder.json "
    "and vocab.bpe (https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/) into "
    "that directory, or use tokenizer='byte'."
)


class ByteTokenizer:
    """Token ids are the text's UTF-8 bytes."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte"


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 maps each byte to a printable character so BPE never sees
    # whitespace or control bytes; the table is part of the vocabulary format.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def gpt2_pattern() -> re.Pattern:
    """GPT-2's pre-tokenizer: exact with `regex`, the documented approximation without."""
    try:
        import regex
    except ImportError:
        return re.compile(GPT2_PATTERN_STDLIB)
    return regex.compile(GPT2_PATTERN)


class GPT2Tokenizer:
    """GPT-2 byte-level BPE read from a local vocabulary and merges file."""

    name = "gpt2"

    def __init__(self, vocab_path: str | os.PathLike, merges_path: str | os.PathLike):
        self.vocab_path, self.merges_path = Path(vocab_path), Path(merges_path)
        self.encoder: dict[str, int] = json.loads(self.vocab_path.read_text(encoding="utf-8"))
        self.decoder = {i: t for t, i in self.encoder.items()}
        lines = self.merges_path.read_text(encoding="utf-8").splitlines()
        pairs = [tuple(ln.split()) for ln in lines if ln.strip() and not ln.startswith("#version")]
        bad = [p for p in pairs if len(p) != 2]
        if bad:
            raise ValueError(f"{self.merges_path}: malformed merge line {' '.join(bad[0])!r}")
        self.ranks = {p: i for i, p in enumerate(pairs)}
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.pattern = gpt2_pattern()
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> GPT2Tokenizer:
        d = Path(directory).expanduser()
        for vocab, merges in GPT2_FILES:
            if (d / vocab).is_file() and (d / merges).is_file():
                return cls(d / vocab, d / merges)
        names = " or ".join(f"{v} + {m}" for v, m in GPT2_FILES)
        raise DatasetNotFoundError(
            f"GPT-2 tokenizer files ({names}) not found in {d}. {GPT2_HOWTO}"
        )

    @property
    def vocab_size(self) -> int:
        return max(self.decoder) + 1

    @property
    def eot_id(self) -> int | None:
        return self.encoder.get("<|endoftext|>")

    def _bpe(self, word: str) -> tuple[int, ...]:
        if word in self._cache:
            return self._cache[word]
        parts = list(word)
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        try:
            ids = tuple(self.encoder[p] for p in parts)
        except KeyError as e:
            raise ValueError(
                f"BPE piece {e.args[0]!r} is not in {self.vocab_path}: the vocabulary and "
                f"{self.merges_path} do not belong together"
            ) from None
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> np.ndarray:
        ids: list[int] = []
        enc = self.byte_encoder
        for m in self.pattern.finditer(text):
            ids.extend(self._bpe("".join(enc[b] for b in m.group().encode("utf-8"))))
        return np.asarray(ids, np.int32)

    def decode(self, ids) -> str:
        text = "".join(self.decoder[int(i)] for i in np.asarray(ids).reshape(-1))
        return bytes(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256(self.vocab_path.read_bytes())
        h.update(self.merges_path.read_bytes())
        h.update(self.pattern.pattern.encode())
        return "gpt2-" + h.hexdigest()[:16]


def get_tokenizer(name: str = "byte", tokenizer_dir: str | os.PathLike | None = None):
    """`"byte"`, or `"gpt2"` read from `tokenizer_dir` (vocab.json + merges.txt)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        if tokenizer_dir is None:
            raise DatasetNotFoundError(
                f"tokenizer='gpt2' needs tokenizer_dir=<directory with vocab.json and merges.txt>. "
                f"{GPT2_HOWTO}"
            )
        return GPT2Tokenizer.from_dir(tokenizer_dir)
    raise ValueError(f"unknown tokenizer {name!r}; choose 'byte' or 'gpt2'")
