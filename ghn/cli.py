"""Command line: `python -m ghn {trace,predict} ...`.

python -m ghn trace vit-s --set image_size=32 --draw vit-s.png
python -m ghn trace archs.json:heldout:0 --summary
python -m ghn predict gpt2-large --out predicted/
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got '{item}'")
        key, value = item.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def load_spec(name: str, overrides: dict):
    """A preset name, a spec JSON file, or `dataset.json:split:index`."""
    from ghn import zoo

    if name.endswith(".json") or ".json:" in name:
        path, *where = name.split(":")
        data = json.loads(Path(path).read_text())
        if "family" in data:
            spec = zoo.spec_from_json(data)
        else:
            split = where[0] if where else "train"
            index = int(where[1]) if len(where) > 1 else 0
            spec = zoo.spec_from_json(data[split][index])
        if overrides:
            import dataclasses

            spec = dataclasses.replace(spec, **overrides)
        return spec
    return zoo.get(name, **overrides)


def cmd_trace(args) -> None:
    from flax import nnx

    import ghn

    spec = load_spec(args.arch, _parse_overrides(args.set))
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    start = time.perf_counter()
    graph = ghn.trace(model, spec.input_spec(batch_size=1), name=spec.name)
    seconds = time.perf_counter() - start
    print(f"{graph!r} traced in {seconds:.2f}s")
    print("ops:", ", ".join(f"{k}={v}" for k, v in graph.op_counts().items()))
    if args.summary:
        print(graph.summary(max_rows=None))
    if args.draw:
        print("wrote", graph.draw(args.draw))
    if args.save:
        graph.save(args.save)
        print("wrote", args.save)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ghn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("trace", help="trace an architecture's graph, print and draw it")
    p.add_argument("arch", help="preset name, spec JSON file, or dataset.json:split:index")
    p.add_argument("--set", action="append", default=[], help="spec override key=value")
    p.add_argument("--draw", help="write the graph to this .png/.svg")
    p.add_argument("--save", help="write the graph arrays to this .npz")
    p.add_argument("--summary", action="store_true", help="print every node")
    p.set_defaults(fn=cmd_trace)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main(sys.argv[1:])
