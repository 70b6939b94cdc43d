"""The compiled programs of meta-training, cached per architecture and counted.

Per architecture (its XLA program depends on its spec and the data shapes only):
- train: GHN params + gradient accumulator + graph + data batch -> accumulator
  plus this architecture's weighted loss, metric and gradients (one program:
  encode, decode, build the target model, forward, task loss, backward);
- eval: GHN params + graph + data batch -> summed loss and metric.
Once per run: init, zeros (a fresh accumulator) and update (clipping, AdamW,
EMA, skipping non-finite steps).

Every program is lowered and compiled explicitly, exactly once per cache key;
`Stats` counts compilations, traces (a counter bumped inside each traced
function, which runs once per trace) and programs loaded from the persistent
compilation cache.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ghn.hypernet import GHN, GHNConfig
from ghn.hypernet.predict import Prepared, check_width, predict_leaves, prepare
from ghn.train import compile_cache
from ghn.train.distributed import (
    barrier,
    batch_sharding,
    fsdp_sharding,
    put_replicated,
    replicated,
)
from ghn.train.tasks import Task
from ghn.zoo import ArchSpec


def schedule_hparams(optim, num_steps: int) -> dict[str, float]:
    """The numbers `learning_rate` reads; runtime inputs of the update program."""
    return {
        "lr": float(optim.lr),
        "warmup": float(min(optim.warmup_steps, num_steps)),
        "num_steps": float(num_steps),
        "end": float(optim.lr * optim.end_lr_ratio),
    }


def learning_rate(count, h) -> jax.Array:
    """Linear warm-up to `lr`, then cosine to `end` at `num_steps`.

    Indexed by the number of updates applied so far; update k uses the rate of
    step k + 1, so the first update already moves (warm-up from lr / warmup).
    """
    step = jnp.asarray(count, jnp.float32) + 1.0
    warmup = jnp.asarray(h["warmup"], jnp.float32)
    warm = h["lr"] * step / jnp.maximum(warmup, 1.0)
    span = jnp.maximum(h["num_steps"] - warmup, 1.0)
    progress = jnp.clip((step - warmup) / span, 0.0, 1.0)
    cosine = h["end"] + (h["lr"] - h["end"]) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(step <= warmup, warm, cosine)


def make_schedule(optim, num_steps: int) -> Callable[[jax.Array], jax.Array]:
    h = schedule_hparams(optim, num_steps)
    return lambda count: learning_rate(count, h)


def make_optimizer(optim) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW's direction: Adam plus decoupled weight decay.

    The update step multiplies by -learning_rate itself, with the schedule's
    numbers as runtime inputs, so one compiled update serves any schedule or
    run length (and is AdamW exactly).
    """
    parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
    parts += [
        optax.scale_by_adam(b1=optim.b1, b2=optim.b2),
        optax.add_decayed_weights(optim.weight_decay),
    ]
    return optax.chain(*parts)


@dataclasses.dataclass
class Arch:
    """Host-side preparation of one architecture, plus its graph on the devices."""

    spec: ArchSpec
    prepared: Prepared
    graphdef: Any  # the target model's
    rest: Any  # abstract non-parameter state (BatchNorm statistics)
    graph: Any  # GraphBatch of global replicated arrays
    num_params: int


@dataclasses.dataclass
class Stats:
    compilations: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    traces: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    compile_seconds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    persistent_hits: int = 0

    @property
    def compile_s(self) -> float:
        return sum(self.compile_seconds.values())

    def total(self) -> int:
        return sum(self.compilations.values())

    def arch_compilations(self) -> int:
        return self.compilations["train"] + self.compilations["eval"]


def _shape_key(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))


