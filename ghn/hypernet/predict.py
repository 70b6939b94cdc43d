"""Predicting every parameter of a model in one jit-compiled call.

Host side, once per architecture: trace the graph, pad it into a
`GraphBatch`, and group its parameters into a static `Plan` (parameters of
the same decoded shape and kind are decoded together). Device side: encode
the graph once, decode each group's low-rank factors in one batched call,
rescale the factors (not the full matrices) with the normalization table,
and multiply each parameter out directly in its final layout. Peak memory is
the predicted parameters plus the GHN plus factors of size O(r * (rows + cols)).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ghn.cache import LRUCache
from ghn.graph import Graph, ParamInfo, trace
from ghn.hypernet.batch import GraphBatch, make_batch
from ghn.hypernet.decoder import check_width
from ghn.hypernet.normalize import EPS, RULES, target_stds
from ghn.sharding import largest_axis_sharding


@dataclasses.dataclass(frozen=True)
class Group:
    """Parameters decoded together: same (rows, cols) and same kind."""

    kind: str  # "matrix" (normalized to a std) or "vector" (squashed)
    rows: int
    cols: int
    nodes: tuple[int, ...]  # node whose embedding predicts each parameter
    vector_rows: tuple[int, ...]  # for vectors: which of the 2 decoded rows
    leaves: tuple[int, ...]  # index of each parameter in the flat state
    scales: tuple[float, ...]  # matrices: target std; vectors: tanh amplitude
    centers: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    groups: tuple[Group, ...]
    infos: tuple[ParamInfo, ...]  # flat-state order
    dtypes: tuple[str, ...]


def _matrix_dims(info: ParamInfo) -> tuple[int, int]:
    c_out, c_in, kh, kw = info.canonical_shape
    return c_out * kh, c_in * kw


def make_plan(graph: Graph) -> Plan:
    infos = tuple(graph.params.values())
    stds = target_stds(graph)
    buckets: dict[tuple, list] = {}

    def is_vector(info: ParamInfo) -> bool:
        return sum(1 for a in info.shape if a != 1) <= 1 and RULES[info.role].kind == "squash"

    for leaf, info in enumerate(infos):
        rule = RULES[info.role]
        if is_vector(info):
            # A node's 1-D parameters (a norm's scale, then its bias) take the
            # two decoded rows in order.
            vectors = [p for p in graph.node_params[info.node] if is_vector(graph.params[p])]
            row = min(vectors.index(info.path), 1)
            buckets.setdefault(("vector", 2, info.size), []).append(
                (info.node, row, leaf, rule.amplitude, rule.center)
            )
        else:
            rows, cols = _matrix_dims(info)
            buckets.setdefault(("matrix", rows, cols), []).append(
                (info.node, 0, leaf, stds[info.path], 0.0)
            )
    groups = tuple(
        Group(kind, rows, cols, *map(tuple, zip(*members)))
        for (kind, rows, cols), members in sorted(buckets.items(), key=lambda kv: kv[0])
    )
    dtypes = tuple(p.dtype for p in infos)
    return Plan(groups, infos, dtypes)


def _decode_group(ghn, nodes_NxD, group: Group, low_rank: bool) -> list[tuple[int, jax.Array]]:
    e_GxD = nodes_NxD[jnp.asarray(group.nodes)]
    if group.kind == "vector":
        w_Gx2xI = ghn.decoder.full(e_GxD, 2, group.cols)
        raw_GxI = w_Gx2xI[jnp.arange(len(group.nodes)), jnp.asarray(group.vector_rows)]
        amp = jnp.asarray(group.scales, raw_GxI.dtype)[:, None]
        center = jnp.asarray(group.centers, raw_GxI.dtype)[:, None]
        vals_GxI = center + amp * jnp.tanh(raw_GxI)
        return [(leaf, vals_GxI[i]) for i, leaf in enumerate(group.leaves)]

    std_G = jnp.asarray(group.scales, jnp.float32)
    size = group.rows * group.cols
    if low_rank:
        a_GxOxr, b_GxrxI = ghn.decoder.factors(e_GxD, group.rows, group.cols)
        # ||A B||_F^2 = sum((A^T A) * (B B^T)): the scale costs O(r^2 (R + C)),
        # never a pass over the full matrix.
        ata = jnp.einsum("gRr,gRs->grs", a_GxOxr, a_GxOxr)
        bbt = jnp.einsum("grC,gsC->grs", b_GxrxI, b_GxrxI)
        sq = jnp.sum(ata * bbt, axis=(1, 2))
        a_GxOxr = a_GxOxr * (std_G * jax.lax.rsqrt(sq / size + EPS))[:, None, None]
        # Materialize the factors: an elementwise producer fused into a dot
        # turns XLA:CPU's GEMM call into a naive loop nest (~6x slower).
        factors = [(a_GxOxr[i], b_GxrxI[i]) for i in range(len(group.leaves))]
        factors = jax.lax.optimization_barrier(factors)
        return list(zip(group.leaves, factors))
    w_GxOxI = ghn.decoder.full(e_GxD, group.rows, group.cols)
    sq = jnp.sum(jnp.square(w_GxOxI), axis=(1, 2))
    w_GxOxI = w_GxOxI * (std_G * jax.lax.rsqrt(sq / size + EPS))[:, None, None]
    return [(leaf, w_GxOxI[i]) for i, leaf in enumerate(group.leaves)]


def _direct_einsum(info: ParamInfo) -> str | None:
    """Einsum output letters that write W straight into the parameter's layout.

    Each of out/in is one axis and spatial at most two (the usual dense, conv
    and embedding layouts); otherwise None and the caller transposes.
    """
    if len(info.out_axes) != 1 or len(info.in_axes) > 1 or len(info.spatial_axes) > 2:
        return None
    letters = {info.out_axes[0]: "o"}
    if info.in_axes:
        letters[info.in_axes[0]] = "i"
    for a, letter in zip(info.spatial_axes, "hw"):
        letters[a] = letter
    return "".join(letters[a] for a in sorted(letters))


def _to_layout(info: ParamInfo, value, dtype) -> jax.Array:
    """Decoded (rows, cols) matrix, factors or vector -> the parameter's own array."""
    c_out, c_in, kh, kw = info.canonical_shape
    if isinstance(value, tuple):
        a_Oxr, b_rxI = value
        r = a_Oxr.shape[-1]
        out = _direct_einsum(info)
        if out is not None:
            # W[(o, h), (i, w)] written in the parameter's own axis order, so
            # XLA emits one GEMM into the output buffer with no transpose copy.
            lhs = "oh"[: 1 + (kh > 1)]
            rhs = "iw"[: 1 + (kw > 1)]
            out = "".join(c for c in out if c in lhs + rhs)
            a = a_Oxr.reshape((c_out, kh, r) if kh > 1 else (c_out, r))
            b = b_rxI.reshape((r, c_in, kw) if kw > 1 else (r, c_in))
            w = jnp.einsum(f"{lhs}r,r{rhs}->{out}", a.astype(dtype), b.astype(dtype))
            return w.reshape(info.shape)
        w = jnp.einsum("ohr,riw->oihw", a_Oxr.reshape(c_out, kh, r), b_rxI.reshape(r, c_in, kw))
    elif value.ndim == 2:
        w = value.reshape(c_out, kh, c_in, kw).transpose(0, 2, 1, 3)
    else:
        w = value.reshape(c_out, c_in, kh, kw)
    return info.from_canonical(w).astype(dtype)


