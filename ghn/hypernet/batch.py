"""Graphs to static-shape arrays: the `GraphBatch` the encoder consumes.

Everything here is host-side NumPy. Graphs are padded to a few node-count
buckets so the jit-compiled encoder sees a handful of shapes, not one per
architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import numpy as np

from ghn.graph import Graph
from ghn.hypernet.config import GHNConfig


def _shape_vocab() -> tuple[int, ...]:
    sizes = set(range(17))  # kernel sizes, tiny channel counts, 10 classes
    sizes |= set(range(24, 257, 8))
    sizes |= set(range(320, 2049, 64))  # 384, 768, 1024, 1280, 1600, 2048, ...
    sizes |= set(range(2304, 8193, 256))  # 3072, 4096, 5120, 6144, ...
    sizes |= {100, 1000}  # CIFAR-100 and ImageNet heads
    sizes |= {10240, 12288, 14336, 16384, 24576, 32768, 50257, 65536}  # 50257: GPT-2 vocab
    return tuple(sorted(sizes))


# Sizes the shape encoding knows: dense at small sizes, then steps of ~3-12%
# up to 8192, coarser beyond. Entry ids index trained embedding tables, so
# changing this tuple requires bumping SHAPE_VOCAB_VERSION.
SHAPE_VOCAB: tuple[int, ...] = _shape_vocab()
SHAPE_VOCAB_VERSION = 1

_POSITIVE = np.asarray(SHAPE_VOCAB[1:], np.float64)
# Nearest in log space: the boundary between two entries is their geometric mean.
_LOG_BOUNDS = 0.5 * (np.log(_POSITIVE[:-1]) + np.log(_POSITIVE[1:]))

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024)


def shape_bucket(sizes) -> np.ndarray:
    """Index in `SHAPE_VOCAB` of the entry nearest each size in log space (0 -> 0)."""
    s = np.asarray(sizes, np.int64)
    if np.any(s < 0):
        raise ValueError(f"sizes must be >= 0, got {s.min()}")
    ids = 1 + np.searchsorted(_LOG_BOUNDS, np.log(np.maximum(s, 1)), side="left")
    return np.where(s == 0, 0, ids).astype(np.int32)


@flax.struct.dataclass
class GraphBatch:
    """B graphs padded to N nodes. Node i of graph b is row [b, i].

    Ids are ready for embedding lookups: degrees are clipped to max_degree,
    distances to max_spd, and an unreachable node or pair has id max_spd + 1.
    """

    op_ids_BxN: jax.Array
    shape_ids_BxNx4: jax.Array
    in_degree_BxN: jax.Array
    out_degree_BxN: jax.Array
    input_dist_BxN: jax.Array
    spd_fwd_BxNxN: jax.Array
    spd_bwd_BxNxN: jax.Array
    mask_BxN: jax.Array

    @property
    def num_graphs(self) -> int:
        return self.op_ids_BxN.shape[0]

    @property
    def num_nodes(self) -> int:
        """Padded node count N."""
        return self.op_ids_BxN.shape[1]


def padded_size(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """Smallest bucket >= n; past the last bucket, n rounded up to a multiple of 256."""
    for b in sorted(buckets):
        if b >= n:
            return int(b)
    return int(-(-n // 256) * 256)


def _distance_ids(d: np.ndarray, max_spd: int) -> np.ndarray:
    return np.where(d < 0, max_spd + 1, np.minimum(d, max_spd)).astype(np.int32)


def make_batch(
    graphs: Graph | Sequence[Graph],
    config: GHNConfig | None = None,
    *,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> GraphBatch:
    """Pads `graphs` to one node-count bucket and converts them to id arrays."""
    if isinstance(graphs, Graph):
        graphs = [graphs]
    if not graphs:
        raise ValueError("make_batch needs at least one graph")
    config = config or GHNConfig()
    max_spd, max_degree = config.max_spd, config.max_degree
    unreachable = max_spd + 1
    b, n = len(graphs), padded_size(max(g.num_nodes for g in graphs), buckets)

    op_ids = np.zeros((b, n), np.int32)
    shape_ids = np.zeros((b, n, 4), np.int32)
    in_degree = np.zeros((b, n), np.int32)
    out_degree = np.zeros((b, n), np.int32)
    input_dist = np.full((b, n), unreachable, np.int32)
    spd_fwd = np.full((b, n, n), unreachable, np.int32)
    spd_bwd = np.full((b, n, n), unreachable, np.int32)
    mask = np.zeros((b, n), np.bool_)
    for i, g in enumerate(graphs):
        k = g.num_nodes
        op_ids[i, :k] = g.op_ids
        shapes = np.asarray(g.node_shapes).reshape(k, 4)
        if not config.attention_shapes:
            shapes = np.where(np.asarray(g.node_ops)[:, None] == "attn", 0, shapes)
        shape_ids[i, :k] = shape_bucket(shapes)
        in_degree[i, :k] = np.minimum(g.in_degree, max_degree)
        out_degree[i, :k] = np.minimum(g.out_degree, max_degree)
        input_dist[i, :k] = _distance_ids(g.input_distance, max_spd)
        spd_fwd[i, :k, :k] = _distance_ids(g.spd_fwd, max_spd)
        spd_bwd[i, :k, :k] = _distance_ids(g.spd_bwd, max_spd)
        mask[i, :k] = True
    return GraphBatch(
        op_ids_BxN=op_ids,
        shape_ids_BxNx4=shape_ids,
        in_degree_BxN=in_degree,
        out_degree_BxN=out_degree,
        input_dist_BxN=input_dist,
        spd_fwd_BxNxN=spd_fwd,
        spd_bwd_BxNxN=spd_bwd,
        mask_BxN=mask,
    )
