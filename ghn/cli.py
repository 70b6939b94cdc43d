"""Command line: `python -m ghn {trace,predict} ...`.

python -m ghn trace vit-s --set image_size=32 --draw vit-s.png
python -m ghn trace archs.json:heldout:0 --summary
python -m ghn trace vit-ti:depth=4;patch_size=7
python -m ghn predict gpt2-large --out predicted/
python -m ghn export runs/vit_mnist my_ghn/ --step 400

A problem with the input (a name, a file, a value) prints one `error:` line and
exits with status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import sys
import time

from ghn.errors import ConfigError, exit_on_user_error

ARCH_HELP = "preset[:field=value;...], spec JSON file, or dataset.json:split:index"


def load_spec(name: str, overrides: list[str]):
    """The one architecture `name` stands for (`ghn.zoo.parse_arch` syntax), with
    `--set field=value` overrides."""
    from ghn import zoo

    specs = zoo.parse_arch(name)
    if len(specs) != 1:
        raise ConfigError(
            f"{name!r} names {len(specs)} architectures; pick one with FILE.json:split:index"
        )
    return specs[0].replace(**zoo.parse_overrides(overrides)) if overrides else specs[0]


def cmd_trace(args) -> None:
    from flax import nnx

    import ghn

    spec = load_spec(args.arch, args.set)
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


def cmd_predict(args) -> None:
    import jax
    import numpy as np
    import psutil
    from flax import nnx

    import ghn
    from ghn.hypernet.predict import prepare
    from ghn.params import count_params

    spec = load_spec(args.arch, args.set)
    start = time.perf_counter()
    if args.ghn:
        hyper = ghn.load(args.ghn)
        config = hyper.config
        what = f"trained: {args.ghn}"
    else:
        config = ghn.GHNConfig.named(args.config)
        hyper = ghn.GHN(config, rngs=nnx.Rngs(args.seed))
        what = f"{args.config}, untrained, seed {args.seed}"
    print(
        f"GHN ({what}, {count_params(hyper):,} params) ready in {time.perf_counter() - start:.1f}s"
    )
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    x = spec.input_spec(batch_size=1)
    start = time.perf_counter()
    graph = prepare(model, (x,), config).graph
    print(
        f"{spec.name}: {spec.num_params():,} params, {graph.num_nodes} nodes, traced in "
        f"{time.perf_counter() - start:.2f}s"
    )
    for label in ("first call (compiles)", "second call"):
        start = time.perf_counter()
        params = jax.block_until_ready(hyper.predict(model, x))
        print(f"predict, {label}: {time.perf_counter() - start:.2f}s")
        if label.startswith("first"):
            whole = time.time() - psutil.Process().create_time()
            print(f"whole process, from its start to every parameter predicted: {whole:.1f}s")
    by_role: dict[str, list] = {}
    for info, value in zip(graph.params.values(), jax.tree.leaves(params)):
        by_role.setdefault(info.role, []).append(np.asarray(value[(slice(0, 256),) * value.ndim]))
    print(f"{'role':<14}{'count':>6}{'mean':>10}{'std':>10}")
    for role, values in sorted(by_role.items()):
        flat = np.concatenate([v.ravel() for v in values])
        print(f"{role:<14}{len(values):>6}{flat.mean():>10.4f}{flat.std():>10.4f}")


def cmd_list(args) -> None:
    from ghn import hub

    for name, record in hub.available().items():
        meta = record.get("metadata", {})
        print(f"{name}: {meta.get('description', '')}")
        for key in ("command", "train_time", "hardware"):
            if key in meta:
                print(f"    {key}: {meta[key]}")


def cmd_export(args) -> None:
    from ghn import hub

    bad = [kv for kv in args.set if "=" not in kv]
    if bad:
        raise ConfigError(f"--set expects KEY=VALUE, got {bad[0]!r}")
    metadata = dict(kv.split("=", 1) for kv in args.set)
    out = hub.export(
        args.workdir, args.directory, step=args.step, storage_dtype=args.dtype, **metadata
    )
    print(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ghn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("trace", help="trace an architecture's graph, print and draw it")
    p.add_argument(
        "arch", help="preset[:field=value;...], spec JSON file, or dataset.json:split:index"
    )
    p.add_argument("--set", action="append", default=[], help="spec override key=value")
    p.add_argument("--draw", help="write the graph to this .png/.svg")
    p.add_argument("--save", help="write the graph arrays to this .npz")
    p.add_argument("--summary", action="store_true", help="print every node")
    p.set_defaults(fn=cmd_trace)
    p = sub.add_parser("predict", help="predict all parameters of an architecture, with timings")
    p.add_argument(
        "arch", help="preset[:field=value;...], spec JSON file, or dataset.json:split:index"
    )
    p.add_argument("--set", action="append", default=[], help="spec override key=value")
    p.add_argument("--config", default="tiny", help="GHN size: tiny, small, base, large")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ghn", help="a trained GHN (shipped name, export or workdir) instead")
    p.set_defaults(fn=cmd_predict)
    p = sub.add_parser("list", help="the trained GHNs shipped with the package")
    p.set_defaults(fn=cmd_list)
    p = sub.add_parser("export", help="a train.py workdir's GHN -> a directory ghn.load reads")
    p.add_argument("workdir")
    p.add_argument("directory")
    p.add_argument("--step", type=int, help="the checkpoint to export (default: the latest)")
    p.add_argument(
        "--dtype",
        default="float32",
        help="how the parameters are stored: float32, or float16 (half the size; loading "
        "casts back; ghn.hub.STORAGE_DTYPES)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="metadata to record in ghn.json",
    )
    p.set_defaults(fn=cmd_export)
    args = parser.parse_args(argv)
    with exit_on_user_error():
        args.fn(args)


if __name__ == "__main__":
    main(sys.argv[1:])
