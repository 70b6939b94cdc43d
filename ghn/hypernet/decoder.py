"""Parameter decoders: LoGAH's low-rank decoder and the GHN-3 tiled baseline.

Both map node embeddings `e_GxD` to matrices of a static size (rows, cols),
where rows = c_out * k_h and cols = c_in * k_w of the parameter's canonical
layout. A 1-D parameter (bias, norm scale) of size C is decoded with
rows=2, cols=C and the caller picks row 0 or 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ghn.errors import ConfigError
from ghn.hypernet import init
from ghn.hypernet.config import GHNConfig


def check_width(n: int, max_dim: int, past_max_dim: str, what: str) -> None:
    """The error for a dimension wider than the low-rank decoder's K (when not wrapping)."""
    if n > max_dim and past_max_dim == "error":
        raise ConfigError(
            f"{what} is wider than this GHN's max_dim K={max_dim}. Use a GHN with a larger "
            f"max_dim (GHNConfig(max_dim={n}) or more), or past_max_dim='wrap' to reuse "
            "decoder columns modulo K (tiling)."
        )


def view_span(n: int, rank: int, max_dim: int) -> tuple[int, int]:
    """(rows of Z's half, columns of P) behind the view's first n rows: they read the flat
    range [0, min(n, K) * r) of the half, row-major over K columns."""
    flat = min(n, max_dim) * rank
    return -(-flat // max_dim), min(flat, max_dim)


def view_read(z_Lxzxn, n: int, rank: int, max_dim: int):
    """The view's first n rows (..., n, r) from the rows of Z's half they span
    (`view_span`), any leading axes; past K row j reuses row j mod K. NumPy or JAX."""
    lead, n_view = z_Lxzxn.shape[:-2], min(n, max_dim)
    flat = z_Lxzxn.reshape(*lead, -1)[..., : n_view * rank]
    v_Lxnxr = flat.reshape(*lead, n_view, rank)
    return v_Lxnxr if n <= max_dim else v_Lxnxr[..., np.arange(n) % max_dim, :]


class _MLP(nnx.Module):
    """d -> 4d -> 8d -> out with ReLU between layers (GHN-3's decoder widths)."""

    def __init__(self, d: int, out: int, *, rngs: nnx.Rngs):
        self.fc1 = init.linear(d, 4 * d, rngs)
        self.fc2 = init.linear(4 * d, 8 * d, rngs)
        self.fc3 = init.linear(8 * d, out, rngs)

    def __call__(self, x):
        return self.fc3(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x)))))


