"""The bucketed meta-step against the per-architecture one, in float64 (run as a script).

In float32 the two programs' meta-gradients differ by ~1e-4 of their norm at
trainer scale, although their losses agree to round-off: the GHN's decoder is
ReLU MLPs, and round-off flips the ReLUs that sit at ~0, each flip moving the
gradient by a whole unit's contribution. That is far above a round-off
tolerance, so float32 cannot tell it from a wrong mask or layout. In float64
nothing flips and the two must agree to float64 round-off, except where both
programs still compute in float32 (flax's embedding lookups: the GHN's
embedding tables get their gradients from float32 scatter-adds, ~1e-7 of
their norm).

Float64 is reached by switching on x64 and pointing the `float32` names that
the library casts to at run time at float64; the per-architecture plan's
output dtypes too. Only for this process: the test runs it in a subprocess.

    python tests/float64_gap.py [64|32] [smooth]     # prints one JSON line

`smooth` replaces the decoder's ReLUs by softplus (a smooth function, for the
ReLU-flip explanation above: in float32 the gap then falls to round-off size).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import jax

X64 = (sys.argv[1] if len(sys.argv) > 1 else "64") == "64"
SMOOTH = "smooth" in sys.argv[2:]
jax.config.update("jax_enable_x64", X64)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from test_train_common import tiny_config  # noqa: E402

import ghn  # noqa: E402
from ghn.hypernet import bucketed as hb  # noqa: E402
from ghn.hypernet.predict import prepare  # noqa: E402
from ghn.tasks import Task  # noqa: E402
from ghn.train import step  # noqa: E402
from ghn.train.config import ghn_config  # noqa: E402
from ghn.zoo import bucketed as zb  # noqa: E402
from ghn.zoo.pools import pools_of  # noqa: E402


def main() -> dict:
    if SMOOTH:  # the GHN's only ReLUs are the decoder's (the ViTs use GELU)
        jax.nn.relu = jax.nn.softplus
    # The trainer's setting (tests/test_train_loop.py): three ViTs of depth 1-2 on
    # 28x28 digits, one bucket; the GHN is initialized in float32 as in training.
    config = tiny_config({"archs.pool_size": 3, "archs.ranges.depth": (1, 2)})
    specs = sorted(set(pools_of(config).train), key=str)
    gc = ghn_config(config)
    hyper = ghn.GHN(gc, rngs=nnx.Rngs(0))
    graphdef, params = nnx.graphdef(hyper), nnx.state(hyper, nnx.Param)
    ftype = np.float64 if X64 else np.float32
    if X64:
        jnp.float32 = jnp.float64
        shim = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if k[:2] != "__"})
        shim.float32 = np.float64
        hb.np = zb.np = shim

    def cast(tree):
        floating = lambda x: jnp.issubdtype(x.dtype, jnp.floating)  # noqa: E731
        return jax.tree.map(lambda x: jnp.asarray(x, ftype) if floating(x) else x, tree)

    params = cast(params)
    task = Task("image")
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(16, 28, 28, 1)), ftype),
        "label": jnp.asarray(rng.integers(0, 10, 16)),
    }
    kw = dict(ghn_graphdef=graphdef, task=task, pred_weight_decay=config.optim.pred_weight_decay)
    wants = []
    for spec in specs:
        model = nnx.eval_shape(lambda spec=spec: spec.build(rngs=nnx.Rngs(0)))
        prepared = prepare(model, (task.input_spec(spec),), gc)
        plan = prepared.plan
        if X64:
            plan = dataclasses.replace(plan, dtypes=tuple(np.dtype(ftype) for _ in plan.dtypes))
        g, _, rest = nnx.split(model, nnx.Param, ...)
        target = step.Target(plan, prepared.treedef, g, rest)
        fn = jax.jit(lambda p, gr, b, t=target: step.meta_grads(p, gr, b, target=t, **kw))
        wants.append(fn(params, cast(prepared.batch), batch))
    want = jax.tree.map(lambda *xs: sum(xs) / len(xs), *wants)
    plan = hb.make_bucket_plan(zb.smallest_bucket(specs), specs, task.input_spec, gc)
    each = [hb.arch_inputs(plan, s, task.input_spec(s), gc) for s in specs]
    stacked = cast(jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *each))
    got = jax.jit(
        lambda p, i, b: step.meta_grads(p, i, b, loss_fn=step.bucketed_meta_loss, plan=plan, **kw)
    )(params, stacked, batch)

    def sq(a, b):
        return sum(
            float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )

    zeros = jax.tree.map(jnp.zeros_like, want["grads"])
    # The embedding tables (float32 lookups in both programs) apart from the rest.
    tables = lambda t: t["encoder"]["embed"]  # noqa: E731
    rest = lambda t: {  # noqa: E731
        **{k: v for k, v in t.items() if k != "encoder"},
        "encoder": {k: v for k, v in t["encoder"].items() if k != "embed"},
    }
    return {
        "dtype": str(jax.tree.leaves(got["grads"])[0].dtype),
        "loss_rel": abs(float(got["loss"]) - float(want["loss"])) / abs(float(want["loss"])),
        "grads_rel": (sq(got["grads"], want["grads"]) / sq(want["grads"], zeros)) ** 0.5,
        "grads_rel_without_embeddings": (
            sq(rest(got["grads"]), rest(want["grads"])) / sq(rest(want["grads"]), rest(zeros))
        )
        ** 0.5,
        "embedding_grads_rel": (
            sq(tables(got["grads"]), tables(want["grads"]))
            / sq(tables(want["grads"]), tables(zeros))
        )
        ** 0.5,
    }


if __name__ == "__main__":
    print(json.dumps(main()))
