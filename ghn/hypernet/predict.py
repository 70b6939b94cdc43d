"""Predicting every parameter of a model.

Host side, once per architecture: trace the graph, pad it into a
`GraphBatch`, and group its parameters into a static `Plan`. Device side:
encode the graph once, decode each parameter's low-rank factors, rescale the
factors (not the full matrices) with the normalization table, and multiply
each parameter out directly in its final layout. Peak memory is the predicted
parameters plus the GHN plus factors of size O(r * (rows + cols)).

Two forms of the same arithmetic, both writing through `write_factors`:
`predict_leaves`, one pure function of the whole model (what meta-training jits
and differentiates), and `predict_staged`, what `GHN.predict` runs. The latter
uses that the low-rank decoder is linear in its last layer P = [W2; b2]: what
multiplies P does not depend on the width, so its decoding programs serve every
architecture and a new width compiles only one small program per matrix layout
(`uses_basis`). With the transposed factors every parameter is
W = P[:, :rows]^T C P[:, :cols] with an (r+1) x (r+1) core C (`basis_cores`,
`write_basis`); with the view (the default) Z = H P for H = [ReLU(M), 1] of the
parameter's node (`view_hidden`), and each layout's program reads A and B^T out
of Z's rows (`write_view`). Vectors and one-row matrices are finished on the
host, and so is every float32 matrix when the outputs live on CPU devices (one
BLAS GEMM into a buffer JAX adopts without a copy, `host_factors`: nothing to
compile per layout), tested equal to the first form.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ghn.hostmem as hostmem
from ghn.cache import LRUCache
from ghn.graph import Graph, ParamInfo, trace
from ghn.hypernet.batch import GraphBatch, make_batch
from ghn.hypernet.decoder import check_width, view_read, view_span
from ghn.hypernet.normalize import EPS, RULES, Rule, rules_for, target_stds
from ghn.sharding import largest_axis_sharding
from ghn.treepath import path_str


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


def make_plan(graph: Graph, rules: dict[str, Rule] = RULES) -> Plan:
    """How every parameter of `graph` is decoded and scaled, by the table `rules`
    (`ghn.hypernet.normalize.rules_for(...)` with a GHN config's scales)."""
    infos = tuple(graph.params.values())
    stds = target_stds(graph, rules)
    buckets: dict[tuple, list] = {}

    def is_vector(info: ParamInfo) -> bool:
        return sum(1 for a in info.shape if a != 1) <= 1 and rules[info.role].kind == "squash"

    for leaf, info in enumerate(infos):
        rule = rules[info.role]
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


def _rescale(scale_G, sq_G, size):
    """The factor giving a decoded matrix of squared norm `sq_G` and `size` entries the
    normalization table's std `scale_G` (in float64 NumPy for what the host finishes)."""
    if isinstance(sq_G, np.ndarray | np.floating):
        return scale_G / np.sqrt(sq_G / size + EPS)
    return scale_G * jax.lax.rsqrt(sq_G / size + EPS)


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
        return a_GxOxr * _rescale(scale_G, sq, size)[:, None, None], b_GxrxI
    w_GxOxI = decoder.full(e_GxD, rows, cols)
    sq = jnp.sum(jnp.square(w_GxOxI), axis=(1, 2))
    return w_GxOxI * _rescale(scale_G, sq, size)[:, None, None]


def _decode_group(ghn, nodes_NxD, group: Group, low_rank: bool) -> list[tuple[int, Any]]:
    e_GxD = nodes_NxD[jnp.asarray(group.nodes)]
    scale_G = jnp.asarray(group.scales, jnp.float32)
    center_G = jnp.asarray(group.centers, jnp.float32)
    vrow_G = jnp.asarray(group.vector_rows, jnp.int32)
    out = _decode(
        ghn.decoder, e_GxD, group.kind, group.rows, group.cols, vrow_G, scale_G, center_G, low_rank
    )
    if isinstance(out, tuple):
        return [(leaf, (out[0][i], out[1][i])) for i, leaf in enumerate(group.leaves)]
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


def _dense(layout: ParamInfo) -> str | None:
    """A dense kernel's axis order, "io" or "oi"; None for every other layout."""
    order = _direct_einsum(layout)
    plain = layout.canonical_shape[2:] == (1, 1)
    return order if plain and order in ("io", "oi") else None


def write_factors(layout: ParamInfo, lhs, rhs, dtype) -> jax.Array:
    """The parameter W = A @ B in its own layout, from the GEMM's two operands.

    A dense kernel (`_dense`) is lhs @ rhs itself, the operands in the output's order:
    A (rows x k) and B (k x cols), or B^T and A^T for one stored (in, out)
    (`_gemm_operands`). Any other layout takes lhs = A, rhs = B of its canonical
    (c_out*k_h, c_in*k_w) matrix. Both prediction forms write through here.
    """
    # Materialized first: an elementwise producer fused into a dot turns XLA:CPU's GEMM
    # call into a naive loop nest (~6x slower).
    lhs, rhs = jax.lax.optimization_barrier((lhs, rhs))
    if _dense(layout) is not None:
        # Row-major operands in the output's own order: the plain product XLA:CPU's
        # GEMM runs fastest.
        return (lhs.astype(dtype) @ rhs.astype(dtype)).reshape(layout.shape)
    c_out, c_in, kh, kw = layout.canonical_shape
    k = lhs.shape[-1]
    out = _direct_einsum(layout)
    if out is not None:
        # W[(o, h), (i, w)] written in the parameter's own axis order, so XLA emits one
        # GEMM into the output buffer with no transpose copy.
        left = "oh"[: 1 + (kh > 1)]
        right = "iw"[: 1 + (kw > 1)]
        out = "".join(c for c in out if c in left + right)
        a = lhs.reshape((c_out, kh, k) if kh > 1 else (c_out, k))
        b = rhs.reshape((k, c_in, kw) if kw > 1 else (k, c_in))
        w = jnp.einsum(f"{left}r,r{right}->{out}", a.astype(dtype), b.astype(dtype))
        return w.reshape(layout.shape)
    w = jnp.einsum("ohr,riw->oihw", lhs.reshape(c_out, kh, k), rhs.reshape(k, c_in, kw))
    return layout.from_canonical(w).astype(dtype)


def host_factors(layout: ParamInfo, lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """`write_factors` on the host for float32 operands and a float32 parameter: one BLAS
    GEMM into a buffer that JAX on CPU adopts without a copy (`ghn.hostmem`)."""
    out = hostmem.empty(layout.shape, np.float32)
    if _dense(layout) is not None:
        np.matmul(lhs, rhs, out=out.reshape(lhs.shape[0], rhs.shape[1]))
        return out
    c_out, c_in, kh, kw = layout.canonical_shape
    w = (lhs @ rhs).reshape(c_out, kh, c_in, kw).transpose(0, 2, 1, 3)
    out[...] = layout.from_canonical(w)
    return out


def _gemm_operands(layout: ParamInfo, a_Oxk, b_kxI) -> tuple:
    """`write_factors`' operands from canonical factors A (rows x k), B (k x cols)."""
    if _dense(layout) == "io":
        return b_kxI.T, a_Oxk.T
    return a_Oxk, b_kxI


def _to_layout(info: ParamInfo, value, dtype) -> jax.Array:
    """Decoded factors (A, B), (rows, cols) matrix or vector -> the parameter's own array."""
    if isinstance(value, tuple):
        return write_factors(info, *_gemm_operands(info, *value), dtype)
    c_out, c_in, kh, kw = info.canonical_shape
    if value.ndim == 2:
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


def uses_basis(config) -> bool:
    """Whether `predict_staged` decodes `GHN(config)` with width-agnostic programs: the
    low-rank decoder is linear in its last layer P = [W2; b2], so what multiplies P (the
    transpose's core C, the view's H = [ReLU(M), 1]) is decoded for every width and each
    matrix layout only applies P. The transpose's cores decode through `factors` at
    (r+1, r+1), which must fit in K. Not the tiled baseline."""
    if config.decoder != "lowrank":
        return False
    return config.factors == "view" or config.max_dim > config.rank


def basis_cores(decoder, e_GxD, scale_G=None, size_G=None, grams_Gx2xkxk=None) -> jax.Array:
    """C_Gxkxk (k = r + 1) with W = P[:, :rows]^T C P[:, :cols] at every width, P = [W2; b2].

    The low-rank decoder's transposed factors are linear in its last layer, column by
    column: its factors for (rows, cols) are A = P[:, :rows]^T A_I and B = B_I P[:, :cols],
    (A_I, B_I) being its factors when P is the identity; so C = A_I B_I holds all but the
    width. Given `scale_G`, C is rescaled as `_decode` rescales A, with
    A^T A = A_I^T G_rows A_I and B B^T = B_I G_cols B_I^T from the Gram matrices
    G_n = P[:, :n] P[:, :n]^T (`grams_Gx2xkxk`). `decoder` must be the calling program's
    own merged copy: its last layer is replaced. Needs `uses_basis` and the transpose.
    """
    r = decoder.rank
    dtype = decoder.w2.get_value().dtype
    decoder.w2.set_value(jnp.eye(r, r + 1, dtype=dtype))
    decoder.b2.set_value(jnp.eye(r + 1, dtype=dtype)[r])
    a_Gxkxr, b_Gxrxk = decoder.factors(e_GxD, r + 1, r + 1)
    c_Gxkxk = jnp.einsum("gkr,grl->gkl", a_Gxkxr, b_Gxrxk)
    if scale_G is None:
        return c_Gxkxk
    ata = jnp.einsum("gkr,gkl,gls->grs", a_Gxkxr, grams_Gx2xkxk[:, 0], a_Gxkxr)
    bbt = jnp.einsum("grk,gkl,gsl->grs", b_Gxrxk, grams_Gx2xkxk[:, 1], b_Gxrxk)
    sq = jnp.sum(ata * bbt, axis=(1, 2))
    return c_Gxkxk * _rescale(scale_G, sq, size_G)[:, None, None]


def matrix_cores(decoder, nodes_NxD, ints_Gx2, floats_Gx2, grams_Gx2xkxk) -> tuple:
    """The rescaled cores of G matrices (rows of ints: node, stored (in, out); of floats:
    std, rows * cols), each transposed for a kernel stored (in, out): W^T = P_cols^T C^T
    P_rows is then written like W."""
    e_GxD = jnp.take(nodes_NxD, ints_Gx2[:, 0], axis=0)
    c_Gxkxk = basis_cores(decoder, e_GxD, floats_Gx2[:, 0], floats_Gx2[:, 1], grams_Gx2xkxk)
    c_Gxkxk = jnp.where(ints_Gx2[:, 1, None, None] > 0, c_Gxkxk.transpose(0, 2, 1), c_Gxkxk)
    return tuple(c_Gxkxk[i] for i in range(c_Gxkxk.shape[0]))


def vector_rows(decoder, nodes_NxD, ints_Gx2) -> jax.Array:
    """u_Gxk with raw_G = u @ P[:, :cols]: row `vrow` (ints' second column) of each decoded
    (2, cols) matrix, i.e. P[:, vrow]^T C."""
    p_kx2 = jnp.concatenate([decoder.w2.get_value()[:, :2], decoder.b2.get_value()[None, :2]])
    e_GxD = jnp.take(nodes_NxD, ints_Gx2[:, 0], axis=0)
    c_Gxkxk = basis_cores(decoder, e_GxD)
    return jnp.einsum("kg,gkl->gl", p_kx2[:, ints_Gx2[:, 1]], c_Gxkxk)


def view_hidden(decoder, nodes_NxD, nodes_G) -> tuple:
    """H_2rxk = [ReLU(M), 1] (k = r + 1) of each of G nodes: the view's Z = H P with
    P = [W2; b2], whatever the width (the view never centers ReLU(M))."""
    e_GxD = jnp.take(nodes_NxD, nodes_G, axis=0)
    h_Gx2rxr = jax.nn.relu(decoder.hidden(e_GxD))
    ones_Gx2rx1 = jnp.ones((*h_Gx2rxr.shape[:2], 1), h_Gx2rxr.dtype)
    h_Gx2rxk = jnp.concatenate([h_Gx2rxr, ones_Gx2rx1], axis=2)
    return tuple(h_Gx2rxk[i] for i in range(h_Gx2rxk.shape[0]))


def _view_rescaled(a_Oxr, bt_Ixr, scale, size: int):
    """A rescaled as `_decode` rescales it, from A and B^T (B B^T = (B^T)^T B^T), in
    NumPy with einsum's own loops (the one-row matrices of `_host_view`)."""
    ata = np.einsum("Rr,Rs->rs", a_Oxr, a_Oxr)
    bbt = np.einsum("Cr,Cs->rs", bt_Ixr, bt_Ixr)
    return a_Oxr * _rescale(scale, (ata * bbt).sum(), size)


@dataclasses.dataclass(frozen=True)
class WriteKey:
    """What a matrix's write program depends on with the transposed factors: its layout (a
    `ParamInfo` with path, node and role blanked) and dtype. The one compiled program per
    layout that a new width needs: a GEMM and the layout, with no decoder in it."""

    layout: ParamInfo
    dtype: str

    @property
    def dims(self) -> tuple[int, int]:
        """How many columns of P the GEMM's two sides span: (rows, cols) of the canonical
        matrix, (cols, rows) for a kernel stored (in, out)."""
        rows, cols = _matrix_dims(self.layout)
        return (cols, rows) if _dense(self.layout) == "io" else (rows, cols)


@dataclasses.dataclass(frozen=True)
class ViewWriteKey:
    """`WriteKey` of the view (never equal to one): also the rank and K, which fix the
    rows and columns of Z that its factors read."""

    layout: ParamInfo
    dtype: str
    rank: int
    max_dim: int

    @property
    def columns(self) -> int:
        """How many columns of P the program reads: the wider of its two factors' spans."""
        rows, cols = _matrix_dims(self.layout)
        return max(view_span(n, self.rank, self.max_dim)[1] for n in (rows, cols))


def write_basis(key: WriteKey, c_kxk, pt_Fxk, p_kxS) -> jax.Array:
    """A matrix in its layout from its core (`matrix_cores`) and the columns of P it spans:
    P[:, :first]^T and P[:, :second] (`WriteKey.dims`)."""
    return write_factors(key.layout, pt_Fxk @ c_kxk, p_kxS, key.dtype)


def _view_operands(layout: ParamInfo, h_2rxk, p_kxn, scale, rank: int, max_dim: int) -> tuple:
    """A matrix's GEMM operands (`_gemm_operands`) from its node's H (`view_hidden`) and
    P[:, :n]: the view's factors read out of Z = H P, A rescaled to the std `scale`. JAX
    arrays (`write_view`) or float32 NumPy (`_host_matrix`); Gram matrices by matmul, so
    NumPy's are BLAS products."""
    concatenate = np.concatenate if isinstance(h_2rxk, np.ndarray) else jnp.concatenate
    rows, cols = _matrix_dims(layout)
    za, zb = view_span(rows, rank, max_dim)[0], view_span(cols, rank, max_dim)[0]
    # Both factors' rows of Z in one GEMM: a single row alone would be a matrix-vector
    # product, which XLA:CPU compiles as its own code (see `_on_host`).
    z_zxn = concatenate([h_2rxk[:za], h_2rxk[rank : rank + zb]]) @ p_kxn
    a_Oxr = view_read(z_zxn[:za], rows, rank, max_dim)
    bt_Ixr = view_read(z_zxn[za:], cols, rank, max_dim)
    sq = ((a_Oxr.T @ a_Oxr) * (bt_Ixr.T @ bt_Ixr)).sum()
    a_Oxr = a_Oxr * _rescale(scale, sq, rows * cols)
    return _gemm_operands(layout, a_Oxr, bt_Ixr.T)


def write_view(key: ViewWriteKey, h_2rxk, p_kxn, scale) -> jax.Array:
    """A matrix in its layout from its node's H (`view_hidden`), P[:, :n]
    (`ViewWriteKey.columns`) and its target std: the view's factors read out of Z = H P."""
    operands = _view_operands(key.layout, h_2rxk, p_kxn, scale, key.rank, key.max_dim)
    return write_factors(key.layout, *operands, key.dtype)


def _host_transpose(member: _Member, out: np.ndarray, basis: _Basis, memo: dict) -> np.ndarray:
    """A vector's raw values from its row u_k, or a matrix from its rescaled core C_kxk."""
    if member.vrow is not None:
        return out @ basis.columns(member.info.size)
    # Matrix-vector products only (one side is a single row or column): BLAS runs them
    # on one thread (see `_Basis.gram`).
    rows, cols = _matrix_dims(member.info)
    left, right = basis.columns(rows).T, basis.columns(cols)
    if rows == 1:
        return ((left[0] @ out) @ right)[None, :]
    return (left @ (out @ right[:, 0]))[:, None]


def _factor_key(h_2rxk: np.ndarray, start: int, n: int) -> tuple:
    """The memo key of the view's factor read from rows `start` .. of a node's H for n
    indices (`_host_view` and `_view_vector_factors` fill one memo)."""
    return id(h_2rxk), start, n


def _host_view(member: _Member, h_2rxk: np.ndarray, basis: _Basis, memo: dict) -> np.ndarray:
    """A vector's raw values (row `vrow` of its decoded 2 x size matrix), or a rescaled
    matrix, from its node's H: the view's factors read out of Z = H P as `write_view`
    does. `memo` keeps each factor for the node's other parameters (a norm's scale and
    bias share their B).

    Products in einsum's own loops, not BLAS: OpenBLAS threads even a matrix-vector
    product of this size, and on a busy 2-core machine one H row times P[:, :24576] took
    8 ms against 0.2 ms here (see `_Basis.gram`).
    """
    r, k_max = basis.config.rank, basis.config.max_dim
    vector = member.vrow is not None
    rows, cols = (2, member.info.size) if vector else _matrix_dims(member.info)
    factors = []
    for start, n in ((0, rows), (r, cols)):
        key = _factor_key(h_2rxk, start, n)
        if key not in memo:
            # Row j of Z's half holds the flat range [j K, (j + 1) K): only what is read.
            flat = min(n, k_max) * r
            z_f = [
                np.einsum("k,kn->n", h_2rxk[start + j], basis.columns(min(k_max, flat - j * k_max)))
                for j in range(view_span(n, r, k_max)[0])
            ]
            # With H itself: its id is not reused while the memo lives.
            memo[key] = h_2rxk, view_read(np.concatenate(z_f), n, r, k_max)
        factors.append(memo[key][1])
    a_Oxr, bt_Ixr = factors
    if vector:
        return np.einsum("Cr,r->C", bt_Ixr, a_Oxr[member.vrow])
    a_Oxr = _view_rescaled(a_Oxr, bt_Ixr, member.scale, rows * cols)
    return np.einsum("Rr,Cr->RC", a_Oxr, bt_Ixr)


def _view_vector_factors(items: list, basis: _Basis, memo: dict) -> None:
    """Fills `memo` (as `_host_view` keys it) with the B factors of the view's vectors
    (`items`: (member, its node's float64 H)): one BLAS product per vector size over every
    node's rows of Z, instead of one einsum per row and node. GPT-2 Large's 290 vectors:
    0.28 s of einsums in a warm call, 0.7 s in the first."""
    r, k_max = basis.config.rank, basis.config.max_dim
    by_size: dict[int, dict] = {}
    for member, h_2rxk in items:
        n = member.info.size
        key = _factor_key(h_2rxk, r, n)
        if key not in memo:
            by_size.setdefault(n, {})[key] = h_2rxk
    for n, group in by_size.items():
        span, width = view_span(n, r, k_max)
        flat = min(n, k_max) * r
        h_Mxk = np.stack([h[r + j] for h in group.values() for j in range(span)])
        z_GxF = (h_Mxk @ basis.columns(width)).reshape(len(group), span * width)[:, :flat]
        for (key, h), z_F in zip(group.items(), z_GxF, strict=True):
            memo[key] = h, view_read(z_F, n, r, k_max)


def _host_matrix(member: _Member, out: np.ndarray, basis: _Basis) -> np.ndarray:
    """What a matrix's write program computes (`write_view`, `write_basis`), on the host in
    float32 BLAS from its decoded output (the view: its node's H; the transpose: its
    rescaled core, transposed for a kernel stored (in, out))."""
    info = member.info
    rows, cols = _matrix_dims(info)
    if not basis.view:
        first, second = (cols, rows) if _dense(info) == "io" else (rows, cols)
        lhs = basis.columns32(first).T @ out.astype(np.float32)
        return host_factors(info, lhs, basis.columns32(second))
    r, k_max = basis.config.rank, basis.config.max_dim
    n = max(view_span(rows, r, k_max)[1], view_span(cols, r, k_max)[1])
    h_2rxk, scale = out.astype(np.float32), np.float32(member.scale)
    return host_factors(info, *_view_operands(info, h_2rxk, basis.columns32(n), scale, r, k_max))


def _finish_on_host(member: _Member, out: np.ndarray, basis: _Basis, memo=None) -> np.ndarray:
    """A parameter from its decoded output (the transpose: a vector's row u_k or a matrix's
    core C_kxk; the view: its node's H_2rxk), on the host.

    For vectors (< 0.1% of a model's bytes, in many sizes) and matrices of one row or
    column (`_on_host`): the host makes any size without compiling a program for it
    (float64, then the parameter's dtype). `memo`: what the parameters of one call to
    `predict_staged` share (shared only when `out` is already float64).
    """
    if member.vrow is None and not _on_host(*_matrix_dims(member.info)):
        return _host_matrix(member, out, basis)
    finish = _host_view if basis.view else _host_transpose
    memo = {} if memo is None else memo
    value = finish(member, out.astype(np.float64, copy=False), basis, memo)
    if member.vrow is not None:
        value = member.center + member.scale * np.tanh(value)
    return _to_layout(member.info, value, jnp.dtype(member.dtype))


class _HashedKey:
    """A cache key hashed once: a GHN's GraphDef hashes deeply (~2-4 ms), twice per
    lookup in an LRU cache."""

    __slots__ = ("key", "_hash")

    def __init__(self, key: tuple):
        self.key, self._hash = key, hash(key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, _HashedKey) and self.key == other.key


class _Basis:
    """What predicting with one GHN state repeats, recognized by the identity of its
    arrays (`_basis`): its programs' keys, and the decoder's last layer P = [W2; b2] on
    the host with, per width n, P[:, :n] on the device (as rows or columns) and, for the
    transpose, its Gram matrix."""

    def __init__(self, ghn, graphdef, leaves: list, decoder_leaves: list):
        self.refs = [weakref.ref(x) for x in leaves]
        self.config = ghn.config
        self.view = ghn.config.factors == "view"
        self.encoder_key = _HashedKey((graphdef, _signature(leaves)))
        self.signature = _signature(decoder_leaves)
        # What the decoding programs return: their float32 node embeddings through this
        # decoder; per parameter a core C (transpose) or its node's H (view).
        dtype = jnp.result_type(jnp.float32, *(x.dtype for x in decoder_leaves))
        k = ghn.config.rank + 1
        shape = (2 * ghn.config.rank, k) if self.view else (k, k)
        self.decoded = jax.ShapeDtypeStruct(shape, dtype)
        self.p_kxK = None
        if uses_basis(ghn.config):
            w2, b2 = ghn.decoder.w2.get_value(), ghn.decoder.b2.get_value()
            self.dtype = w2.dtype
            p = [np.asarray(w2, np.float64), np.asarray(b2, np.float64)[None]]
            self.p_kxK = np.concatenate(p)
        self._device: dict = {}
        self._grams: dict = {}
        self._columns32: dict = {}
        self.runs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def matches(self, leaves: list) -> bool:
        return len(leaves) == len(self.refs) and all(
            r() is x for r, x in zip(self.refs, leaves, strict=True)
        )

    def columns(self, n: int) -> np.ndarray:
        """P[:, :n] (float64); past K column j reuses column j mod K, as `decoder._columns`."""
        k_max = self.p_kxK.shape[1]
        return self.p_kxK[:, :n] if n <= k_max else self.p_kxK[:, np.arange(n) % k_max]

    def columns32(self, n: int) -> np.ndarray:
        """P[:, :n] in float32, C-contiguous (the host's GEMMs); kept per width."""
        if n not in self._columns32:
            self._columns32[n] = np.ascontiguousarray(self.columns(n), np.float32)
        return self._columns32[n]

    def gram(self, n: int) -> np.ndarray:
        if n not in self._grams:
            p = self.columns(n)
            # einsum's own loops, not BLAS: OpenBLAS threads a (k x n) @ (n x k) product
            # and, on a busy 2-core machine, took 2.1 s for n = 50257 against 71 ms here.
            self._grams[n] = np.einsum("kn,ln->kl", p, p).astype(np.float32)
        return self._grams[n]

    def device(self, n: int, transposed: bool) -> jax.Array:
        """P[:, :n]^T or P[:, :n] on the device: sliced here, so the write programs hold
        nothing but their GEMM (an XLA:CPU slice is ~40 ms of LLVM compile per shape)."""
        if (n, transposed) not in self._device:
            p = self.columns(n)
            host = np.ascontiguousarray((p.T if transposed else p).astype(self.dtype))
            self._device[n, transposed] = jax.device_put(host)
        return self._device[n, transposed]


# GHN states last predicted with (a few: a sweep of one GHN needs one).
_BASES: LRUCache = LRUCache(4)


def _basis(ghn, graphdef, leaves: list, decoder_state) -> _Basis:
    key = tuple(map(id, leaves))
    hit = _BASES.get(key)
    if hit is None or not hit.matches(leaves):
        hit = _Basis(ghn, graphdef, leaves, jax.tree.leaves(decoder_state))
        _BASES.put(key, hit)
    return hit


# Parameters per program call. Matrices go to the width-agnostic cores program 8 at a time
# (the last call repeats its last matrix: a core is ~r^3 flops, the GEMMs take separate
# calls), 1-D parameters 16 at a time; the view decodes nodes 8 at a time.
CORE_CHUNK = 8
VECTOR_CHUNK = 16


def _on_host(rows: int, cols: int) -> bool:
    """Whether a matrix is finished on the host. One of a single row or column (a class
    token) is a matrix-vector product, which XLA:CPU emits as its own LLVM code (~120 ms
    to compile against ~25 ms for a GEMM, measured); on the host it takes microseconds."""
    return min(rows, cols) == 1


@dataclasses.dataclass(frozen=True)
class _Member:
    """One parameter of a call and how it is finished: by its write program (`write`, called
    with its decoded output and then `operands`, already on the device) or on the host
    (`write` None). `vrow` is a vector's decoded row, None for a matrix."""

    leaf: int
    info: ParamInfo
    dtype: str
    scale: float = 1.0
    center: float = 0.0
    vrow: int | None = None
    write: WriteKey | ViewWriteKey | None = None
    operands: tuple = ()


@dataclasses.dataclass
class _BasisRun:
    """What predicting one architecture with one decoder state repeats, made once: the
    decoding calls in dispatch order, each its program's name, its arguments on the
    device and its real members with their index in its output (host-finished first)."""

    calls: list[tuple[str, tuple, list[tuple[_Member, int]]]]


def _chunks(rows: list, size: int) -> list[tuple[list, list]]:
    """(real rows, rows padded to `size` by repeating the last) per call."""
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        out.append((chunk, chunk + [chunk[-1]] * (size - len(chunk))))
    return out


def _write_key(plan: Plan, leaf: int, config) -> WriteKey | ViewWriteKey:
    layout = dataclasses.replace(plan.infos[leaf], path="", node=0, role="")
    if config.factors == "view":
        return ViewWriteKey(layout, plan.dtypes[leaf], config.rank, config.max_dim)
    return WriteKey(layout, plan.dtypes[leaf])


# Where `predict_staged` writes float32 matrices: None picks by where they go (the host
# when every output lives on a CPU device), True / False force it (tests compare both).
WRITE_ON_HOST: bool | None = None


def _writes_on_host(shardings) -> bool:
    """Whether matrices are written on the host: with XLA:CPU the outputs live in host
    memory either way, and a float32 BLAS GEMM into a buffer JAX adopts (`host_factors`)
    costs what a write program does without compiling one per layout (~0.1-0.5 s each
    on 2 cores: a new width of a family compiles nothing). Accelerators keep their write
    programs: their GEMMs are faster and the outputs are born on the device."""
    if WRITE_ON_HOST is not None:
        return WRITE_ON_HOST
    if shardings is None:
        # Where uncommitted outputs go: `jax.default_device` (a device or a platform name)
        # when set, else the default backend's first device.
        device = jax.config.jax_default_device or jax.devices()[0]
        return getattr(device, "platform", device) == "cpu"
    return all(d.platform == "cpu" for s in shardings for d in s.device_set)


def write_keys(plan: Plan, config) -> set[WriteKey | ViewWriteKey]:
    """The write programs `plan`'s matrices need with `GHN(config)` (`uses_basis`)."""
    return {
        _write_key(plan, leaf, config)
        for g in plan.groups
        if g.kind == "matrix" and not _on_host(g.rows, g.cols)
        for leaf in g.leaves
    }


def _written_on_host(host: bool, rows: int, cols: int, dtype: str) -> bool:
    """Whether a matrix is finished on the host: one of a single row or column always
    (`_on_host`), any other float32 one when `host` (`_writes_on_host`)."""
    return _on_host(rows, cols) or (host and np.dtype(dtype) == np.float32)


def _basis_run(plan: Plan, basis: _Basis, host: bool) -> _BasisRun:
    """The transpose's calls: vectors' rows, then matrices' cores."""
    # Per parameter: (member, its int row, float row, the widths of its Gram matrices).
    matrices, vectors = [], []
    for g in plan.groups:
        for i, leaf in enumerate(g.leaves):
            info, dtype = plan.infos[leaf], plan.dtypes[leaf]
            if g.kind == "vector":
                member = _Member(leaf, info, dtype, g.scales[i], g.centers[i], g.vector_rows[i])
                vectors.append((member, (g.nodes[i], g.vector_rows[i])))
                continue
            member = _Member(leaf, info, dtype)
            io = not _on_host(g.rows, g.cols) and _dense(info) == "io"
            if not _written_on_host(host, g.rows, g.cols, dtype):
                key = _write_key(plan, leaf, basis.config)
                first, second = key.dims
                pt, p = basis.device(first, True), basis.device(second, False)
                member = dataclasses.replace(member, write=key, operands=(pt, p))
            floats = (g.scales[i], g.rows * g.cols)
            matrices.append((member, (g.nodes[i], io), floats, (g.rows, g.cols)))
    calls = []
    for real, padded in _chunks(vectors, VECTOR_CHUNK):
        ints = jax.device_put(np.asarray([v[1] for v in padded], np.int32))
        calls.append(("rows", (ints,), [(v[0], i) for i, v in enumerate(real)]))
    # Host-finished first: their cores are ready while the device writes the others.
    matrices.sort(key=lambda m: m[0].write is not None)
    for real, padded in _chunks(matrices, CORE_CHUNK):
        ints = np.asarray([m[1] for m in padded], np.int32)
        floats = np.asarray([m[2] for m in padded], np.float32)
        grams = np.stack([[basis.gram(n) for n in m[3]] for m in padded])
        args = tuple(jax.device_put([ints, floats, grams]))
        calls.append(("cores", args, [(m[0], i) for i, m in enumerate(real)]))
    return _BasisRun(calls)


def _view_run(plan: Plan, basis: _Basis, host: bool) -> _BasisRun:
    """The view's calls: H once per node (a layer's kernel and bias, a norm's scale and
    bias share it), the nodes that the host finishes from first."""
    members = []  # (member, its node)
    for g in plan.groups:
        for i, leaf in enumerate(g.leaves):
            info, dtype = plan.infos[leaf], plan.dtypes[leaf]
            member = _Member(leaf, info, dtype, g.scales[i], g.centers[i])
            if g.kind == "vector":
                member = dataclasses.replace(member, vrow=g.vector_rows[i])
            elif not _written_on_host(host, g.rows, g.cols, dtype):
                member = dataclasses.replace(member, write=_write_key(plan, leaf, basis.config))
            members.append((member, g.nodes[i]))
    members.sort(key=lambda m: m[0].write is not None)
    nodes = list(dict.fromkeys(node for _, node in members))
    slots = {node: slot for slot, node in enumerate(nodes)}
    stds = list(dict.fromkeys(m.scale for m, _ in members if m.write is not None))
    stds = dict(zip(stds, jax.device_put([np.float32(s) for s in stds]), strict=True))
    calls = []
    for _, padded in _chunks(nodes, CORE_CHUNK):
        calls.append(("view", (jax.device_put(np.asarray(padded, np.int32)),), []))
    for member, node in members:
        if member.write is not None:
            p = basis.device(member.write.columns, False)
            member = dataclasses.replace(member, operands=(p, stds[member.scale]))
        call, index = divmod(slots[node], CORE_CHUNK)
        calls[call][2].append((member, index))
    return _BasisRun(calls)


@dataclasses.dataclass(frozen=True)
class LeafKey:
    """What one parameter's prediction program depends on when the decoder has no basis
    (`uses_basis`: the tiled baseline): its decoded (kind, rows, cols), its
    layout (a `ParamInfo` with path, node and role blanked), dtype and decoder kind. Every
    parameter of one layout shares one program, so compile time follows the distinct
    layouts, not the depth or the number of parameters."""

    kind: str
    rows: int
    cols: int
    layout: ParamInfo
    dtype: str
    low_rank: bool


# Matrices of one `LeafKey` go 8, 4, 2 or 1 to a call (the count split into those,
# largest first, so nothing is computed twice): XLA:CPU overlaps one call's decoding and
# GEMMs, which separate calls per matrix would lose (measured ~1.3x slower on 2 cores).
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
    """The program calls that predict every parameter of `plan` (without a basis)."""
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
    values = [(out[0][i], out[1][i]) for i in range(g)] if isinstance(out, tuple) else out
    return tuple(_to_layout(key.layout, values[i], key.dtype) for i in range(g))


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
    """A jitted function and whether `_compile_all` compiled it: each is cached under a
    key that fixes its argument shapes, so one compilation serves every call."""

    fn: Any
    compiled: bool = False


# The decoding programs read node embeddings padded to a multiple of this many rows (not
# to the graph's own size bucket), so a deeper model reuses them: GPT-2 XL has 630 nodes.
NODE_ROWS = 1024


def _node_rows(num_nodes: int) -> int:
    return -(-num_nodes // NODE_ROWS) * NODE_ROWS


def _signature(leaves: list) -> tuple:
    return tuple((tuple(np.shape(x)), str(x.dtype)) for x in leaves)


def _encoder_program(graphdef, key: tuple) -> _Program:
    def run(state, batch):
        nodes_NxD = nnx.merge(graphdef, state).encode(batch)[0].astype(jnp.float32)
        n = nodes_NxD.shape[0]
        return jnp.pad(nodes_NxD, ((0, _node_rows(n) - n), (0, 0)))

    return ENCODERS.get_or_build(
        key, lambda: _Program(jax.jit(run, compiler_options=FAST_COMPILE_OPTIONS))
    )


def _decoder_program(fn, decoder_graphdef, key: tuple, shardings=None) -> _Program:
    """`fn(decoder, nodes_NxD, *args)` as a program, cached under `key` (which names `fn`
    and fixes the argument shapes)."""

    def build():
        def run(decoder_state, nodes_NxD, *args):
            return fn(nnx.merge(decoder_graphdef, decoder_state), nodes_NxD, *args)

        options = FAST_COMPILE_OPTIONS
        return _Program(jax.jit(run, out_shardings=shardings, compiler_options=options))

    return LEAF_PROGRAMS.get_or_build((decoder_graphdef, key, shardings), build)


def _write_program(key: WriteKey | ViewWriteKey, sharding) -> _Program:
    def build():
        run = functools.partial(write_view if isinstance(key, ViewWriteKey) else write_basis, key)
        options = FAST_COMPILE_OPTIONS
        return _Program(jax.jit(run, out_shardings=sharding, compiler_options=options))

    return LEAF_PROGRAMS.get_or_build((key, sharding), build)


def _compile_all(jobs: Sequence[tuple[_Program, tuple]]) -> int:
    """Compiles the (program, example arguments) pairs not compiled yet, side by side
    (XLA compiles without holding the GIL; later calls hit jit's own cache). Returns
    how many it compiled."""
    todo = {id(p): (p, args) for p, args in jobs if not p.compiled}
    if todo:
        workers = min(len(todo), os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda job: job[0].fn.lower(*job[1]).compile(), todo.values()))
        for program, _ in todo.values():
            program.compiled = True
    return len(todo)


def predict_staged(ghn, prepared: Prepared, shardings=None) -> list[jax.Array]:
    """The parameters of `prepared`'s model (flat-state order), program by program.

    Programs are keyed by what repeats, not by the model: the graph's encoding (per
    graph-size bucket); with the low-rank decoder (`uses_basis`), the width-agnostic
    decoding of what multiplies P (the transpose: every matrix's core and vector's row,
    `matrix_cores` and `vector_rows`; the view: every node's H, `view_hidden`), then per
    matrix layout a program that applies P and writes it (`write_basis`, `write_view`),
    while vectors are finished on the host. With CPU outputs (`_writes_on_host`) the host
    writes the matrices too, so a new width of a family compiles nothing; on an
    accelerator it compiles only its write programs. The tiled decoder compiles a
    program per layout (`LeafKey`). The
    programs a call needs are compiled together, in parallel threads. Differentiable
    w.r.t. the GHN: under `jax.grad` or `jax.jit`, `predict_leaves` is traced into the
    caller's program.
    """
    graphdef, state = nnx.split(ghn)
    state_leaves = jax.tree.leaves(state)
    if any(isinstance(x, jax.core.Tracer) for x in state_leaves):
        return predict_leaves(ghn, prepared.batch, prepared.plan)
    decoder_graphdef, decoder_state = nnx.split(ghn.decoder)
    basis = _basis(ghn, graphdef, state_leaves, decoder_state)
    encode = _encoder_program(graphdef, (basis.encoder_key, prepared.batch_key))
    rows = _node_rows(prepared.batch.num_nodes)
    nodes = jax.ShapeDtypeStruct((rows, ghn.config.d_model), jnp.float32)
    leaves: list[Any] = [None] * len(prepared.plan.infos)
    if not uses_basis(ghn.config):
        programs = (encode, state, prepared.batch), (decoder_graphdef, decoder_state)
        _predict_calls(ghn, prepared, shardings, (*programs, (basis.signature, rows)), leaves)
        return leaves
    host = _writes_on_host(shardings)
    runs = basis.runs.setdefault(prepared, {})
    if host not in runs:
        make_run = _view_run if basis.view else _basis_run
        runs[host] = make_run(prepared.plan, basis, host)
    run = runs[host]
    decoders, examples = {}, {}
    for name, args, members in run.calls:
        if name not in decoders:
            fn = _DECODING[name]
            key = (name, basis.signature, rows)
            decoders[name] = _decoder_program(fn, decoder_graphdef, key), args
        for m, _ in members:
            if m.write is not None:
                sh = None if shardings is None else shardings[m.leaf]
                examples.setdefault((m.write, sh), (basis.decoded, *m.operands))
    writes = {key: _write_program(*key) for key in examples}
    jobs = [(encode, (state, prepared.batch))]
    jobs += [(program, (decoder_state, nodes, *args)) for program, args in decoders.values()]
    # Longest first: a conv's layout transpose compiles ~3x slower than a dense GEMM.
    order = sorted(examples, key=lambda key: _dense(key[0].layout) is not None)
    jobs += [(writes[key], examples[key]) for key in order]
    _compile_all(jobs)

    nodes_NxD = encode.fn(state, prepared.batch)
    # What the host finishes is dispatched first, so it is ready while the device writes.
    # Per host member: (member, its call's output, its index there).
    host = []
    for name, args, members in run.calls:
        out = decoders[name][0].fn(decoder_state, nodes_NxD, *args)
        for m, i in members:
            if m.write is None:
                host.append((m, out, i))
            else:
                sh = None if shardings is None else shardings[m.leaf]
                leaves[m.leaf] = writes[m.write, sh].fn(out[i], *m.operands)
    fetched, inputs, memo = {}, [], {}
    for m, out, i in host:
        if isinstance(out, tuple):  # one array per parameter or node
            out, i = out[i], None
        if id(out) not in fetched:
            fetched[id(out)] = np.asarray(out, np.float64)
        x = fetched[id(out)]
        inputs.append((m, x if i is None else x[i]))
    if basis.view:
        _view_vector_factors([(m, h) for m, h in inputs if m.vrow is not None], basis, memo)
    values = [_finish_on_host(m, x, basis, memo) for m, x in inputs]
    sh = None if shardings is None else [shardings[m.leaf] for m, _, _ in host]
    for (m, _, _), value in zip(host, jax.device_put(values, sh), strict=True):
        leaves[m.leaf] = value
    return leaves


# The width-agnostic decoding programs by name (`_BasisRun.calls`).
_DECODING = {"cores": matrix_cores, "rows": vector_rows, "view": view_hidden}


def _predict_calls(ghn, prepared: Prepared, shardings, programs: tuple, leaves: list) -> None:
    """`predict_staged` for decoders without a basis: a program per `LeafKey`.

    programs: the encoder's program and its arguments (state, batch), the decoder's split
    (graphdef, state), and the decoding programs' key beyond the `LeafKey`.
    """
    (encode, state, batch), (decoder_graphdef, decoder_state), key = programs
    calls, args = prepared.calls(ghn.config.decoder == "lowrank")
    nodes = jax.ShapeDtypeStruct((key[-1], ghn.config.d_model), jnp.float32)
    decoders = []
    for call in calls:
        sh = None
        if shardings is not None:
            sh = tuple(shardings[i] for i in call.leaves)
            sh += (sh[-1],) * (len(call.ints_Gx2) - len(sh))

        def fn(decoder, nodes_NxD, ints_Gx2, floats_Gx2, key=call.key):
            return predict_call(decoder, nodes_NxD, key, ints_Gx2, floats_Gx2)

        decoders.append(_decoder_program(fn, decoder_graphdef, (call.key, *key), sh))
    jobs = [(encode, (state, batch))]
    jobs += [(fn, (decoder_state, nodes, *a)) for fn, a in zip(decoders, args, strict=True)]
    _compile_all(jobs)
    nodes_NxD = encode.fn(state, batch)
    for program, call, a in zip(decoders, calls, args, strict=True):
        values = program.fn(decoder_state, nodes_NxD, *a)
        for leaf, value in zip(call.leaves, values, strict=False):
            leaves[leaf] = value


@dataclasses.dataclass(eq=False)
class Prepared:
    """Everything host-side that `predict` needs for one architecture (hashed by identity:
    what a decoder state derives for it is kept in `_Basis.runs`)."""

    graph: Graph
    batch: GraphBatch
    plan: Plan
    treedef: Any
    _calls: dict = dataclasses.field(default_factory=dict, repr=False)

    @functools.cached_property
    def batch_key(self) -> tuple:
        """The batch's shapes and dtypes (part of the encoder program's key)."""
        return _input_key(self.batch)

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
    plan = make_plan(graph, rules_for(config.embedding_scale, config.position_scale))
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
        path_str(p)
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
