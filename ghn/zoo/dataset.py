"""Architecture datasets: a sampler's draw, split into train and held-out specs, as JSON.

The file records how it was made (sampler, seed, resolved ranges, format
version), so it can be regenerated and checked. Held-out architectures are
distinct from every training architecture: they are the last
`round(heldout * distinct)` distinct specs of the draw (the draw's order is
random), and every copy of them is removed from train.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ghn.zoo.samplers import get_sampler
from ghn.zoo.spec import ArchSpec, SpecError, as_list, check, spec_from_json

VERSION = 1


def split_heldout(specs: list[ArchSpec], heldout: float) -> tuple[list[ArchSpec], list[ArchSpec]]:
    check(0.0 <= heldout < 1.0, f"heldout must be a fraction in [0, 1), got {heldout}")
    distinct = list(dict.fromkeys(specs))
    num_heldout = round(heldout * len(distinct))
    held = distinct[len(distinct) - num_heldout :]
    held_set = set(held)
    return [s for s in specs if s not in held_set], held


def write_dataset(
    path: str | os.PathLike,
    sampler: str,
    n: int,
    *,
    seed: int = 0,
    heldout: float = 0.1,
    **ranges: Any,
) -> dict[str, Any]:
    """Samples `n` architectures and writes them to `path`; returns what `load_dataset` would."""
    s = get_sampler(sampler)
    cfg = s.resolve(**ranges)
    train, held = split_heldout(s(n, seed=seed, **ranges), heldout)
    doc = {
        "sampler": sampler,
        "seed": seed,
        "ranges": {k: as_list(v) for k, v in cfg.items()},
        "version": VERSION,
        "train": [spec.to_json() for spec in train],
        "heldout": [spec.to_json() for spec in held],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so an interrupted write never leaves a truncated dataset.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_dumps(doc))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return {**doc, "train": train, "heldout": held}


def load_dataset(path: str | os.PathLike) -> dict[str, Any]:
    """The dataset at `path`, with "train" and "heldout" as lists of specs."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise SpecError(
            f"architecture dataset {path} does not exist; write one with "
            "`python -m ghn.zoo.make_dataset` or fix the path"
        ) from e
    except json.JSONDecodeError as e:
        raise SpecError(f"{path} is not a valid architecture dataset (bad JSON: {e})") from e
    check(
        isinstance(doc, dict) and {"train", "heldout", "version"} <= set(doc),
        f"{path} is not an architecture dataset (needs 'version', 'train', 'heldout')",
    )
    check(
        doc["version"] == VERSION,
        f"{path} has dataset format version {doc['version']}; this library reads {VERSION}",
    )
    return {
        **doc,
        "train": [spec_from_json(d) for d in doc["train"]],
        "heldout": [spec_from_json(d) for d in doc["heldout"]],
    }


def _dumps(doc: dict[str, Any]) -> str:
    """JSON with one architecture per line: readable, and diffs stay small."""
    lines = []
    for key, value in doc.items():
        if key in ("train", "heldout"):
            specs = ",\n    ".join(json.dumps(s, separators=(", ", ": ")) for s in value)
            body = f"[\n    {specs}\n  ]" if value else "[]"
        else:
            body = json.dumps(value)
        lines.append(f"  {json.dumps(key)}: {body}")
    return "{\n" + ",\n".join(lines) + "\n}\n"
