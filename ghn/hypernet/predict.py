"""Predicting every parameter of a model.

Host side, once per architecture: trace the graph, pad it into a
`GraphBatch`, and group its parameters into a static `Plan` (parameters of
the same decoded shape and kind are decoded together). Device side: encode
the graph once, decode the low-rank factors of parameters of one layout
together, rescale the factors (not the full matrices) with the normalization
table, and multiply each parameter out directly in its final layout. Peak
memory is the predicted parameters plus the GHN plus factors of size
O(r * (rows + cols)).

Two forms of the same arithmetic: `predict_leaves`, one pure function of the
whole model (what meta-training jits and differentiates), and `predict_staged`,
what `GHN.predict` runs: programs keyed by parameter layout and graph-size
bucket, reused across layers, architectures and calls, so a new architecture
compiles only the layouts it has not met (tested equal to the first).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
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


def _decode(decoder, e_GxD, kind, rows, cols, vrow_G, scale_G, center_G, low_rank: bool):
    """Decoded values of G parameters of one (kind, rows, cols): vectors (G, cols),
    low-rank matrices their rescaled factors (A_GxOxr, B_Gxrxc), tiled ones W_GxOxI."""
    if kind == "vector":
        w_Gx2xI = decoder.full(e_GxD, 2, cols)
        raw_GxI = jnp.take_along_axis(w_Gx2xI, vrow_G[:, None, None], axis=1)[:, 0]
        return center_G[:, None] + scale_G[:, None] * jnp.tanh(raw_GxI)
    size = rows * cols
    if low_rank:
        a_GxOxr, b_GxrxI = decoder.factors(e_GxD, rows, cols)
        # ||A B||_F^2 = sum((A^T A) * (B B^T)): the scale costs O(r^2 (R + C)),
        # never a pass over the full matrix.
        ata = jnp.einsum("gRr,gRs->grs", a_GxOxr, a_GxOxr)
        bbt = jnp.einsum("grC,gsC->grs", b_GxrxI, b_GxrxI)
        sq = jnp.sum(ata * bbt, axis=(1, 2))
        a_GxOxr = a_GxOxr * (scale_G * jax.lax.rsqrt(sq / size + EPS))[:, None, None]
        return a_GxOxr, b_GxrxI
    w_GxOxI = decoder.full(e_GxD, rows, cols)
    sq = jnp.sum(jnp.square(w_GxOxI), axis=(1, 2))
    return w_GxOxI * (scale_G * jax.lax.rsqrt(sq / size + EPS))[:, None, None]


def _decode_group(ghn, nodes_NxD, group: Group, low_rank: bool) -> list[tuple[int, jax.Array]]:
    e_GxD = nodes_NxD[jnp.asarray(group.nodes)]
    scale_G = jnp.asarray(group.scales, jnp.float32)
    center_G = jnp.asarray(group.centers, jnp.float32)
    vrow_G = jnp.asarray(group.vector_rows, jnp.int32)
    out = _decode(
        ghn.decoder, e_GxD, group.kind, group.rows, group.cols, vrow_G, scale_G, center_G, low_rank
    )
    if isinstance(out, tuple):
        # Materialize the factors: an elementwise producer fused into a dot
        # turns XLA:CPU's GEMM call into a naive loop nest (~6x slower).
        factors = [(out[0][i], out[1][i]) for i in range(len(group.leaves))]
        factors = jax.lax.optimization_barrier(factors)
        return list(zip(group.leaves, factors))
    return [(leaf, out[i]) for i, leaf in enumerate(group.leaves)]


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


@dataclasses.dataclass(frozen=True)
class LeafKey:
    """What one parameter's prediction program depends on: its decoded (kind, rows,
    cols), its layout (a `ParamInfo` with path, node and role blanked), dtype and
    decoder kind. Every parameter of one layout (a model's blocks, the models of a
    family at one width) shares one program, so compile time follows the distinct
    layouts, not the depth or the number of parameters."""

    kind: str
    rows: int
    cols: int
    layout: ParamInfo
    dtype: str
    low_rank: bool


# Parameters per program call. 1-D parameters are cheap and many (a GPT-2 Large has
# 290): 16 to a call, the last call of a layout repeating its last parameter. Matrices
# go 8, 4, 2 or 1 to a call (the count of a layout split into those, largest first, so
# nothing is computed twice): XLA:CPU overlaps one call's decoding and GEMMs, which
# separate calls per matrix would lose (measured ~1.3x slower on 2 cores).
VECTOR_CHUNK = 16
MATRIX_CHUNKS = (8, 4, 2, 1)


def _spans(n: int, kind: str) -> list[tuple[int, int]]:
    """(start, count) of the calls covering n parameters of one layout."""
    if kind == "vector":
        return [(s, min(VECTOR_CHUNK, n - s)) for s in range(0, n, VECTOR_CHUNK)]
    spans, start = [], 0
    for c in MATRIX_CHUNKS:
        while n - start >= c:
            spans.append((start, c))
            start += c
    return spans


@dataclasses.dataclass(frozen=True)
class Call:
    """One program call: parameters `leaves` (flat-state order) of one `LeafKey`, with
    their int32 (node, decoded row of a vector) and float32 (scale, center) rows,
    padded by repeating the last one."""

    key: LeafKey
    leaves: tuple[int, ...]
    ints_Gx2: np.ndarray
    floats_Gx2: np.ndarray


def leaf_calls(plan: Plan, low_rank: bool) -> list[Call]:
    """The program calls that predict every parameter of `plan`."""
    by_key: dict[LeafKey, list] = {}
    for g in plan.groups:
        for i, leaf in enumerate(g.leaves):
            info = plan.infos[leaf]
            layout = dataclasses.replace(info, path="", node=0, role="")
            key = LeafKey(g.kind, g.rows, g.cols, layout, plan.dtypes[leaf], low_rank)
            row = (leaf, g.nodes[i], g.vector_rows[i], g.scales[i], g.centers[i])
            by_key.setdefault(key, []).append(row)
    calls = []
    for key, rows in by_key.items():
        for start, count in _spans(len(rows), key.kind):
            chunk = rows[start : start + count]
            size = VECTOR_CHUNK if key.kind == "vector" else count
            padded = chunk + [chunk[-1]] * (size - count)
            ints = np.asarray([r[1:3] for r in padded], np.int32)
            floats = np.asarray([r[3:5] for r in padded], np.float32)
            calls.append(Call(key, tuple(r[0] for r in chunk), ints, floats))
    return calls


def _dense(key: LeafKey) -> str | None:
    """A dense kernel's axis order, "io" or "oi"; None for every other layout."""
    order = _direct_einsum(key.layout)
    plain = key.layout.canonical_shape[2:] == (1, 1)
    return order if plain and order in ("io", "oi") else None


