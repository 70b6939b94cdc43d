"""The compiled programs of meta-training, cached per architecture and counted.

The math lives in `ghn.train.step` as pure functions; this module only
jit-compiles them with shardings, caches and counts the programs:
Per architecture (its XLA program depends on its spec and the data shapes only):
- train: GHN params + gradient accumulator + graph + data batch -> accumulator
  plus this architecture's weighted loss, metric and gradients
  (`step.meta_grads` + `step.accumulate`);
- eval: GHN params + graph + data batch -> summed loss and metric
  (`step.predict` + `step.target_sums`).
Once per run: init (GHN params -> train state), zeros (a fresh accumulator) and
update (`step.apply_update`: clipping, AdamW, EMA, skipping non-finite steps).

Every program is lowered and compiled explicitly, exactly once per cache key;
`Stats` counts compilations, traces (a counter bumped inside each traced
function, which runs once per trace) and programs loaded from the persistent
compilation cache.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ghn.cache import LRUCache
from ghn.hypernet import GHN, GHNConfig, abstract_ghn
from ghn.hypernet import bucketed as hb
from ghn.hypernet.predict import Prepared, prepare
from ghn.params import count_params
from ghn.tasks import Task
from ghn.train import compile_cache, step
from ghn.train.distributed import (
    barrier,
    batch_sharding,
    fsdp_sharding,
    put_global,
    put_replicated,
    replicated,
)
from ghn.zoo import ArchSpec
from ghn.zoo import bucketed as zb


@dataclasses.dataclass
class Arch:
    """Host-side preparation of one architecture, plus its graph on the devices."""

    spec: ArchSpec
    prepared: Prepared
    target: step.Target
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
        kinds = ("train", "eval", "bucket_train", "bucket_eval")
        return sum(self.compilations[k] for k in kinds)


# Host memory the prepared `ArchInputs` of bucketed architectures may hold.
BUCKET_INPUTS_BYTES = 2 * 2**30


def _host_bytes(tree) -> int:
    return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(tree))


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
        tx: optax.GradientTransformation,
        schedule: dict[str, float],
        seed: int,
        ema_decay: float = 0.0,
        bf16: bool = False,
        pred_weight_decay: float = 0.0,
        fsdp: bool = False,
        fsdp_min_size: int = 2**16,
        nan_step: int = -1,
        max_programs: int = 16,
    ):
        """`tx` is `step.make_optimizer(...)`, `schedule` `step.schedule_hparams(...)`;
        at most `max_programs` per-architecture programs stay compiled (LRU)."""
        self.ghn_config = ghn_config
        self.task = task
        self.mesh = mesh
        self.tx = tx
        self.hparams = dict(schedule)
        self.seed = seed
        self.ema_decay = ema_decay
        self.bf16 = bf16
        self.pred_weight_decay = pred_weight_decay
        self.nan_step = nan_step
        self.stats = Stats()
        self.replicated = replicated(mesh)
        self.data_sharding = batch_sharding(mesh)
        abstract = abstract_ghn(ghn_config)
        self.ghn_graphdef = nnx.graphdef(abstract)
        abstract_params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))

        def rule(x):
            if fsdp:
                return fsdp_sharding(mesh, tuple(x.shape), fsdp_min_size)
            return self.replicated

        self.abstract_state = jax.eval_shape(self._init_fn, abstract_params)
        self.state_shardings = jax.tree.map(rule, self.abstract_state)
        self.param_shardings = self.state_shardings["params"]
        self.abstract_acc = jax.eval_shape(self._zeros_fn)
        self.acc_shardings = jax.tree.map(rule, self.abstract_acc)
        self._archs: dict[ArchSpec, Arch] = {}
        # init, zeros, update: one each per run, kept.
        self._compiled: dict[tuple, Any] = {}
        # Per-architecture train/eval programs: bounded (ghn/cache.py), or a broad pool
        # exhausts the process's memory mappings.
        self._arch_programs: LRUCache = LRUCache(max_programs)
        # Host arrays of bucketed architectures (graphs, factored index maps: small), bounded
        # by bytes so a stream over thousands of architectures keeps a fixed host footprint.
        self._bucket_inputs: LRUCache = LRUCache(
            256, weigh=_host_bytes, max_weight=BUCKET_INPUTS_BYTES
        )
        self._eval_inputs: LRUCache = LRUCache(64)  # the same, on the devices
        self._weights: dict[tuple[int, int], jax.Array] = {}
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

    @property
    def _train_in_shardings(self) -> tuple:
        """(GHN params, accumulator, graph or arch inputs, data batch, weight)."""
        return (
            self.param_shardings,
            self.acc_shardings,
            self.replicated,
            self.data_sharding,
            self.replicated,
        )

    @property
    def evictions(self) -> int:
        """Per-architecture programs dropped from the bounded cache so far."""
        return self._arch_programs.evictions

    def _arch_cached(self, key: tuple, build: Callable[[], Any]):
        return self._arch_programs.get_or_build(key, build)

    def _cached(self, key: tuple, build: Callable[[], Any]):
        hit = self._compiled.get(key)
        if hit is None:
            hit = self._compiled[key] = build()
        return hit

    def _init_fn(self, params: dict[str, Any]) -> dict[str, Any]:
        self.stats.traces["init"] += 1
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
        """A fresh train state (same on every process), laid out by `state_shardings`.

        Its GHN parameters are exactly those of `GHN(ghn_config, rngs=nnx.Rngs(seed))`:
        built eagerly, where `ghn.hypernet.init` draws them on the host (inside the
        program the initializers would take JAX's path: other values).
        """
        abstract = self.abstract_state["params"]
        fn = self._cached(
            ("init",),
            lambda: self._compile(
                "init",
                self._init_fn,
                (self.param_shardings,),
                self.state_shardings,
                (abstract,),
                donate=(0,),
            ),
        )
        ghn = GHN(self.ghn_config, rngs=nnx.Rngs(self.seed))
        params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(ghn, nnx.Param)))
        return fn(put_global(params, self.param_shardings))

    def _zeros_fn(self) -> dict[str, Any]:
        self.stats.traces["zeros"] += 1
        return step.zeros_like_grads(self.abstract_state["params"])

    def zeros(self) -> dict[str, Any]:
        fn = self._cached(
            ("zeros",), lambda: self._compile("zeros", self._zeros_fn, (), self.acc_shardings, ())
        )
        return fn()

    def arch(self, spec: ArchSpec) -> Arch:
        """Traces, plans and uploads `spec`'s graph once (`prepare` checks it fits the GHN)."""
        hit = self._archs.get(spec)
        if hit is not None:
            return hit
        model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
        prepared = prepare(model, (self.task.input_spec(spec),), self.ghn_config)
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        target = step.Target(prepared.plan, prepared.treedef, graphdef, rest)
        graph = put_replicated(prepared.batch, self.replicated)
        arch = Arch(spec, prepared, target, graph, count_params(prepared.plan.infos))
        self._archs[spec] = arch
        return arch

    def train_fn(self, spec: ArchSpec):
        """The pure per-architecture function the train program compiles (for tests)."""
        kwargs = dict(
            ghn_graphdef=self.ghn_graphdef,
            target=self.arch(spec).target,
            task=self.task,
            pred_weight_decay=self.pred_weight_decay,
            bf16=self.bf16,
        )

        def fn(params, acc, graph, batch, weight):
            self.stats.traces["train"] += 1
            return step.accumulate(acc, step.meta_grads(params, graph, batch, **kwargs), weight)

        return fn

    def weight(self, m: int, k: int = 1) -> jax.Array:
        """k / m on the devices: the share of k architectures in a meta-batch of m."""
        if (m, k) not in self._weights:
            self._weights[m, k] = put_replicated(np.float32(k / m), self.replicated)
        return self._weights[m, k]

    def accumulate(self, spec: ArchSpec, params, acc, batch, weight) -> dict[str, Any]:
        """acc + weight * (loss, metrics and GHN gradients of `spec` on `batch`)."""
        arch = self.arch(spec)
        key = ("train", spec, _shape_key(batch))

        def build():
            in_sh = self._train_in_shardings
            args = (params, acc, arch.graph, batch, weight)
            return self._compile(
                "train", self.train_fn(spec), in_sh, self.acc_shardings, args, donate=(1,)
            )

        return self._arch_cached(key, build)(params, acc, arch.graph, batch, weight)

    def bucket_plan(self, specs: Sequence[ArchSpec]) -> hb.BucketPlan:
        """The plan of the smallest bucket holding `specs` (one bucket key); its slot sizes
        come from the widest, the deepest and the widest-MLP of them."""
        bucket = zb.smallest_bucket(specs)
        sizes = (lambda s: s.width, lambda s: s.depth, lambda s: s.mlp_ratio * s.width)
        extremes = {max(specs, key=size) for size in sizes}
        return hb.make_bucket_plan(
            bucket, sorted(extremes, key=str), self._input_spec, self.ghn_config
        )

    def _input_spec(self, spec: ArchSpec):
        return self.task.input_spec(spec)

    def bucket_inputs(self, plan: hb.BucketPlan, specs: Sequence[ArchSpec]) -> hb.ArchInputs:
        """The stacked, replicated runtime description of `specs` (all of `plan`'s bucket)."""
        each = [self.bucket_arch_inputs(plan, spec) for spec in specs]
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *each)
        return put_replicated(stacked, self.replicated)

    def accumulate_bucket(
        self, plan: hb.BucketPlan, specs: Sequence[ArchSpec], params, acc, batch, weight
    ) -> dict[str, Any]:
        """acc + weight * (mean loss, metrics and GHN gradients of `specs` on `batch`), all
        in the one program of (`plan`, len(specs), batch shape), whatever the specs are."""
        inputs = self.bucket_inputs(plan, specs)
        key = ("bucket_train", plan, len(specs), _shape_key(batch))
        kwargs = dict(
            ghn_graphdef=self.ghn_graphdef,
            plan=plan,
            task=self.task,
            pred_weight_decay=self.pred_weight_decay,
            bf16=self.bf16,
            loss_fn=step.bucketed_meta_loss,
        )

        def fn(params, acc, inputs, batch, weight):
            self.stats.traces["bucket_train"] += 1
            return step.accumulate(acc, step.meta_grads(params, inputs, batch, **kwargs), weight)

        def build():
            in_sh = self._train_in_shardings
            args = (params, acc, inputs, batch, weight)
            return self._compile("bucket_train", fn, in_sh, self.acc_shardings, args, donate=(1,))

        return self._arch_cached(key, build)(params, acc, inputs, batch, weight)

    def evaluate(self, spec: ArchSpec, params, batch) -> dict[str, jax.Array]:
        """Summed loss and metric numerator of predicted parameters (no fine-tuning)."""
        arch = self.arch(spec)
        key = ("eval", spec, _shape_key(batch))

        def fn(params, graph, batch):
            self.stats.traces["eval"] += 1
            leaves = step.predict(self.ghn_graphdef, params, graph, arch.target)
            return step.target_sums(arch.target, self.task, leaves, batch, self.bf16)

        def build():
            in_sh = (self.param_shardings, self.replicated, self.data_sharding)
            args = (params, arch.graph, batch)
            return self._compile("eval", fn, in_sh, self.replicated, args)

        return self._arch_cached(key, build)(params, arch.graph, batch)

    def bucket_arch_inputs(self, plan: hb.BucketPlan, spec: ArchSpec) -> hb.ArchInputs:
        """`spec`'s host arrays for `plan` (cached; ConfigError if it does not fit)."""
        hit = self._bucket_inputs.get((plan, spec))
        if hit is None:
            hit = hb.arch_inputs(plan, spec, self._input_spec(spec), self.ghn_config)
            self._bucket_inputs.put((plan, spec), hit)
        return hit

    def evaluate_bucket(self, plan: hb.BucketPlan, spec: ArchSpec, params, batch):
        """`evaluate` through `plan`'s program: one program per bucket and batch shape."""
        inputs = self._eval_inputs.get((plan, spec))
        if inputs is None:  # uploaded once, not once per evaluation batch
            inputs = put_replicated(self.bucket_arch_inputs(plan, spec), self.replicated)
            self._eval_inputs.put((plan, spec), inputs)
        key = ("bucket_eval", plan, _shape_key(batch))

        def fn(params, inputs, batch):
            self.stats.traces["bucket_eval"] += 1
            ghn = nnx.merge(self.ghn_graphdef, params)
            _, sums = step.bucketed_sums(
                ghn, inputs, batch, plan=plan, task=self.task, bf16=self.bf16
            )
            return sums

        def build():
            in_sh = (self.param_shardings, self.replicated, self.data_sharding)
            args = (params, inputs, batch)
            return self._compile("bucket_eval", fn, in_sh, self.replicated, args)

        return self._arch_cached(key, build)(params, inputs, batch)

    def _update_fn(self, state, acc, inject_nan, hparams):
        self.stats.traces["update"] += 1
        return step.apply_update(
            state, acc, inject_nan, hparams, tx=self.tx, ema_decay=self.ema_decay
        )

    def update(self, state, acc, step_index: int):
        """One optimizer step from the accumulated gradients; donates `state`."""

        def build():
            in_sh = (self.state_shardings, self.acc_shardings, self.replicated, self.replicated)
            out_sh = (self.state_shardings, self.replicated)
            args = (state, acc, self._flags[False], self._hparams)
            return self._compile("update", self._update_fn, in_sh, out_sh, args, donate=(0,))

        fn = self._cached(("update",), build)
        return fn(state, acc, self._flags[step_index == self.nan_step], self._hparams)

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays sharded over `data`."""
        return {
            k: jax.make_array_from_process_local_data(self.data_sharding, v)
            for k, v in local.items()
        }
