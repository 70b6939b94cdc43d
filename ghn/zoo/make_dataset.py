"""Writes an architecture dataset.

    python -m ghn.zoo.make_dataset vits-1k --n 1000 --seed 0 --out archs.json
    python -m ghn.zoo.make_dataset cnns-1k --n 200 --out mnist_cnns.json \\
        --set image_size=28 --set in_channels=1 --set width=[8,32]

`--set KEY=VALUE` sets a sampler range or a pass-through spec field; VALUE is
parsed as JSON when it can be (`28`, `[2,4]`, `false`), else taken as a string.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ghn.zoo.dataset import write_dataset
from ghn.zoo.samplers import SAMPLERS


def _parse_set(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _millions(n: int) -> str:
    return f"{n / 1e6:.3g}M"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ghn.zoo.make_dataset", description=__doc__)
    parser.add_argument("sampler", choices=list(SAMPLERS))
    parser.add_argument("--n", type=int, default=1000, help="architectures to draw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--heldout", type=float, default=0.1, help="fraction held out")
    parser.add_argument("--set", type=_parse_set, action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        doc = write_dataset(
            args.out, args.sampler, args.n, seed=args.seed, heldout=args.heldout, **dict(args.set)
        )
    except ValueError as e:
        parser.error(str(e))
    distinct = set(doc["train"]) | set(doc["heldout"])
    counts = sorted(spec.closed_form_num_params() for spec in distinct)
    span = f"{_millions(counts[0])}-{_millions(counts[-1])}" if counts else "-"
    print(
        f"{args.out}: {args.sampler} seed={args.seed}: {len(doc['train'])} train, "
        f"{len(doc['heldout'])} heldout, {len(distinct)} distinct; params {span}"
    )


if __name__ == "__main__":
    main()