def predict_call(decoder, nodes_NxD, key: LeafKey, ints_Gx2, floats_Gx2) -> tuple:
    """The parameters of one `Call`, each in its own layout: the arithmetic of
    `predict_leaves` for them."""
    e_GxD = jnp.take(nodes_NxD, ints_Gx2[:, 0], axis=0)
    scale_G, center_G = floats_Gx2[:, 0], floats_Gx2[:, 1]
    out = _decode(
        decoder,
        e_GxD,
        key.kind,
        key.rows,
        key.cols,
        ints_Gx2[:, 1],
        scale_G,
        center_G,
        key.low_rank,
    )
    g = ints_Gx2.shape[0]
    if not isinstance(out, tuple):
        return tuple(_to_layout(key.layout, out[i], key.dtype) for i in range(g))
    a_GxOxr, b_GxrxI = out
    order = _dense(key)
    if order is None:
        # Materialized before the GEMM, as in `_decode_group`.
        values = jax.lax.optimization_barrier([(a_GxOxr[i], b_GxrxI[i]) for i in range(g)])
        return tuple(_to_layout(key.layout, v, key.dtype) for v in values)
    # A dense kernel: the GEMM's operands materialized row-major in the output's own
    # order (rows x r, r x cols), the plain product XLA:CPU's GEMM runs fastest.
    if order == "io":
        pairs = [(b_GxrxI[i].T, a_GxOxr[i].T) for i in range(g)]
    else:
        pairs = [(a_GxOxr[i], b_GxrxI[i]) for i in range(g)]
    pairs = jax.lax.optimization_barrier(pairs)
    dt = key.dtype
    return tuple((a.astype(dt) @ b.astype(dt)).reshape(key.layout.shape) for a, b in pairs)


# XLA's backend optimizations dominate compile time on CPU (e.g. 18.7 s -> 3.9 s for
# a whole-model GPT-2 program), while the GEMMs that dominate prediction are library
# calls either way.
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}

# Compiled programs kept alive (each holds memory mappings on CPU; see ghn/cache.py).
# A sweep over more layouts recompiles the oldest, from JAX's persistent cache when on.
ENCODERS: LRUCache = LRUCache(16)
LEAF_PROGRAMS: LRUCache = LRUCache(256)


@dataclasses.dataclass
class _Program:
    """A jitted function and the argument shapes it has been compiled for."""

    fn: Any
    compiled: set = dataclasses.field(default_factory=set)


# The decoding programs read node embeddings padded to a multiple of this many rows (not
# to the graph's own size bucket), so a deeper model reuses them: GPT-2 XL has 630 nodes.
NODE_ROWS = 1024