class LowRankDecoder(nnx.Module):
    """LoGAH: W = A @ B with A (rows x r), B (r x cols) decoded from one embedding.

    M = MLP(e) reshaped to (2r, r); Z = ReLU(M) @ W2 + b2 with W2 (r, K), so Z
    is (2r, K). `factors` (GHNConfig) says how Z becomes A and B:

    - "view" (default; the reference code's row-major `view(2K, r)`): A is the
      first `rows` rows of Z[:r] read as a (K, r) matrix, B the transposed first
      `cols` rows of Z[r:] read the same way. Row i of A is Z[i*r // K] at
      columns (i*r mod K) .. + r: each row of a weight has its own r columns of
      W2, and a weight up to K/r wide reads one row of ReLU(M) per factor. Only
      the flat range of Z a parameter reads is computed.
    - "transpose" (LoGAH's equations): A = Z[:r, :rows]^T, B = Z[r:, :cols]
      (each half of ReLU(M) centered over its rows when `center_factors`).
      Every row of A and column of B mixes all 2r rows of M, but every matrix
      of one shape lies in the same row and column spans of W2.

    Only the W2 columns a parameter needs are multiplied, so the cost is
    O(r^2 (rows + cols)), independent of K. Dimensions above K raise a
    ValueError (`past_max_dim="error"`) or reuse decoder column j mod K for
    column j (`"wrap"`, i.e. tiling with period K; with the view, row j of the
    (K, r) reading reuses row j mod K).
    """

    def __init__(self, config: GHNConfig, *, rngs: nnx.Rngs):
        d, r, k = config.d_model, config.rank, config.max_dim
        self.rank, self.max_dim = r, k
        self.view = config.factors == "view"
        self.center = config.center_factors and not self.view
        self.past_max_dim = config.past_max_dim
        self.mlp = _MLP(d, 2 * r * r, rngs=rngs)
        # Fan-in init of a Linear(r, K), stored (r, K) so columns slice cheaply.
        self.w2 = nnx.Param(init.normal(r**-0.5)(rngs.params(), (r, k)))
        self.b2 = nnx.Param(init.zeros(rngs.params(), (k,)))

    def _check(self, n: int, what: str) -> None:
        if not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"{what} must be a positive static int, got {n!r}")
        check_width(n, self.max_dim, self.past_max_dim, f"{what}={n}")

    def hidden(self, e_GxD: jax.Array) -> jax.Array:
        """M = MLP(e) as (G, 2r, r), before the ReLU."""
        r = self.rank
        return self.mlp(e_GxD).reshape(e_GxD.shape[0], 2 * r, r)

    def _columns(self, n: int) -> tuple[jax.Array, jax.Array]:
        w2_rxK, b2_K = self.w2[...], self.b2[...]
        if n <= self.max_dim:
            return w2_rxK[:, :n], b2_K[:n]
        idx = np.arange(n) % self.max_dim
        return jnp.take(w2_rxK, idx, axis=1), jnp.take(b2_K, idx)

    def _z(self, m_Gx2rxr: jax.Array, start: int, stop: int, n: int) -> jax.Array:
        w2_rxn, b2_n = self._columns(n)
        h_Gx2rxr = jax.nn.relu(m_Gx2rxr)
        if self.center:
            # Removes the component shared by all rank-one terms (see GHNConfig):
            # each half (A's rows, B's rows) is centered over its own r rows.
            g, r = h_Gx2rxr.shape[0], self.rank
            halves = h_Gx2rxr.reshape(g, 2, r, r)
            h_Gx2rxr = (halves - halves.mean(axis=2, keepdims=True)).reshape(g, 2 * r, r)
        z_Gxsxn = jnp.einsum("gsr,rn->gsn", h_Gx2rxr[:, start:stop], w2_rxn)
        return z_Gxsxn + b2_n[None, None, :]

    def z_rows(self, e_GxD: jax.Array, start: int, stop: int, num_cols: int) -> jax.Array:
        """Z[:, start:stop, :num_cols], computing nothing else (exposed for tests)."""
        self._check(num_cols, "num_cols")
        return self._z(self.hidden(e_GxD), start, stop, num_cols)

    def _view_rows(self, m_Gx2rxr: jax.Array, start: int, n: int) -> jax.Array:
        """First n rows of Z[:, start:start+r].reshape(G, K, r), row-major (the view),
        computing only the part of Z they read."""
        z_rows, cols = view_span(n, self.rank, self.max_dim)
        z_Gxzxc = self._z(m_Gx2rxr, start, start + z_rows, cols)
        return view_read(z_Gxzxc, n, self.rank, self.max_dim)

    def factors(self, e_GxD: jax.Array, rows: int, cols: int) -> tuple[jax.Array, jax.Array]:
        """(A_GxRxr, B_Gxrxc) with W = A @ B of shape (G, rows, cols)."""
        self._check(rows, "rows")
        self._check(cols, "cols")
        r = self.rank
        m_Gx2rxr = self.hidden(e_GxD)
        if self.view:
            a_GxOxr = self._view_rows(m_Gx2rxr, 0, rows)
            b_GxrxI = self._view_rows(m_Gx2rxr, r, cols).transpose(0, 2, 1)
        else:
            a_GxOxr = self._z(m_Gx2rxr, 0, r, rows).transpose(0, 2, 1)
            b_GxrxI = self._z(m_Gx2rxr, r, 2 * r, cols)
        return a_GxOxr, b_GxrxI

    def full(self, e_GxD: jax.Array, rows: int, cols: int) -> jax.Array:
        """W_GxRxC = A @ B."""
        a_GxOxr, b_GxrxI = self.factors(e_GxD, rows, cols)
        return jnp.einsum("gir,grj->gij", a_GxOxr, b_GxrxI)


class TiledDecoder(nnx.Module):
    """GHN-3 baseline: one (tile, tile) chunk per node, repeated to cover (rows, cols).

    Simplified from GHN-3's conv decoder: the chunk is produced in the
    canonical (c_out*k_h, c_in*k_w) layout, so spatial kernels are tiled like
    channels instead of having their own k x k decoder head. Any size is
    covered (there is no K), which is the defect LoGAH removes: weights wider
    than `tile` repeat with period `tile`.
    """

    def __init__(self, config: GHNConfig, *, rngs: nnx.Rngs):
        self.tile = config.tile
        self.mlp = _MLP(config.d_model, config.tile * config.tile, rngs=rngs)

    def chunk(self, e_GxD: jax.Array) -> jax.Array:
        t = self.tile
        return self.mlp(e_GxD).reshape(e_GxD.shape[0], t, t)

    def factors(self, e_GxD, rows, cols):
        raise NotImplementedError("the tiled decoder is not low rank; use .full(e, rows, cols)")

    def full(self, e_GxD: jax.Array, rows: int, cols: int) -> jax.Array:
        """W_GxRxC: the node's chunk tiled over (rows, cols) and cropped."""
        t = self.tile
        reps = (1, -(-rows // t), -(-cols // t))
        return jnp.tile(self.chunk(e_GxD), reps)[:, :rows, :cols]


Decoder = LowRankDecoder | TiledDecoder


def make_decoder(config: GHNConfig, *, rngs: nnx.Rngs) -> Decoder:
    if config.decoder == "lowrank":
        return LowRankDecoder(config, rngs=rngs)
    return TiledDecoder(config, rngs=rngs)
