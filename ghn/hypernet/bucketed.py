"""Predicting a bucket's padded parameters: one program for every architecture of a bucket.

`ghn.zoo.bucketed` runs any ViT (or GPT-2) of a `Bucket` at the bucket's maximal
shapes from a padded parameter tree. This module predicts that tree. The
static part, `BucketPlan`, depends on the bucket only: one *slot* per padded
parameter and block (blocks/attn/qkv/kernel of block 3 is one slot), each
decoded at a fixed maximal size (rows x cols of the decoder's canonical
layout). Everything that differs between architectures is a runtime array
(`ArchInputs`, fixed shapes per plan, so a meta-batch stacks and maps):

  node_S        which graph node predicts slot S (its GHN embedding)
  rows_S/cols_S the real decoded size of slot S (0 x 0: absent, e.g. a missing block)
  scale_S       matrices: the target std of the normalization table; vectors: tanh amplitude
  center_S      vectors: tanh center;  vrow_S: vectors: which of the 2 decoded rows
  maps          per padded leaf, where each of its elements is in the slots' decoded
                buffer (slot, row, col), factored: one int vector per padded axis,
                summed by broadcasting on the device (`ghn.zoo.bucketed.embed_offsets`:
                a few KB to build and ship per architecture, not the padded size);
                padding is masked by the target's masks
  graph         the architecture's graph padded to the plan's node count
  target        the target forward's masks and scalars (`ghn.zoo.bucketed.arch_arrays`)

Decoding a slot at its maximal size and masking rows >= rows_S and columns
>= cols_S gives exactly the per-architecture decoding: the low-rank decoder's
row i of A and column j of B never depend on how many rows or columns are
asked for, and the normalization's Gram sums run over the real block only. So
`predict_padded`, cut back to the real shapes (`ghn.zoo.bucketed.extract_params`),
equals `GHN.predict` on the real model, up to float round-off (tested).

The maps are built on the host by embedding, for every real parameter, an
array of its own element positions (`ghn.zoo.bucketed.embed_offsets`), so the
padded layout is defined in one place (the zoo side).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ghn.errors import ConfigError
from ghn.hypernet.batch import GraphBatch, make_batch, padded_size
from ghn.hypernet.normalize import EPS
from ghn.hypernet.predict import prepare
from ghn.zoo import bucketed as zb
from ghn.zoo.spec import ArchSpec

Path = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One padded parameter: its slots (one per stacked block, else one) and their size."""

    path: Path
    kind: str  # "matrix" or "vector"
    rows: int  # vectors: 2 (the decoder's two rows)
    cols: int
    slots: tuple[int, ...]  # indices into the plan's slot arrays


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    bucket: zb.Bucket
    leaves: tuple[Leaf, ...]
    num_slots: int
    num_nodes: int  # every architecture's graph is padded to this

    def leaf(self, path: Path) -> Leaf:
        for leaf in self.leaves:
            if leaf.path == path:
                return leaf
        raise KeyError(path)


@dataclasses.dataclass
class _Real:
    """Host-side description of one architecture's real parameters."""

    prepared: Any
    paths: list[str]  # flat-state order, '/'-joined
    tree_paths: list[Path]  # the same as tree paths of the pure dict
    decode: list[tuple]  # per leaf: (kind, rows, cols, node, vrow, scale, center)


def _describe(spec: ArchSpec, input_spec, config) -> _Real:
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    prepared = prepare(model, (input_spec,), config)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tree_paths = [p for p in zb.flatten_tree(pure)]
    plan = prepared.plan
    decode: list[tuple | None] = [None] * len(plan.infos)
    for group in plan.groups:
        for i, leaf in enumerate(group.leaves):
            decode[leaf] = (
                group.kind,
                group.rows,
                group.cols,
                group.nodes[i],
                group.vector_rows[i],
                group.scales[i],
                group.centers[i],
            )
    paths = [info.path for info in plan.infos]
    # The pure dict and the flat state list the leaves in the same order.
    assert [("/".join(map(str, p))) for p in tree_paths] == paths, (tree_paths, paths)
    return _Real(prepared, paths, tree_paths, decode)


def _slot_of(path: Path, stacked: bool) -> tuple[Path, int | None]:
    """Real tree path -> (padded leaf path, block index or None)."""
    if stacked:
        return (path[0], *path[2:]), int(path[1])
    return path, None