def _node_rows(num_nodes: int) -> int:
    return -(-num_nodes // NODE_ROWS) * NODE_ROWS


def _encoder_program(graphdef) -> _Program:
    def run(state, batch):
        nodes_NxD = nnx.merge(graphdef, state).encode(batch)[0].astype(jnp.float32)
        n = nodes_NxD.shape[0]
        return jnp.pad(nodes_NxD, ((0, _node_rows(n) - n), (0, 0)))

    return ENCODERS.get_or_build(
        graphdef, lambda: _Program(jax.jit(run, compiler_options=FAST_COMPILE_OPTIONS))
    )


def _call_program(decoder_graphdef, key: LeafKey, shardings) -> _Program:
    def build():
        def run(decoder_state, nodes_NxD, ints_Gx2, floats_Gx2):
            decoder = nnx.merge(decoder_graphdef, decoder_state)
            return predict_call(decoder, nodes_NxD, key, ints_Gx2, floats_Gx2)

        options = FAST_COMPILE_OPTIONS
        return _Program(jax.jit(run, out_shardings=shardings, compiler_options=options))

    return LEAF_PROGRAMS.get_or_build((decoder_graphdef, key, shardings), build)


def _compile_all(jobs: Sequence[tuple[_Program, tuple]]) -> int:
    """Compiles the (program, example arguments) pairs not compiled yet, side by side
    (XLA compiles without holding the GIL; later calls hit jit's own cache). Returns
    how many it compiled."""
    todo = {}
    for program, args in jobs:
        shapes = _input_key(args)
        if shapes not in program.compiled:
            todo[id(program), shapes] = (program, shapes, args)
    if todo:
        workers = min(len(todo), os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda job: job[0].fn.lower(*job[2]).compile(), todo.values()))
        for program, shapes, _ in todo.values():
            program.compiled.add(shapes)
    return len(todo)


def predict_staged(ghn, prepared: Prepared, shardings=None) -> list[jax.Array]:
    """The parameters of `prepared`'s model (flat-state order), program by program.

    Programs are keyed by what repeats, not by the model: the graph's encoding (per
    graph-size bucket), then the parameters of one layout (`LeafKey`) a few at a time
    (`Call`): decoded, rescaled and multiplied out in their own layout. They are
    reused across layers, architectures and calls, so compile time follows the
    distinct layouts, not depth; the programs a call needs are compiled together, in
    parallel threads. Differentiable w.r.t. the GHN: under `jax.grad` or `jax.jit`
    the same functions are traced into the caller's program.
    """
    graphdef, state = nnx.split(ghn)
    decoder_graphdef, decoder_state = nnx.split(ghn.decoder)
    low_rank = getattr(ghn.config, "decoder", "lowrank") == "lowrank"
    calls, args = prepared.calls(low_rank)
    encode = _encoder_program(graphdef)
    leaves: list[Any] = [None] * len(prepared.plan.infos)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(state)):
        # Inside jax.grad / jit: the same functions, traced into the caller's program.
        nodes_NxD = ghn.encode(prepared.batch)[0].astype(jnp.float32)
        for call in calls:
            values = predict_call(ghn.decoder, nodes_NxD, call.key, call.ints_Gx2, call.floats_Gx2)
            for leaf, value in zip(call.leaves, values, strict=False):
                leaves[leaf] = value
        return leaves
    programs = []
    for call in calls:
        sh = None
        if shardings is not None:
            sh = tuple(shardings[i] for i in call.leaves)
            sh += (sh[-1],) * (len(call.ints_Gx2) - len(sh))
        programs.append(_call_program(decoder_graphdef, call.key, sh))
    rows = _node_rows(prepared.batch.num_nodes)
    nodes = jax.ShapeDtypeStruct((rows, ghn.config.d_model), jnp.float32)
    jobs = [(encode, (state, prepared.batch))]
    jobs += [(fn, (decoder_state, nodes, *a)) for fn, a in zip(programs, args, strict=True)]
    _compile_all(jobs)
    nodes_NxD = encode.fn(state, prepared.batch)
    for program, call, a in zip(programs, calls, args, strict=True):
        values = program.fn(decoder_state, nodes_NxD, *a)
        for leaf, value in zip(call.leaves, values, strict=False):
            leaves[leaf] = value
    return leaves


@dataclasses.dataclass
class Prepared:
    """Everything host-side that `predict` needs for one architecture."""

    graph: Graph
    batch: GraphBatch
    plan: Plan
    treedef: Any
    _calls: dict = dataclasses.field(default_factory=dict, repr=False)

    def calls(self, low_rank: bool) -> tuple[list[Call], list[tuple[jax.Array, jax.Array]]]:
        """`leaf_calls` of the plan and their arguments on the device, made once."""
        if low_rank not in self._calls:
            calls = leaf_calls(self.plan, low_rank)
            args = jax.device_put([(c.ints_Gx2, c.floats_Gx2) for c in calls])
            self._calls[low_rank] = (calls, [tuple(a) for a in args])
        return self._calls[low_rank]


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


def predict(ghn, model: nnx.Module, *example_inputs, sharding=None) -> nnx.State:
    """Predicts all parameters of `model`; see `GHN.predict`."""
    prepared = prepare(model, example_inputs, ghn.config)
    shardings = _normalize_shardings(sharding, prepared)
    leaves = predict_staged(ghn, prepared, shardings)
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