def predict_leaves(ghn, batch: GraphBatch, plan: Plan, graph_index: int = 0) -> list[jax.Array]:
    """The parameters of graph `graph_index` of `batch`, in flat-state order.

    A pure function of the GHN's state and the batch arrays: call it inside
    `jax.jit`/`jax.grad` (meta-training differentiates through it).
    """
    nodes_BxNxD = ghn.encode(batch)
    nodes_NxD = nodes_BxNxD[graph_index].astype(jnp.float32)
    low_rank = getattr(ghn.config, "decoder", "lowrank") == "lowrank"
    leaves: list[Any] = [None] * len(plan.infos)
    for group in plan.groups:
        for leaf, value in _decode_group(ghn, nodes_NxD, group, low_rank):
            leaves[leaf] = _to_layout(plan.infos[leaf], value, plan.dtypes[leaf])
    return leaves


# XLA's backend optimizations dominate compile time on CPU (e.g. 18.7 s -> 3.9 s
# for GPT-2) while the big GEMMs are library calls either way.
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}


# Compiled prediction programs kept alive (~340 memory mappings each on CPU; see
# ghn/cache.py). A sweep over more architectures recompiles the oldest, from
# JAX's persistent cache when it is on.
PROGRAMS: LRUCache = LRUCache(32)


