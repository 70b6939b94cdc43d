"""One architecture's training program: per-architecture against bucketed, warm.

Where `train_throughput.py` measures whole runs (compiling, host preparation,
padding over a pool), this isolates the cost of the bucketed machinery itself:
for each architecture, a meta-batch of m copies of it runs through its own
per-architecture program (m calls) and through the bucketed program of the
smallest bucket holding it (one call, no padding), on the same GHN, data batch
and config. Prints JSON lines: median seconds per meta-batch over `--repeats`
warm calls, their ratio, and the bucketed program's first call (compile included,
persistent cache empty); then the same medians for the GHN's prediction alone
(forward and backward of the predicted parameters' sum of squares), which splits
each step into prediction and target forward.

    python benchmarks/bucketed_step.py --config gpt2_text --archs d7-w240-h2,d4-w88-h1 --m 2
    python benchmarks/bucketed_step.py --config vit_mnist --archs d3-w48-h2,d6-w96-h4
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _config(name: str):
    import ml_collections

    spec = importlib.util.spec_from_file_location("config", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.archs.stream = False
    config.archs.bucketed = True
    config.eval.enabled = False
    config.eval.larger = ml_collections.ConfigDict()
    config.checkpoint.enabled = False
    config.progress_bar = False
    config.tensorboard = False
    config.compilation_cache_dir = tempfile.mkdtemp()
    return config


def _median_s(fn, repeats: int) -> float:
    import jax
    import numpy as np

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vit_mnist", choices=("vit_mnist", "gpt2_text"))
    parser.add_argument(
        "--archs", required=True, help="comma-separated dD-wW-hH (depth, width, heads)"
    )
    parser.add_argument("--m", type=int, default=2, help="architectures per meta-batch")
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from common import emit, machine
    from flax import nnx

    from ghn.hypernet import bucketed as hb
    from ghn.train import Trainer, step

    emit({"bench": "bucketed_step", "machine": machine(), "config": args.config})
    trainer = Trainer(_config(args.config), tempfile.mkdtemp())
    programs = trainer.programs
    batch = programs.global_batch(next(trainer.train_it))
    params = trainer.state["params"]
    m = args.m
    for name in args.archs.split(","):
        match = re.fullmatch(r"d(\d+)-w(\d+)-h(\d+)", name)
        if match is None:
            raise SystemExit(f"--archs: {name!r} is not dD-wW-hH")
        d, w, h = map(int, match.groups())
        spec = dataclasses.replace(trainer.pools.train[0], depth=d, width=w, num_heads=h)
        spec.validate()
        plan = programs.bucket_plan([spec])
        share, whole = programs.weight(m), programs.weight(m, m)

        def per_arch(spec=spec, share=share):
            acc = programs.zeros()
            for _ in range(m):
                acc = programs.accumulate(spec, params, acc, batch, share)
            return acc

        def bucketed(spec=spec, plan=plan, whole=whole):
            acc = programs.zeros()
            return programs.accumulate_bucket(plan, [spec] * m, params, acc, batch, whole)

        t = time.perf_counter()
        jax.block_until_ready(bucketed())
        first = time.perf_counter() - t
        per, buck = _median_s(per_arch, args.repeats), _median_s(bucketed, args.repeats)

        arch, inputs = programs.arch(spec), programs.bucket_inputs(plan, [spec] * m)

        def sum_sq(leaves):
            return sum(jnp.sum(x * x) for x in jax.tree.leaves(leaves))

        def per_arch_predict(p, arch=arch):
            return sum_sq(step.predict(programs.ghn_graphdef, p, arch.graph, arch.target))

        def bucketed_predict(p, plan=plan, inputs=inputs):
            ghn = nnx.merge(programs.ghn_graphdef, p)
            return sum_sq(jax.vmap(lambda i: hb.predict_padded(ghn, plan, i))(inputs))

        per_pred = jax.jit(jax.value_and_grad(per_arch_predict))
        buck_pred = jax.jit(jax.value_and_grad(bucketed_predict))
        per_pred_s = m * _median_s(functools.partial(per_pred, params), args.repeats)
        buck_pred_s = _median_s(functools.partial(buck_pred, params), args.repeats)
        emit(
            {
                "bench": "bucketed_step",
                "arch": spec.name,
                "m": m,
                "per_arch_s": round(per, 4),
                "bucketed_s": round(buck, 4),
                "bucketed_over_per_arch": round(per / buck, 3),
                "bucketed_first_s": round(first, 2),
                "per_arch_predict_s": round(per_pred_s, 4),
                "bucketed_predict_s": round(buck_pred_s, 4),
            }
        )
    trainer.close()


if __name__ == "__main__":
    main()