def make_bucket_plan(bucket: zb.Bucket, specs: Sequence[ArchSpec], input_spec, config):
    """The static plan of `bucket`; `specs` must include the bucket's largest
    architectures (slot sizes are their maxima). `input_spec(spec)` gives the
    example input each architecture is traced with."""
    shapes = zb.flatten_tree(zb.padded_shapes(bucket))
    sizes: dict[Path, list] = {}  # padded leaf -> [kind, rows, cols, max slot count]
    num_nodes = 0
    for spec in specs:
        real = _describe(spec, input_spec(spec), config)
        num_nodes = max(num_nodes, real.prepared.graph.num_nodes)
        for tree_path, d in zip(real.tree_paths, real.decode, strict=True):
            stacked = tree_path[0] == "blocks"
            leaf_path, block = _slot_of(tree_path, stacked)
            if leaf_path not in shapes:
                raise ConfigError(f"{spec.name}: {tree_path} has no padded form in {bucket.name}")
            kind, rows, cols = d[0], d[1], d[2]
            n = shapes[leaf_path].shape[0] if stacked else 1
            cur = sizes.setdefault(leaf_path, [kind, 0, 0, n])
            cur[1], cur[2] = max(cur[1], rows), max(cur[2], cols)
    leaves, start = [], 0
    for path in shapes:
        if path not in sizes:
            continue
        kind, rows, cols, n = sizes[path]
        leaves.append(Leaf(path, kind, rows, cols, tuple(range(start, start + n))))
        start += n
    return BucketPlan(bucket, tuple(leaves), start, padded_size(num_nodes))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ArchInputs:
    """One architecture's runtime description for a `BucketPlan` (see the module docstring)."""

    graph: GraphBatch
    node_S: jax.Array
    rows_S: jax.Array
    cols_S: jax.Array
    scale_S: jax.Array
    center_S: jax.Array
    vrow_S: jax.Array
    maps: dict
    target: dict  # `ghn.zoo.bucketed.arch_arrays`: the forward's masks and scalars


def arch_inputs(plan: BucketPlan, spec: ArchSpec, input_spec, config) -> ArchInputs:
    """Host arrays describing `spec` inside `plan` (NumPy; put them on devices yourself)."""
    if not zb.fits(plan.bucket, spec):
        raise ConfigError(f"{spec.name} does not fit bucket {plan.bucket.name}")
    real = _describe(spec, input_spec, config)
    if real.prepared.graph.num_nodes > plan.num_nodes:
        raise ConfigError(
            f"{spec.name} has {real.prepared.graph.num_nodes} graph nodes, more than the "
            f"plan's {plan.num_nodes}: build the plan with the bucket's largest architectures"
        )
    s = plan.num_slots
    node = np.zeros(s, np.int32)
    rows = np.zeros(s, np.int32)
    cols = np.zeros(s, np.int32)
    scale = np.zeros(s, np.float32)
    center = np.zeros(s, np.float32)
    vrow = np.zeros(s, np.int32)
    index_tree = {}
    block0: dict[Path, np.ndarray] = {}  # a stacked leaf's positions in its block 0 slot
    by_path = {leaf.path: leaf for leaf in plan.leaves}
    for tree_path, path, d in zip(real.tree_paths, real.paths, real.decode, strict=True):
        kind, r, c, n, vr, sc, ce = d
        leaf_path, block = _slot_of(tree_path, tree_path[0] == "blocks")
        leaf = by_path[leaf_path]
        k = 0 if block is None else block
        slot = leaf.slots[k]
        if r > leaf.rows or c > leaf.cols:
            raise ConfigError(
                f"{spec.name}: {path} decodes to {r}x{c}, larger than the plan's "
                f"{leaf.rows}x{leaf.cols}; build the plan with the bucket's largest architectures"
            )
        node[slot], rows[slot], cols[slot] = n, r, c
        scale[slot], center[slot], vrow[slot] = sc, ce, vr
        if len(leaf.slots) * leaf.rows * leaf.cols >= 2**31:
            raise ConfigError(f"{spec.name}: {path}'s slots exceed int32 indexing")
        # Slot k's buffer starts at k * its size; every block's positions are block 0's
        # shifted, so they are built once per leaf.
        base = k * (leaf.cols if kind == "vector" else leaf.rows * leaf.cols)
        if block in (None, 0):
            info = real.prepared.plan.infos[real.paths.index(path)]
            c_out, c_in, kh, kw = info.canonical_shape
            if kind == "vector":  # the buffer holds one decoded row per slot
                canon = np.arange(info.size, dtype=np.int64)
            else:
                o, i, h, w = np.ix_(*(np.arange(n, dtype=np.int64) for n in (c_out, c_in, kh, kw)))
                canon = (o * kh + h) * leaf.cols + (i * kw + w)
            block0[leaf_path] = info.from_canonical(canon.reshape(c_out, c_in, kh, kw))
        index_tree[tree_path] = block0[leaf_path] + base
    offsets = zb.embed_offsets(plan.bucket, spec, zb.unflatten_tree(index_tree))
    maps = {"/".join(map(str, p)): v for p, v in zb.flatten_tree(offsets).items()}
    graph = make_batch([real.prepared.graph], config, buckets=(plan.num_nodes,))
    target = zb.arch_arrays(plan.bucket, spec)
    return ArchInputs(graph, node, rows, cols, scale, center, vrow, maps, target)


