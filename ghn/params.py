"""Counting parameters (the one counter every module uses), and combining a predicted
parameter tree with a random init of the same tree."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ghn.errors import ConfigError
from ghn.treepath import entry_key


def count_params(x: Any) -> int:
    """Number of parameter scalars in `x`.

    `x` is an NNX module (its `nnx.Param`s; BatchNorm statistics excluded, and
    abstract modules from `nnx.eval_shape` count the same), an `nnx.State` or
    any pytree of arrays / `jax.ShapeDtypeStruct`s, or a sequence of objects
    with a `.shape` (e.g. a graph's `ParamInfo`s).
    """
    if isinstance(x, nnx.Module):
        x = nnx.state(x, nnx.Param)
    leaves = jax.tree.leaves(x, is_leaf=lambda v: hasattr(v, "shape") and not isinstance(v, dict))
    return sum(math.prod(v.shape) for v in leaves)


def in_repeated_block(path: tuple) -> bool:
    """Whether a state path (`jax.tree_util` keys) runs through a sequence of modules:
    an integer key, as in `blocks[3].attn.qkv.kernel` (an `nnx.List` of blocks)."""
    return any(isinstance(entry_key(k), int) for k in path)


def with_random_blocks(predicted, random):
    """`predicted` outside the model's repeated blocks, `random` inside them.

    Kept from `predicted`: the stem (token, patch and position embeddings, class
    token), the final norm and the output head; every parameter under an integer
    key (`in_repeated_block`) comes from `random`.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, p, r: r if in_repeated_block(path) else p, predicted, random
    )


def _on_matrices(fn, predicted, random):
    """fn(p, r) for every float matrix or kernel (ndim >= 2); vectors keep `predicted`."""

    def one(p, r):
        if p.ndim < 2 or not jnp.issubdtype(p.dtype, jnp.floating):
            return p
        return fn(p, r).astype(p.dtype)

    return jax.tree.map(one, predicted, random)


def mix_with_random(predicted, random, a: float):
    """sqrt(1 - a^2) * predicted + a * random for every matrix and kernel (ndim >= 2).

    Vectors (biases, norm scales) keep their predicted values. For independent
    parts of equal variance the blend keeps the variance, and any a > 0 makes
    the rank-r predicted matrices full rank.
    """
    if not 0.0 <= a <= 1.0:
        raise ConfigError(f"mix must be in [0, 1], got {a}")
    keep = math.sqrt(1.0 - a * a)
    return _on_matrices(lambda p, r: keep * p + a * r, predicted, random)


def add_random(predicted, random, a: float = 1.0):
    """predicted + a * random for every matrix and kernel (ndim >= 2); vectors kept.

    Unlike `mix_with_random`, the prediction is not shrunk: with a = 1 the random
    init keeps its full scale in every direction (the scale the family's init and
    learning rate are made for) and the prediction's few directions (its matrices
    have rank <= r) sit on top of it.
    """
    if not a >= 0.0:
        raise ConfigError(f"mix must be >= 0 to add the random init, got {a}")
    return _on_matrices(lambda p, r: p + a * r, predicted, random)


# How `ghn.calibrate.prepare` combines a prediction with the random init it replaces.
COMBINE = {"add": add_random, "blend": mix_with_random}
