"""Node embedding and the GHN-3 "Graphormer" encoder over a `GraphBatch`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ghn.graph import OPS
from ghn.hypernet import init
from ghn.hypernet.batch import SHAPE_VOCAB, GraphBatch
from ghn.hypernet.config import GHNConfig


def _embed(num: int, width: int, std: float, rngs: nnx.Rngs) -> nnx.Embed:
    # Transformer-style init (as GHN-3): each table contributes O(1) to the sum.
    return nnx.Embed(num, width, embedding_init=init.truncated_normal(std), rngs=rngs)


class NodeEmbedding(nnx.Module):
    """Op type + shape (c_out, c_in, k_h, k_w) + in/out degree + input distance."""

    def __init__(self, config: GHNConfig, *, rngs: nnx.Rngs):
        d = config.d_model
        std = d**-0.5
        self.op = _embed(len(OPS), d, std, rngs)
        # One table per axis: "64" as a kernel height means something else
        # than "64" as a channel count.
        self.shape = nnx.List([_embed(len(SHAPE_VOCAB), d // 4, std, rngs) for _ in range(4)])
        self.in_degree = _embed(config.max_degree + 1, d, std, rngs)
        self.out_degree = _embed(config.max_degree + 1, d, std, rngs)
        self.input_dist = _embed(config.max_spd + 2, d, std, rngs)

    def __call__(self, batch: GraphBatch) -> jax.Array:
        shape_BxNxD = jnp.concatenate(
            [emb(batch.shape_ids_BxNx4[..., i]) for i, emb in enumerate(self.shape)], axis=-1
        )
        return (
            self.op(batch.op_ids_BxN)
            + shape_BxNxD
            + self.in_degree(batch.in_degree_BxN)
            + self.out_degree(batch.out_degree_BxN)
            + self.input_dist(batch.input_dist_BxN)
        )


class EncoderLayer(nnx.Module):
    """Pre-LN transformer layer with an additive per-head attention bias."""

    def __init__(self, config: GHNConfig, *, rngs: nnx.Rngs):
        d, self.num_heads = config.d_model, config.num_heads
        self.norm1 = init.layer_norm(d, rngs)
        # No qkv bias, as GHN-3.
        self.qkv = init.linear(d, 3 * d, rngs, use_bias=False)
        self.out = init.linear(d, d, rngs)
        self.norm2 = init.layer_norm(d, rngs)
        self.mlp_in = init.linear(d, config.mlp_ratio * d, rngs)
        self.mlp_out = init.linear(config.mlp_ratio * d, d, rngs)

    def attention(self, x_BxNxD, bias_BxHxNxN, mask_BxN):
        b, n, d = x_BxNxD.shape
        h = self.num_heads
        qkv_BxNx3xHxA = self.qkv(x_BxNxD).reshape(b, n, 3, h, d // h)
        q_BxNxHxA, k_BxNxHxA, v_BxNxHxA = (qkv_BxNx3xHxA[:, :, i] for i in range(3))
        logits_BxHxNxN = jnp.einsum("bqhk,bmhk->bhqm", q_BxNxHxA, k_BxNxHxA) * (d // h) ** -0.5
        logits_BxHxNxN = logits_BxHxNxN + bias_BxHxNxN
        # Padded nodes are never attended to. finfo.min (not -inf) keeps a row
        # with no valid key finite: it becomes uniform instead of NaN.
        neg = jnp.finfo(logits_BxHxNxN.dtype).min
        logits_BxHxNxN = jnp.where(mask_BxN[:, None, None, :], logits_BxHxNxN, neg)
        probs_BxHxNxN = jax.nn.softmax(logits_BxHxNxN, axis=-1)
        out_BxNxHxA = jnp.einsum("bhqm,bmhk->bqhk", probs_BxHxNxN, v_BxNxHxA)
        return self.out(out_BxNxHxA.reshape(b, n, d))

    def __call__(self, x_BxNxD, bias_BxHxNxN, mask_BxN):
        x_BxNxD = x_BxNxD + self.attention(self.norm1(x_BxNxD), bias_BxHxNxN, mask_BxN)
        h_BxNxF = jax.nn.gelu(self.mlp_in(self.norm2(x_BxNxD)))
        return x_BxNxD + self.mlp_out(h_BxNxF)


class Encoder(nnx.Module):
    """Node embeddings -> `num_layers` Graphormer layers -> LayerNorm.

    The attention bias embeds the forward and the backward shortest-path
    distance of each pair; it is computed once and shared by all layers
    (as GHN-3, which builds it in the first layer and passes it on).
    """

    def __init__(self, config: GHNConfig, *, rngs: nnx.Rngs):
        self.embed = NodeEmbedding(config, rngs=rngs)
        heads, num_dist = config.num_heads, config.max_spd + 2
        # Graphormer's init: attention starts near-uniform and learns distances.
        self.spd_fwd = _embed(num_dist, heads, 0.02, rngs)
        self.spd_bwd = _embed(num_dist, heads, 0.02, rngs)
        self.layers = nnx.List([EncoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = init.layer_norm(config.d_model, rngs)

    def attention_bias(self, batch: GraphBatch) -> jax.Array:
        bias_BxNxNxH = self.spd_fwd(batch.spd_fwd_BxNxN) + self.spd_bwd(batch.spd_bwd_BxNxN)
        return bias_BxNxNxH.transpose(0, 3, 1, 2)

    def __call__(self, batch: GraphBatch) -> jax.Array:
        """Node embeddings `nodes_BxNxD`; rows of padded nodes are zero."""
        mask_BxN = jnp.asarray(batch.mask_BxN)
        keep_BxNx1 = mask_BxN[..., None]
        x_BxNxD = self.embed(batch)
        x_BxNxD = jnp.where(keep_BxNx1, x_BxNxD, 0)
        bias_BxHxNxN = self.attention_bias(batch)
        for layer in self.layers:
            x_BxNxD = layer(x_BxNxD, bias_BxHxNxN, mask_BxN)
        return jnp.where(keep_BxNx1, self.final_norm(x_BxNxD), 0)
