"""Architectures named on a command line: one syntax for `eval.py` and `python -m ghn`.

    vit-ti                         a preset (`ghn.zoo.presets()`)
    vit-ti:patch_size=7;depth=6    a preset with spec fields changed
    spec.json                      a spec (`spec.to_json()`) or a JSON list of specs
    archs.json                     an architecture dataset: its "heldout" split
    archs.json:train               one split of it
    archs.json:train:3             one architecture of a split

`parse_archs` takes several, comma-separated; callers may add named groups
(eval.py's `heldout` and `larger`). Values are JSON or Python literals
(`depth=6`, `tied=false`, `tied=False`, `mlp_ratios=[4,2]`), anything else a
string; a wrong value is the spec's own clear error.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ghn.zoo.dataset import load_dataset
from ghn.zoo.presets import get, presets
from ghn.zoo.spec import ArchSpec, SpecError, spec_from_json


def parse_value(text: str) -> Any:
    """A JSON or Python literal (`6`, `true`, `False`, `[4, 2]`, `"x"`), else the string."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            pass
    return text


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`["depth=6", "width=192"]` -> `{"depth": 6, "width": 192}`."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"expected field=value (e.g. depth=6), got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def _from_file(item: str) -> list[ArchSpec]:
    path, *where = item.split(":")
    if len(where) > 2:
        raise SpecError(f"{item!r}: expected FILE.json[:split[:index]]")
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise SpecError(
            f"architecture file {path} does not exist; give an existing .json file (a spec, a "
            "list of specs or an architecture dataset) or a preset name (ghn.zoo.presets(): "
            f"{', '.join(presets())})"
        ) from e
    except json.JSONDecodeError as e:
        raise SpecError(f"architecture file {path} is not valid JSON ({e})") from e
    if isinstance(doc, dict) and "family" in doc:
        if where:
            raise SpecError(f"{path} holds one spec; it has no splits: drop them from {item!r}")
        return [spec_from_json(doc)]
    if isinstance(doc, list):
        specs = [spec_from_json(d) for d in doc]
        split = "list"
    elif isinstance(doc, dict) and "heldout" in doc:
        split = where[0] if where else "heldout"
        if split not in ("train", "heldout"):
            raise SpecError(f"{item!r}: an architecture dataset has splits 'train' and 'heldout'")
        specs = list(load_dataset(path)[split])
    else:
        raise SpecError(f"{path} is neither a spec, a list of specs, nor an architecture dataset")
    if len(where) == (2 if isinstance(doc, dict) else 1):
        index = where[-1]
        if not index.lstrip("-").isdigit() or not -len(specs) <= int(index) < len(specs):
            raise SpecError(f"{item!r}: index {index!r} is not in 0..{len(specs) - 1} ({split})")
        return [specs[int(index)]]
    return specs


def split_names(text: str) -> list[str]:
    """Splits at commas outside brackets, so `vit-ti:mlp_ratios=[4,2]` stays one name."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "(": 1, "]": -1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return [t.strip() for t in out if t.strip()]


def parse_arch(item: str) -> list[ArchSpec]:
    """The architectures one name stands for (a list: a file may hold several)."""
    item = item.strip()
    if item.endswith(".json") or ".json:" in item:
        return _from_file(item)
    name, _, changes = item.partition(":")
    return [get(name, **parse_overrides(c for c in changes.split(";") if c.strip()))]


def parse_archs(
    text: str, groups: Mapping[str, Callable[[], Sequence[ArchSpec]]] | None = None
) -> list[ArchSpec]:
    """Comma-separated names -> specs, in order. `groups` maps extra names to a
    function giving their specs (called only when named)."""
    groups = groups or {}
    specs: list[ArchSpec] = []
    for item in split_names(text):
        if item in groups:
            specs += list(groups[item]())
        else:
            specs += parse_arch(item)
    if not specs:
        raise SpecError(f"{text!r} names no architectures; give at least one (e.g. vit-ti)")
    return specs
