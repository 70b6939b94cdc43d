"""User-written NNX models that are not in the zoo, for tracing and prediction tests."""

import jax
import jax.numpy as jnp
from flax import nnx


class MixerBlock(nnx.Module):
    def __init__(self, tokens: int, channels: int, hidden: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(channels, rngs=rngs)
        self.token_fc1 = nnx.Linear(tokens, hidden, rngs=rngs)
        self.token_fc2 = nnx.Linear(hidden, tokens, rngs=rngs)
        self.norm2 = nnx.LayerNorm(channels, rngs=rngs)
        self.channel_fc1 = nnx.Linear(channels, 2 * channels, rngs=rngs)
        self.channel_fc2 = nnx.Linear(2 * channels, channels, rngs=rngs)

    def __call__(self, x_BxPxC):
        y_BxCxP = jnp.swapaxes(self.norm1(x_BxPxC), 1, 2)
        y_BxCxP = self.token_fc2(jax.nn.gelu(self.token_fc1(y_BxCxP)))
        x_BxPxC = x_BxPxC + jnp.swapaxes(y_BxCxP, 1, 2)
        y_BxPxC = self.channel_fc2(jax.nn.gelu(self.channel_fc1(self.norm2(x_BxPxC))))
        return x_BxPxC + y_BxPxC


class MLPMixer(nnx.Module):
    """MLP-Mixer (Tolstikhin et al. 2021): token- and channel-mixing MLPs, mean pooling."""

    def __init__(self, depth=2, channels=32, patch=4, image=16, in_ch=1, classes=10, *, rngs):
        tokens = (image // patch) ** 2
        self.stem = nnx.Conv(in_ch, channels, (patch, patch), strides=(patch, patch), rngs=rngs)
        self.blocks = nnx.List(
            [MixerBlock(tokens, channels, 2 * tokens, rngs=rngs) for _ in range(depth)]
        )
        self.norm = nnx.LayerNorm(channels, rngs=rngs)
        self.head = nnx.Linear(channels, classes, rngs=rngs)

    def __call__(self, x_BxYxXxC):
        x = self.stem(x_BxYxXxC)
        x_BxPxC = x.reshape(x.shape[0], -1, x.shape[-1])
        for block in self.blocks:
            x_BxPxC = block(x_BxPxC)
        return self.head(self.norm(x_BxPxC).mean(axis=1))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,)))

    def __call__(self, x):
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * self.weight[...].reshape((1,) * (x.ndim - 1) + (-1,))


def rotary(x_BxLxHxD):
    d = x_BxLxHxD.shape[-1]
    inv_freq = 1.0 / (10000 ** (jnp.arange(0, d, 2) / d))
    angles_LxD2 = jnp.arange(x_BxLxHxD.shape[1])[:, None] * inv_freq[None, :]
    cos = jnp.cos(angles_LxD2)[None, :, None, :]
    sin = jnp.sin(angles_LxD2)[None, :, None, :]
    x1, x2 = x_BxLxHxD[..., : d // 2], x_BxLxHxD[..., d // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class LlamaAttention(nnx.Module):
    def __init__(self, dim, heads, *, rngs):
        self.heads = heads
        self.q_proj = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.k_proj = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)

    def __call__(self, x_BxLxD):
        b, seq, dim = x_BxLxD.shape
        split = lambda t: t.reshape(b, seq, self.heads, dim // self.heads)  # noqa: E731
        q = rotary(split(self.q_proj(x_BxLxD)))
        k = rotary(split(self.k_proj(x_BxLxD)))
        v = split(self.v_proj(x_BxLxD))
        mask_LxL = jnp.tril(jnp.ones((seq, seq), jnp.bool_))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask_LxL[None, None])
        return self.o_proj(out.reshape(b, seq, dim))


class SwiGLU(nnx.Module):
    def __init__(self, dim, hidden, *, rngs):
        self.gate_proj = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
        self.up_proj = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(hidden, dim, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nnx.Module):
    def __init__(self, dim, heads, hidden, *, rngs):
        self.input_norm = RMSNorm(dim)
        self.attn = LlamaAttention(dim, heads, rngs=rngs)
        self.post_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.input_norm(x))
        return x + self.mlp(self.post_norm(x))


class Llama(nnx.Module):
    """Llama-style decoder: RMSNorm, SwiGLU, rotary embeddings, no biases, untied head."""

    def __init__(self, depth=2, dim=32, heads=4, hidden=64, vocab=64, *, rngs):
        self.embed_tokens = nnx.Embed(vocab, dim, rngs=rngs)
        self.layers = nnx.List([LlamaBlock(dim, heads, hidden, rngs=rngs) for _ in range(depth)])
        self.norm = RMSNorm(dim)
        self.lm_head = nnx.Linear(dim, vocab, use_bias=False, rngs=rngs)

    def __call__(self, ids_BxL):
        x = self.embed_tokens(ids_BxL)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


class SqueezeExcite(nnx.Module):
    def __init__(self, ch, *, rngs):
        self.reduce = nnx.Conv(ch, ch // 4, (1, 1), rngs=rngs)
        self.expand = nnx.Conv(ch // 4, ch, (1, 1), rngs=rngs)

    def __call__(self, x_BxYxXxC):
        s = x_BxYxXxC.mean(axis=(1, 2), keepdims=True)
        s = jax.nn.sigmoid(self.expand(jax.nn.relu(self.reduce(s))))
        return x_BxYxXxC * s


class SmallCNN(nnx.Module):
    """Conv-BN-ReLU, depthwise-separable and dilated convs, SE, pooling, concat merge."""

    def __init__(self, ch=16, classes=10, *, rngs):
        self.conv = nnx.Conv(3, ch, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(ch, rngs=rngs)
        self.dw = nnx.Conv(ch, ch, (3, 3), feature_group_count=ch, use_bias=False, rngs=rngs)
        self.pw = nnx.Conv(ch, ch, (1, 1), use_bias=False, rngs=rngs)
        self.dil = nnx.Conv(ch, ch, (3, 3), kernel_dilation=(2, 2), use_bias=False, rngs=rngs)
        self.se = SqueezeExcite(ch, rngs=rngs)
        self.merge = nnx.Conv(2 * ch, ch, (1, 1), rngs=rngs)
        self.head = nnx.Linear(ch, classes, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn(self.conv(x)))
        a = self.pw(self.dw(x))
        b = nnx.max_pool(self.dil(x), (3, 3), strides=(1, 1), padding="SAME")
        x = self.merge(jnp.concatenate([self.se(a), b], axis=-1)) + x
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        return self.head(x.mean(axis=(1, 2)))
