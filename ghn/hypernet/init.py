"""Parameter initializers of the GHN that draw on the host.

Each has the `jax.nn.initializers` signature `(key, shape, dtype)` and the
distribution of the JAX initializer it is named after, but draws with NumPy
from a generator seeded by the key's data and returns the array on the device.
Why: JAX's initializers run eagerly as one XLA program per parameter shape;
building LoGAH-Tiny compiled ~37 of them (4.3 s in a fresh process on 2 CPU
cores). Same key, same values.

Under tracing (`nnx.eval_shape`, `jax.jit`) the key has no value: the JAX
initializer runs instead, with the same distribution but other values. Code
that needs a GHN's actual initial values (the trainer) builds it eagerly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Initializer = Callable[..., jax.Array]

# Std of a standard normal truncated to (-2, 2), as in jax.nn.initializers.variance_scaling.
TRUNCATED_STD = 0.87962566103423978
_BLOCK = 1 << 16


def _generator(key: jax.Array) -> np.random.Generator | None:
    """A NumPy generator seeded by a concrete key's data; None for a traced key."""
    if isinstance(key, jax.core.Tracer):
        return None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = np.asarray(key, np.uint32).ravel().tolist()
    return np.random.Generator(np.random.Philox(np.random.SeedSequence(words)))


def _float(dtype) -> type:
    """The NumPy type to draw in: float64 only for parameters wider than float32."""
    return np.float64 if np.dtype(dtype).itemsize > 4 else np.float32


def _truncated(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Standard normal conditioned on |x| < 2 (rejection: ~4.6% redrawn per round)."""
    work = _float(dtype)
    flat = np.empty(math.prod(shape), work)
    # Block by block, so the rejection test's temporaries stay in cache and small
    # (whole-array ones would double the peak memory of a large GHN's build).
    for start in range(0, flat.size, _BLOCK):
        block = flat[start : start + _BLOCK]
        rng.standard_normal(dtype=work, out=block)
        bad = np.flatnonzero(np.abs(block) >= 2)
        while bad.size:
            block[bad] = rng.standard_normal(bad.size, dtype=work)
            bad = bad[np.abs(block[bad]) >= 2]
    return flat.reshape(shape)


def _host(
    draw: Callable[[np.random.Generator, tuple[int, ...], Any], np.ndarray],
    traced: Initializer,
) -> Initializer:
    """`draw(rng, shape, dtype)` on the host for a concrete key, `traced` for a traced one."""

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        rng = _generator(key)
        if rng is None:
            return traced(key, shape, dtype)
        x = np.asarray(draw(rng, tuple(shape), dtype), dtype=dtype)
        # Not jnp.asarray: in JAX 0.10 it compiles a program per shape even for a NumPy
        # array of the right dtype (~20 ms each); device_put only copies.
        return jax.device_put(x)

    return init


def truncated_normal(std: float) -> Initializer:
    """`std` times a standard normal truncated to (-2, 2) (jax.nn.initializers.truncated_normal).

    The standard deviation of the values is `TRUNCATED_STD * std`.
    """
    return _host(
        lambda rng, shape, dtype: std * _truncated(rng, shape, dtype),
        jax.nn.initializers.truncated_normal(std),
    )


def lecun_normal() -> Initializer:
    """Truncated normal with variance 1 / fan_in (jax.nn.initializers.lecun_normal).

    fan_in is the product of all axes but the last (the output axis), as for
    a Linear kernel (in, out).
    """

    def draw(rng, shape, dtype):
        fan_in = max(1, math.prod(shape[:-1]))
        return fan_in**-0.5 / TRUNCATED_STD * _truncated(rng, shape, dtype)

    return _host(draw, jax.nn.initializers.lecun_normal())


def normal(std: float) -> Initializer:
    """`std` times a standard normal (jax.nn.initializers.normal)."""
    return _host(
        lambda rng, shape, dtype: std * rng.standard_normal(shape, dtype=_float(dtype)),
        jax.nn.initializers.normal(std),
    )


# Constants take no randomness, but JAX's eager `jnp.zeros` compiles per shape too.
zeros = _host(lambda rng, shape, dtype: np.zeros(shape), jax.nn.initializers.zeros)
ones = _host(lambda rng, shape, dtype: np.ones(shape), jax.nn.initializers.ones)


def linear(d_in: int, d_out: int, rngs: nnx.Rngs, **kwargs) -> nnx.Linear:
    """`nnx.Linear` with flax's default init (lecun normal kernel, zero bias), on the host."""
    return nnx.Linear(d_in, d_out, kernel_init=lecun_normal(), bias_init=zeros, rngs=rngs, **kwargs)


def layer_norm(d: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """`nnx.LayerNorm` with flax's default init (scale one, bias zero), on the host."""
    return nnx.LayerNorm(d, scale_init=ones, bias_init=zeros, rngs=rngs)