class Programs:
    """Builds, compiles and caches every program a run executes."""

    def __init__(
        self,
        *,
        ghn_config: GHNConfig,
        task: Task,
        mesh: jax.sharding.Mesh,
        optim,
        num_steps: int,
        seed: int,
        ema_decay: float = 0.0,
        bf16: bool = False,
        pred_weight_decay: float = 0.0,
        fsdp: bool = False,
        fsdp_min_size: int = 2**16,
        nan_step: int = -1,
    ):
        self.ghn_config = ghn_config
        self.task = task
        self.mesh = mesh
        self.tx = make_optimizer(optim)
        self.hparams = schedule_hparams(optim, num_steps)
        self.seed = seed
        self.ema_decay = ema_decay
        self.bf16 = bf16
        self.pred_weight_decay = pred_weight_decay
        self.nan_step = nan_step
        self.stats = Stats()
        self.replicated = replicated(mesh)
        self.data_sharding = batch_sharding(mesh)
        abstract_ghn = nnx.eval_shape(lambda: GHN(ghn_config, rngs=nnx.Rngs(0)))
        self.ghn_graphdef = nnx.graphdef(abstract_ghn)

        def rule(x):
            if fsdp:
                return fsdp_sharding(mesh, tuple(x.shape), fsdp_min_size)
            return self.replicated

        self.abstract_state = jax.eval_shape(self._init_fn)
        self.state_shardings = jax.tree.map(rule, self.abstract_state)
        self.param_shardings = self.state_shardings["params"]
        self.abstract_acc = jax.eval_shape(self._zeros_fn)
        self.acc_shardings = jax.tree.map(rule, self.abstract_acc)
        self._archs: dict[ArchSpec, Arch] = {}
        self._compiled: dict[tuple, Any] = {}
        self._weights: dict[int, jax.Array] = {}
        self._flags = {b: put_replicated(np.asarray(b), self.replicated) for b in (False, True)}
        self._hparams = put_replicated(
            {k: np.float32(v) for k, v in self.hparams.items()}, self.replicated
        )

    def _compile(self, kind: str, fn, in_shardings, out_shardings, args, donate=()):
        before = compile_cache.persistent_cache_counts()["hits"]
        start = time.perf_counter()
        jitted = jax.jit(
            fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate
        )
        compiled = jitted.lower(*args).compile()
        # Processes compile at their own pace; line them up before the program's
        # collectives run (every process compiles the same programs in order).
        barrier(f"compiled-{kind}")
        self.stats.compile_seconds[kind] += time.perf_counter() - start
        self.stats.compilations[kind] += 1
        if compile_cache.persistent_cache_counts()["hits"] > before:
            self.stats.persistent_hits += 1
        return compiled

    def _cached(self, key: tuple, build: Callable[[], Any]):
        hit = self._compiled.get(key)
        if hit is None:
            hit = self._compiled[key] = build()
        return hit

    def _init_fn(self) -> dict[str, Any]:
        self.stats.traces["init"] += 1
        ghn = GHN(self.ghn_config, rngs=nnx.Rngs(self.seed))
        params = nnx.to_pure_dict(nnx.state(ghn, nnx.Param))
        state = {
            "params": params,
            "opt": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(self.seed)),
        }
        if self.ema_decay > 0:
            state["ema"] = jax.tree.map(jnp.copy, params)
        return state

    def init_state(self) -> dict[str, Any]:
        """A fresh train state (same on every process), laid out by `state_shardings`."""
        fn = self._cached(
            ("init",), lambda: self._compile("init", self._init_fn, (), self.state_shardings, ())
        )
        return fn()

    def _zeros_fn(self) -> dict[str, Any]:
        self.stats.traces["zeros"] += 1
        grads = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), self.abstract_state["params"])
        scalars = {k: jnp.zeros((), jnp.float32) for k in ("loss", "task_loss", "metric", "reg")}
        return {"grads": grads, **scalars}

    def zeros(self) -> dict[str, Any]:
        fn = self._cached(
            ("zeros",), lambda: self._compile("zeros", self._zeros_fn, (), self.acc_shardings, ())
        )
        return fn()

    def arch(self, spec: ArchSpec) -> Arch:
        """Traces, plans and uploads `spec`'s graph once."""
        hit = self._archs.get(spec)
        if hit is not None:
            return hit
        model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
        prepared = prepare(model, (self.task.input_spec(spec),), self.ghn_config)
        check_width(prepared.plan, self.ghn_config)
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        num_params = sum(math.prod(i.shape) for i in prepared.plan.infos)
        graph = put_replicated(prepared.batch, self.replicated)
        arch = Arch(spec, prepared, graphdef, rest, graph, num_params)
        self._archs[spec] = arch
        return arch

    def _predict(self, arch: Arch, params, graph):
        ghn = nnx.merge(self.ghn_graphdef, params)
        return predict_leaves(ghn, graph, arch.prepared.plan)

    def _forward(self, arch: Arch, leaves, batch) -> dict[str, jax.Array]:
        dtype = jnp.bfloat16 if self.bf16 else jnp.float32
        if self.bf16:
            # The decoder ran in float32; only the target's forward is bfloat16.
            leaves = [
                x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x for x in leaves
            ]
        params = jax.tree_util.tree_unflatten(arch.prepared.treedef, leaves)
        # BatchNorm statistics: the forward runs in training mode, reading batch
        # statistics, so these placeholders only absorb the running-average update.
        rest = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), arch.rest)
        model = nnx.merge(arch.graphdef, params, rest)
        return self.task.sums(model, batch, dtype)

    def train_fn(self, spec: ArchSpec):
        """The pure per-architecture function the train program compiles (for tests)."""
        arch = self.arch(spec)
        wd = self.pred_weight_decay

        def fn(params, acc, graph, batch, weight):
            self.stats.traces["train"] += 1

            def loss_fn(params):
                leaves = self._predict(arch, params, graph)
                # safe_norm: a zero parameter has gradient 0, not NaN.
                reg = sum(optax.safe_norm(x.astype(jnp.float32), 0.0) for x in leaves)
                sums = self._forward(arch, leaves, batch)
                task_loss = sums["loss_sum"] / sums["count"]
                return task_loss + wd * reg, (task_loss, sums["metric_sum"] / sums["count"], reg)

            (loss, (task_loss, metric, reg)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params
            )
            new = {"grads": grads, "loss": loss, "task_loss": task_loss, "metric": metric}
            new["reg"] = reg
            return jax.tree.map(lambda a, n: a + weight * n.astype(a.dtype), acc, new)

        return fn

    def weight(self, m: int) -> jax.Array:
        if m not in self._weights:
            self._weights[m] = put_replicated(np.float32(1.0 / m), self.replicated)
        return self._weights[m]

    def accumulate(self, spec: ArchSpec, params, acc, batch, weight) -> dict[str, Any]:
        """acc + weight * (loss, metrics and GHN gradients of `spec` on `batch`)."""
        arch = self.arch(spec)
        key = ("train", spec, _shape_key(batch))

        def build():
            in_sh = (
                self.param_shardings,
                self.acc_shardings,
                self.replicated,
                self.data_sharding,
                self.replicated,
            )
            args = (params, acc, arch.graph, batch, weight)
            return self._compile(
                "train", self.train_fn(spec), in_sh, self.acc_shardings, args, donate=(1,)
            )

        return self._cached(key, build)(params, acc, arch.graph, batch, weight)

    def evaluate(self, spec: ArchSpec, params, batch) -> dict[str, jax.Array]:
        """Summed loss and metric numerator of predicted parameters (no fine-tuning)."""
        arch = self.arch(spec)
        key = ("eval", spec, _shape_key(batch))

        def fn(params, graph, batch):
            self.stats.traces["eval"] += 1
            return self._forward(arch, self._predict(arch, params, graph), batch)

        def build():
            in_sh = (self.param_shardings, self.replicated, self.data_sharding)
            args = (params, arch.graph, batch)
            return self._compile("eval", fn, in_sh, self.replicated, args)

        return self._cached(key, build)(params, arch.graph, batch)

    def _update_fn(self, state, acc, inject_nan, hparams):
        self.stats.traces["update"] += 1
        grads, loss = acc["grads"], acc["loss"]
        # Tests corrupt a step on purpose (config.debug.nan_step).
        poison = jnp.where(inject_nan, jnp.nan, 1.0)
        grads = jax.tree.map(lambda g: g * poison.astype(g.dtype), grads)
        loss = loss * poison
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # The rate of this update: skipped steps do not advance the schedule.
        lr = learning_rate(state["step"] - state["skipped"], hparams)
        updates, opt = self.tx.update(grads, state["opt"], state["params"])
        params = jax.tree.map(lambda p, u: p - (lr * u).astype(p.dtype), state["params"], updates)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        out = {
            "params": keep_if_finite(params, state["params"]),
            "opt": keep_if_finite(opt, state["opt"]),
            "step": state["step"] + 1,
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
            "rng": jax.random.key_data(
                jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
            ),
        }
        if "ema" in state:
            d = self.ema_decay
            ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], out["params"])
            out["ema"] = keep_if_finite(ema, state["ema"])
        metrics = {
            "loss": loss,
            "task_loss": acc["task_loss"],
            "metric": acc["metric"],
            "pred_norm": acc["reg"],
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(out["params"]),
            "lr": lr,
            "finite": finite,
        }
        return out, metrics

    def update(self, state, acc, step: int):
        """One optimizer step from the accumulated gradients; donates `state`."""

        def build():
            in_sh = (self.state_shardings, self.acc_shardings, self.replicated, self.replicated)
            out_sh = (self.state_shardings, self.replicated)
            args = (state, acc, self._flags[False], self._hparams)
            return self._compile("update", self._update_fn, in_sh, out_sh, args, donate=(0,))

        fn = self._cached(("update",), build)
        return fn(state, acc, self._flags[step == self.nan_step], self._hparams)

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays sharded over `data`."""
        return {
            k: jax.make_array_from_process_local_data(self.data_sharding, v)
            for k, v in local.items()
        }
