"""Float tolerances derived from float32 round-off, never fitted to one machine's output.

Two programs that compute the same float32 function (staged vs one-program prediction,
batched vs unbatched, sharded vs single device, 2 processes vs 1) agree only up
to round-off, and how much depends on the machine: XLA:CPU picks its GEMM and
reduction kernels (blocking, vector width, FMA or not, summation order) per CPU,
so an AVX-512 Intel Xeon and an AMD EPYC sum the same terms in different orders.

Model: each float32 operation rounds with a relative error of at most eps/2
(eps = 2**-23 ~ 1.19e-7). A sum of n terms of size <= |t| accumulates a
round-off of at most ~eps * n * |t| (worst case) and, for the effectively
random signs of real round-off errors, ~eps * sqrt(n) * |t| (a random walk).
A result that depends on a chain of reductions (a network: each matmul,
LayerNorm, softmax, ...) carries the sum of their round-off variances:
relative error ~ eps * sqrt(n_1 + n_2 + ...), as long as no stage amplifies
relative errors by much (LayerNorms and the GHN's rescaling of each predicted
matrix to a fixed std renormalize the scale at every step). Hence

    atol = c * eps * sqrt(reduction) * scale

with `reduction` the total reduction length the compared values depend on
(counted from the code under test, see the helpers below), `scale` the size
of the summed terms (by default max |desired|), and a small constant c = 4 for
the tail: the largest of ~1e4 roughly Gaussian errors is ~4 standard
deviations. A real bug (wrong layout, a missing all-reduce, a wrong scale)
changes values by O(scale), orders of magnitude above this.

`reduction=1` is for elementwise formulas (a fixed handful of roundings, no
sum). Bitwise comparisons stay where the same compiled program runs twice on
the same machine, or where values are copied without arithmetic.
"""

from __future__ import annotations

import math

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23: float32 spacing at 1.0
C = 4.0


def roundoff_atol(reduction: int, scale: float, c: float = C) -> float:
    """c * eps32 * sqrt(reduction) * scale (see the module docstring)."""
    return c * EPS32 * math.sqrt(max(int(reduction), 1)) * float(scale)


def assert_close(
    actual, desired, *, reduction: int, scale: float | None = None, c: float = C, err_msg: str = ""
) -> None:
    """|actual - desired| <= c * eps32 * sqrt(reduction) * scale, elementwise.

    reduction: total number of terms summed along the computation the values
      depend on (the sum over every reduction in the chain); say where it comes
      from at the call site.
    scale: size of the summed terms; max |desired| by default. A desired tensor
      of zeros then demands exact zeros.
    """
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, (actual.shape, desired.shape, err_msg)
    if scale is None:
        scale = float(np.max(np.abs(desired), initial=0.0))
    atol = roundoff_atol(reduction, scale, c)
    np.testing.assert_allclose(
        actual,
        desired,
        rtol=0,
        atol=atol,
        err_msg=f"{err_msg} (atol {atol:.3g} = {c:g} * eps32 * sqrt({reduction}) * {scale:.3g})",
    )


def assert_trees_close(actual, desired, *, reduction: int, c: float = C, err_msg: str = "") -> None:
    """`assert_close` on every leaf, each against its own scale max |desired leaf|."""
    assert jax.tree.structure(actual) == jax.tree.structure(desired), err_msg
    flat = jax.tree_util.tree_flatten_with_path(desired)[0]
    for (path, d), a in zip(flat, jax.tree.leaves(actual)):
        assert_close(
            a, d, reduction=reduction, c=c, err_msg=f"{err_msg}{jax.tree_util.keystr(path)}"
        )


def transformer_reduction(
    *, depth: int, width: int, mlp_width: int, head_dim: int, tokens: int
) -> int:
    """Reduction length along a pre-LN transformer (GHN encoder, ViT, GPT-2), final LN included.

    Per layer: LayerNorm mean and variance (2 * width), q/k/v projection
    (width), logits q.k (head_dim), softmax normalizer and probs @ v
    (2 * tokens; padded or masked tokens contribute exact zeros but still set
    the loop length), output projection (width), second LayerNorm (2 * width),
    MLP in (width) and out (mlp_width).
    """
    per_layer = 2 * width + width + head_dim + 2 * tokens + width + 2 * width + width + mlp_width
    return depth * per_layer + 2 * width


def encoder_reduction(config, *, num_nodes: int) -> int:
    """Reduction length behind one node embedding of `Encoder(config)` (ghn/hypernet/encoder.py).

    num_nodes: padded node count of the graph batch (the attention length).
    """
    d = config.d_model
    return 5 + transformer_reduction(  # 5: the node embedding adds five tables
        depth=config.num_layers,
        width=d,
        mlp_width=config.mlp_ratio * d,
        head_dim=d // config.num_heads,
        tokens=num_nodes,
    )


def ghn_reduction(config, *, num_nodes: int, max_dim: int) -> int:
    """Reduction length behind one parameter predicted by `GHN(config)` (ghn/hypernet).

    num_nodes: padded node count of the graph batch.
    max_dim: largest rows or cols of a decoded matrix (c_out * k_h, c_in * k_w).
    """
    d, r = config.d_model, config.rank
    # The longer of the two forms of ghn/hypernet/predict.py: `predict_leaves` makes
    # Z = ReLU(M) W2 + b2 and W = A @ B; the staged form makes C = A_I B_I, the Gram
    # sandwiches A_I^T G A_I and W = (P^T C) P, each contracted over r + 1.
    decoder = (
        d
        + 4 * d
        + 8 * d  # MLP d -> 4d -> 8d -> 2r^2 (decoder._MLP)
        + r  # centering: mean over the r rows of each half of ReLU(M)
        + r  # Z = ReLU(M) @ W2 or C = A_I B_I, contracted over r
        + max_dim
        + r * r  # ||A B||_F^2 = sum((A^T A) * (B B^T)): rows/cols, then r x r
        + 2 * (r + 1)  # staged: A^T A = A_I^T G A_I with G = P P^T summed over rows/cols
        + 2 * (r + 1)  # W = A @ B over r; staged: (P^T C) P, twice over r + 1
    )
    return encoder_reduction(config, num_nodes=num_nodes) + decoder


def predict_reduction(hyper, model, *example_inputs) -> int:
    """`ghn_reduction` for `hyper.predict(model, *example_inputs)`: its graph's padded
    node count and the largest decoded rows or cols (ghn/hypernet/predict.py)."""
    import ghn
    from ghn.hypernet import make_batch

    graph = ghn.trace(model, *example_inputs)
    max_dim = 1
    for info in graph.params.values():
        c_out, c_in, kh, kw = info.canonical_shape
        max_dim = max(max_dim, c_out * kh, c_in * kw)
    num_nodes = make_batch([graph], hyper.config).num_nodes
    return ghn_reduction(hyper.config, num_nodes=num_nodes, max_dim=max_dim)
