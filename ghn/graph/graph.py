"""The computational graph of a network, as plain Python and NumPy data."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.sparse import csgraph, csr_matrix

from ghn.graph.draw import draw_graph
from ghn.graph.ops import NORM_OPS, OP_INDEX, OPS, OPS_VERSION
from ghn.params import count_params

UNREACHABLE = -1
DEFAULT_SPD_CUTOFF = 50


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One parameter leaf: where it lives, which node owns it, and its layout.

    `out_axes`, `in_axes` and `spatial_axes` partition the non-singleton axes
    of the parameter as the forward pass actually uses it (read off the
    consuming operation, e.g. the contracting dims of `dot_general`), so
    fan-in is exact whatever the storage layout.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    node: int
    role: str
    out_axes: tuple[int, ...]
    in_axes: tuple[int, ...] = ()
    spatial_axes: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def fan_in(self) -> int:
        return math.prod(self.shape[a] for a in self.in_axes + self.spatial_axes)

    @property
    def fan_out(self) -> int:
        return math.prod(self.shape[a] for a in self.out_axes + self.spatial_axes)

    @property
    def canonical_shape(self) -> tuple[int, int, int, int]:
        """(c_out, c_in, k_h, k_w), the layout the decoder predicts in."""
        sizes = [self.shape[a] for a in self.spatial_axes]
        kh = sizes[0] if sizes else 1
        kw = math.prod(sizes[1:])
        c_out = math.prod(self.shape[a] for a in self.out_axes)
        c_in = math.prod(self.shape[a] for a in self.in_axes)
        return (c_out, c_in, kh, kw)

    def _axis_order(self) -> list[int]:
        grouped = list(self.out_axes + self.in_axes + self.spatial_axes)
        return grouped + [a for a in range(len(self.shape)) if a not in grouped]

    def from_canonical(self, x):
        """Maps an array of `canonical_shape` to this parameter's shape.

        Works on NumPy and JAX arrays (uses only reshape/transpose methods).
        """
        order = self._axis_order()
        x = x.reshape([self.shape[a] for a in order])
        return x.transpose(tuple(int(i) for i in np.argsort(order))).reshape(self.shape)

    def to_canonical(self, x):
        return x.transpose(tuple(self._axis_order())).reshape(self.canonical_shape)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> ParamInfo:
        d = dict(d)
        for k in ("shape", "out_axes", "in_axes", "spatial_axes"):
            d[k] = tuple(d[k])
        return cls(**d)


# Saved graphs: 2 since attention nodes carry (heads, head width) in node_shapes.
GRAPH_FORMAT = 2


@dataclasses.dataclass(eq=False)
class Graph:
    """Nodes in topological order, data-flow edges and shortest-path distances.

    Attributes:
      node_ops: operation name per node, from `ghn.graph.ops.OPS`.
      node_names: a readable name per node (parameter path or module scope).
      node_modules: '/'-joined path of the module the node's operation ran in.
      node_params: per node, the '/'-joined `nnx.state` paths it owns.
      node_shared: per node, paths of parameters it uses but does not own
        (e.g. the output head of a GPT-2 with tied embeddings).
      node_shapes: (c_out, c_in, k_h, k_w) of the node's main parameter, 1 for
        absent dims; (heads, head width, 1, 1) for attention; all zeros for
        other parameter-free nodes.
      edges: int32 array (E, 2) of (source, target) data-flow edges.
      params: every parameter leaf, in `nnx.state` flattening order.
      inputs / outputs: nodes of the model's inputs and of its outputs.
      spd_cutoff: shortest-path distance up to which pairs get virtual edges.
    """

    node_ops: list[str]
    node_names: list[str]
    node_modules: list[str]
    node_params: list[list[str]]
    node_shared: list[list[str]]
    node_shapes: np.ndarray
    edges: np.ndarray
    params: dict[str, ParamInfo]
    inputs: list[int]
    outputs: list[int]
    spd_cutoff: int = DEFAULT_SPD_CUTOFF
    model_name: str = ""
    ops_version: int = OPS_VERSION
    _spd: np.ndarray | None = dataclasses.field(default=None, repr=False)

    @property
    def num_nodes(self) -> int:
        return len(self.node_ops)

    @property
    def num_edges(self) -> int:
        return int(self.edges.shape[0])

    @property
    def num_params(self) -> int:
        return count_params(list(self.params.values()))

    @property
    def op_ids(self) -> np.ndarray:
        check_ops(self.node_ops)
        return np.asarray([OP_INDEX[o] for o in self.node_ops], np.int32)

    @property
    def adjacency(self) -> np.ndarray:
        adj_NxN = np.zeros((self.num_nodes, self.num_nodes), np.bool_)
        adj_NxN[self.edges[:, 0], self.edges[:, 1]] = True
        return adj_NxN

    @property
    def in_degree(self) -> np.ndarray:
        return np.bincount(self.edges[:, 1], minlength=self.num_nodes).astype(np.int32)

    @property
    def out_degree(self) -> np.ndarray:
        return np.bincount(self.edges[:, 0], minlength=self.num_nodes).astype(np.int32)

    @property
    def spd_fwd(self) -> np.ndarray:
        """spd_fwd[i, j]: edges on the shortest directed path i -> j, -1 if none."""
        if self._spd is None:
            self._spd = shortest_paths(self.num_nodes, self.edges)
        return self._spd

    @property
    def spd_bwd(self) -> np.ndarray:
        """spd_bwd[i, j]: shortest path from i to j against the edges, -1 if none."""
        return self.spd_fwd.T

    @property
    def input_distance(self) -> np.ndarray:
        """Shortest-path distance of each node from the nearest input, -1 if none."""
        d = self.spd_fwd[self.inputs]
        d = np.where(d < 0, np.iinfo(np.int32).max, d).min(axis=0)
        return np.where(d == np.iinfo(np.int32).max, UNREACHABLE, d).astype(np.int32)

    def virtual_edges(self, cutoff: int | None = None) -> np.ndarray:
        """(source, target) pairs at forward distance 2..cutoff (GHN-2 virtual edges)."""
        cutoff = self.spd_cutoff if cutoff is None else cutoff
        d = self.spd_fwd
        return np.argwhere((d > 1) & (d <= cutoff)).astype(np.int32)

    def param_nodes(self, path: str) -> list[int]:
        """Every node that uses a parameter: its owner first, then sharers."""
        owner = self.params[path].node
        return [owner] + [i for i, s in enumerate(self.node_shared) if path in s]

    @property
    def shared_params(self) -> dict[str, list[int]]:
        """Parameters used by more than one node (e.g. tied embeddings)."""
        return {p: self.param_nodes(p) for s in self.node_shared for p in s}

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in self.node_ops:
            counts[o] = counts.get(o, 0) + 1
        return counts

    def summary(self, max_rows: int | None = 60) -> str:
        rows = [f"{self.model_name or 'graph'}: {self.num_nodes} nodes, {self.num_edges} edges"]
        preds: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for s, t in self.edges:
            preds[int(t)].append(int(s))
        for i in range(self.num_nodes):
            if max_rows is not None and i >= max_rows:
                rows.append(f"... {self.num_nodes - max_rows} more")
                break
            shape = (
                "x".join(str(int(s)) for s in self.node_shapes[i])
                if any(self.node_shapes[i])
                else ""
            )
            tied = f" (uses {', '.join(self.node_shared[i])})" if self.node_shared[i] else ""
            rows.append(
                f"{i:4d} {self.node_ops[i]:<9} {shape:<18} {self.node_names[i]}{tied}"
                f"  <- {preds[i]}"
            )
        return "\n".join(rows)

    def __repr__(self) -> str:
        return (
            f"Graph({self.model_name or 'model'}: nodes={self.num_nodes}, "
            f"edges={self.num_edges}, params={self.num_params:,})"
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (no pickled objects) that `from_arrays` restores exactly."""
        meta = {
            "node_ops": self.node_ops,
            "node_names": self.node_names,
            "node_modules": self.node_modules,
            "node_params": self.node_params,
            "node_shared": self.node_shared,
            "params": [p.to_json() for p in self.params.values()],
            "inputs": self.inputs,
            "outputs": self.outputs,
            "spd_cutoff": self.spd_cutoff,
            "model_name": self.model_name,
            "ops_version": self.ops_version,
            "format": GRAPH_FORMAT,
        }
        return {
            "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
            "node_shapes": np.asarray(self.node_shapes, np.int64),
            "edges": np.asarray(self.edges, np.int32),
            "spd_fwd": np.asarray(self.spd_fwd, np.int32),
        }

    @classmethod
    def from_arrays(cls, arrays) -> Graph:
        meta = json.loads(bytes(np.asarray(arrays["meta"], np.uint8)).decode())
        if meta["ops_version"] != OPS_VERSION:
            raise ValueError(
                f"graph uses op vocabulary v{meta['ops_version']}, this ghn has v{OPS_VERSION}"
            )
        if meta.pop("format", 1) != GRAPH_FORMAT:
            raise ValueError(
                "graph was saved by an older ghn (attention nodes without their head "
                "geometry); trace the model again"
            )
        params = [ParamInfo.from_json(p) for p in meta.pop("params")]
        return cls(
            params={p.path: p for p in params},
            node_shapes=np.asarray(arrays["node_shapes"]),
            edges=np.asarray(arrays["edges"], np.int32).reshape(-1, 2),
            _spd=np.asarray(arrays["spd_fwd"], np.int32),
            **meta,
        )

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, **self.to_arrays())

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        with np.load(path, allow_pickle=False) as f:
            return cls.from_arrays(dict(f))

    def draw(self, path: str | Path, **kwargs) -> Path:
        return draw_graph(self, path, **kwargs)


def shortest_paths(num_nodes: int, edges: np.ndarray) -> np.ndarray:
    if num_nodes == 0:
        return np.zeros((0, 0), np.int32)
    e = np.asarray(edges, np.int64).reshape(-1, 2)
    adj = csr_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(num_nodes, num_nodes))
    d = csgraph.shortest_path(adj, method="D", directed=True, unweighted=True)
    return np.where(np.isinf(d), UNREACHABLE, d).astype(np.int32)


def norm_like(op: str) -> bool:
    return op in NORM_OPS or op == "scale"


def check_ops(ops: Sequence[str]) -> None:
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"unknown node ops {unknown}; vocabulary v{OPS_VERSION} is {OPS}")
