"""Layers and initializers shared by the zoo's families.

Attention is written out (einsum + softmax) instead of calling a fused kernel
so that every model's jaxpr shows the same attention pattern, whatever the
backend, and the graph tracer sees a softmax inside the attention module.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = jax.nn.initializers.Initializer

zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones
# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu"): an untruncated
# normal; JAX's he_normal would be truncated and fan_in.
he_normal_fan_out = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's nn.Linear default (kaiming_uniform_ with a=sqrt(5)) is U(+-1/sqrt(fan_in)).
torch_linear_kernel = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias(fan_in: int) -> Initializer:
    """PyTorch's nn.Linear default bias, U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def xavier_uniform_fused(num_chunks: int) -> Initializer:
    """Xavier-uniform for a kernel that fuses `num_chunks` projections along its output.

    big_vision initializes q, k and v as separate (d, d) kernels; drawing the fused
    (d, 3d) kernel with fan_out = 3d would shrink them by sqrt(2) relative to that.
    """

    def init(key, shape, dtype=jnp.float32):
        fan_in, fan_out = shape[-2], shape[-1] // num_chunks
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def multi_head_attention(qkv_BxLx3D: jax.Array, num_heads: int, *, causal: bool) -> jax.Array:
    """Scaled dot-product attention over a fused [q | k | v] projection (GPT-2/timm layout)."""
    b, length, d3 = qkv_BxLx3D.shape
    d = d3 // 3
    qkv_BxLx3xHxA = qkv_BxLx3D.reshape(b, length, 3, num_heads, d // num_heads)
    q_BxLxHxA = qkv_BxLx3xHxA[:, :, 0]
    k_BxLxHxA = qkv_BxLx3xHxA[:, :, 1]
    v_BxLxHxA = qkv_BxLx3xHxA[:, :, 2]
    scale = 1.0 / math.sqrt(d // num_heads)
    logits_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxA, k_BxLxHxA) * scale
    if causal:
        mask_1x1xLxL = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        logits_BxHxLxL = jnp.where(
            mask_1x1xLxL, logits_BxHxLxL, jnp.finfo(logits_BxHxLxL.dtype).min
        )
    probs_BxHxLxL = jax.nn.softmax(logits_BxHxLxL, axis=-1)
    out_BxLxHxA = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxLxL, v_BxLxHxA)
    return out_BxLxHxA.reshape(b, length, d)


class SelfAttention(nnx.Module):
    """Bidirectional multi-head self-attention (ViT), big_vision initialization."""

    def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.qkv = nnx.Linear(width, 3 * width, kernel_init=xavier_uniform_fused(3), rngs=rngs)
        self.proj = nnx.Linear(
            width, width, kernel_init=jax.nn.initializers.xavier_uniform(), rngs=rngs
        )

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        return self.proj(multi_head_attention(self.qkv(x_BxLxD), self.num_heads, causal=False))


class CausalSelfAttention(nnx.Module):
    """GPT-2's causal self-attention, with Hugging Face parameter names."""

    def __init__(self, width: int, num_heads: int, *, proj_std: float, rngs: nnx.Rngs):
        self.num_heads = num_heads
        normal = jax.nn.initializers.normal
        self.c_attn = nnx.Linear(width, 3 * width, kernel_init=normal(0.02), rngs=rngs)
        self.c_proj = nnx.Linear(width, width, kernel_init=normal(proj_std), rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        return self.c_proj(multi_head_attention(self.c_attn(x_BxLxD), self.num_heads, causal=True))


class Mlp(nnx.Module):
    """ViT MLP block: fc1 -> GELU -> fc2, big_vision initialization."""

    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs):
        xavier = jax.nn.initializers.xavier_uniform()
        tiny = jax.nn.initializers.normal(1e-6)
        self.fc1 = nnx.Linear(width, hidden, kernel_init=xavier, bias_init=tiny, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, width, kernel_init=xavier, bias_init=tiny, rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x_BxLxD), approximate=False))


def check_image(x: jax.Array, image_size: int | None, in_channels: int, model: str) -> None:
    """A clear error for a wrong input instead of a shape mismatch deep inside the model."""
    ok = x.ndim == 4 and x.shape[-1] == in_channels
    if image_size is not None:
        ok = ok and x.shape[1:3] == (image_size, image_size)
    if not ok:
        hw = f"{image_size}, {image_size}" if image_size is not None else "H, W"
        raise ValueError(
            f"{model} expects NHWC images of shape (batch, {hw}, {in_channels}), "
            f"got {tuple(x.shape)}"
        )