def _compiled(graphdef, plan: Plan, out_shardings, fast_compile: bool = False):
    def build():
        def run(state, batch):
            ghn = nnx.merge(graphdef, state)
            return tuple(predict_leaves(ghn, batch, plan))

        options = FAST_COMPILE_OPTIONS if fast_compile else None
        return jax.jit(run, out_shardings=out_shardings, compiler_options=options)

    return PROGRAMS.get_or_build((graphdef, plan, out_shardings, fast_compile), build)


@dataclasses.dataclass
class Prepared:
    """Everything host-side that `predict` needs for one architecture."""

    graph: Graph
    batch: GraphBatch
    plan: Plan
    treedef: Any


# Traced graphs and plans (host memory only).
_PREPARED: LRUCache = LRUCache(64)


def _input_key(inputs) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(inputs)
    return (treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", ""))) for x in leaves))


def prepare(model: nnx.Module, example_inputs: Sequence[Any], config) -> Prepared:
    """Traces and plans `model` once; later calls with the same architecture hit a cache.

    Raises ValueError when the model does not fit a GHN of `config` (`check_fits`),
    and the tracer's errors for unsupported operations or wrong inputs.
    """
    graphdef, params = nnx.split(model, nnx.Param, ...)[:2]
    leaves, treedef = jax.tree_util.tree_flatten(params)
    key = (
        graphdef,
        tuple((tuple(np.shape(x)), str(x.dtype)) for x in leaves),
        _input_key(example_inputs),
        config,
    )
    hit = _PREPARED.get(key)
    if hit is not None:
        return hit
    graph = trace(model, *example_inputs)
    plan = make_plan(graph)
    # The one check that an architecture fits this GHN: everything that predicts
    # (predict, meta-training, evaluation) goes through here first.
    check_fits(plan, config)
    prepared = Prepared(graph, make_batch([graph], config), plan, treedef)
    _PREPARED.put(key, prepared)
    return prepared


def auto_sharding(plan: Plan, mesh: jax.sharding.Mesh, axis: str | None = None):
    """Shards each parameter's largest evenly divisible axis over `axis` of `mesh`."""
    return tuple(largest_axis_sharding(mesh, tuple(info.shape), axis) for info in plan.infos)


def _normalize_shardings(sharding, prepared: Prepared):
    if sharding is None:
        return None
    if sharding == "auto":
        mesh = jax.make_mesh((jax.device_count(),), ("model",))
        return auto_sharding(prepared.plan, mesh)
    if isinstance(sharding, jax.sharding.Mesh):
        return auto_sharding(prepared.plan, sharding)
    if isinstance(sharding, jax.sharding.Sharding):
        return tuple(sharding for _ in prepared.plan.infos)
    leaves = jax.tree_util.tree_leaves(
        sharding, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )
    if len(leaves) != len(prepared.plan.infos):
        raise ValueError(
            f"sharding has {len(leaves)} leaves, the model has {len(prepared.plan.infos)} params"
        )
    return tuple(leaves)


def check_fits(plan: Plan, config) -> None:
    """Raises ValueError naming the first parameter this GHN cannot decode (wider than K)."""
    if config.decoder != "lowrank":
        return
    for info in plan.infos:
        rows, cols = _matrix_dims(info)
        what = f"parameter '{info.path}' {info.shape} (a {rows}x{cols} decoded matrix)"
        check_width(max(rows, cols), config.max_dim, config.past_max_dim, what)


def predict(
    ghn, model: nnx.Module, *example_inputs, sharding=None, fast_compile: bool = False
) -> nnx.State:
    """Predicts all parameters of `model`; see `GHN.predict`."""
    prepared = prepare(model, example_inputs, ghn.config)
    graphdef, state = nnx.split(ghn)
    shardings = _normalize_shardings(sharding, prepared)
    fn = _compiled(graphdef, prepared.plan, shardings, fast_compile)
    leaves = fn(state, prepared.batch)
    return jax.tree_util.tree_unflatten(prepared.treedef, leaves)


def with_params(model: nnx.Module, params: nnx.State) -> nnx.Module:
    """Puts predicted parameters into `model` (in place) and returns it."""
    nnx.update(model, params)
    abstract = [
        "/".join(str(getattr(k, "key", k)) for k in p)
        for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
        if isinstance(v, jax.ShapeDtypeStruct)
    ]
    if abstract:
        raise ValueError(
            "the model still has abstract (unallocated) non-parameter state after "
            f"inserting the parameters: {abstract[:5]}. Build it concretely "
            "(e.g. spec.build(rngs=...)) or create that state before using the model."
        )
    return model
