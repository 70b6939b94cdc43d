"""Counting parameters: the one counter every module uses."""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx


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