def _decode_slots(ghn, nodes_NxD, kind: str, rows: int, cols: int, idx, inputs) -> jax.Array:
    """The decoded buffers of slots `idx` (all of one kind and size): (G, rows * cols) for
    matrices, (G, cols) for vectors, zero outside each slot's real rows and columns."""
    e_GxD = nodes_NxD[inputs.node_S[idx]]
    rows_G, cols_G = inputs.rows_S[idx], inputs.cols_S[idx]
    col_ok_GxI = jnp.arange(cols)[None, :] < cols_G[:, None]
    if kind == "vector":
        w_Gx2xI = ghn.decoder.full(e_GxD, 2, cols)
        raw_GxI = jnp.take_along_axis(w_Gx2xI, inputs.vrow_S[idx][:, None, None], axis=1)[:, 0]
        vals_GxI = inputs.center_S[idx][:, None] + inputs.scale_S[idx][:, None] * jnp.tanh(raw_GxI)
        return jnp.where(col_ok_GxI, vals_GxI, 0.0)
    row_ok_GxO = jnp.arange(rows)[None, :] < rows_G[:, None]
    a_GxOxr, b_GxrxI = ghn.decoder.factors(e_GxD, rows, cols)
    a_GxOxr = jnp.where(row_ok_GxO[:, :, None], a_GxOxr, 0.0)
    b_GxrxI = jnp.where(col_ok_GxI[:, None, :], b_GxrxI, 0.0)
    # The per-architecture normalization (predict._decode_group) over the real block.
    ata = jnp.einsum("gRr,gRs->grs", a_GxOxr, a_GxOxr)
    bbt = jnp.einsum("grC,gsC->grs", b_GxrxI, b_GxrxI)
    sq = jnp.sum(ata * bbt, axis=(1, 2))
    size = jnp.maximum(rows_G * cols_G, 1).astype(jnp.float32)
    a_GxOxr = a_GxOxr * (inputs.scale_S[idx] * jax.lax.rsqrt(sq / size + EPS))[:, None, None]
    return jnp.einsum("gOr,grI->gOI", a_GxOxr, b_GxrxI).reshape(len(idx), rows * cols)


def predict_padded(ghn, plan: BucketPlan, inputs: ArchInputs) -> dict:
    """The padded parameter tree of the architecture `inputs` describes (0 on padding).

    A pure function of the GHN and arrays: jit it once per plan, grad it, vmap it
    over a stacked meta-batch of `ArchInputs`. Slots of one kind and size are decoded
    together, as `GHN.predict` decodes its shape groups: on 2 CPU cores a small ViT's
    prediction (forward + backward) took twice the per-architecture time when each
    padded leaf made its own decoder calls.
    """
    if ghn.config.decoder != "lowrank":
        raise ConfigError("bucketed prediction needs the low-rank decoder")
    nodes_NxD = ghn.encode(inputs.graph)[0].astype(jnp.float32)
    groups: dict[tuple[str, int, int], list[Leaf]] = {}
    for leaf in plan.leaves:
        groups.setdefault((leaf.kind, leaf.rows, leaf.cols), []).append(leaf)
    flat = {}
    masks = zb.flatten_tree(zb.param_masks(plan.bucket, inputs.target))
    for (kind, rows, cols), leaves in groups.items():
        idx = np.concatenate([np.asarray(leaf.slots) for leaf in leaves])
        buffers_GxZ = _decode_slots(ghn, nodes_NxD, kind, rows, cols, idx, inputs)
        start = 0
        for leaf in leaves:
            buffer = buffers_GxZ[start : start + len(leaf.slots)].reshape(-1)
            start += len(leaf.slots)
            at = zb.sum_offsets(inputs.maps["/".join(map(str, leaf.path))])
            # Padding's sums point anywhere (clipped into the buffer) and are masked to 0.
            values = buffer[jnp.clip(at, 0, buffer.shape[0] - 1)]
            flat[leaf.path] = jnp.where(masks[leaf.path] > 0, values, 0.0)
    return zb.unflatten_tree(flat)


def slot_dims(plan: BucketPlan) -> dict[str, tuple[int, int]]:
    """Padded leaf -> (rows, cols) each of its slots is decoded at (for reports)."""
    return {"/".join(map(str, leaf.path)): (leaf.rows, leaf.cols) for leaf in plan.leaves}


__all__ = [
    "ArchInputs",
    "BucketPlan",
    "arch_inputs",
    "make_bucket_plan",
    "predict_padded",
    "slot_dims",
]
