"""GPT-2 (Radford et al. 2019) with Hugging Face parameter names.

Random init follows OpenAI's and Hugging Face's GPT-2 code:
- every Linear kernel (c_attn, c_fc, untied lm_head) and both embeddings
  (wte, wpe): N(0, 0.02); biases 0;
- residual output projections (attn.c_proj, mlp.c_proj): N(0, 0.02/sqrt(2*depth)),
  so the residual stream's variance does not grow with depth;
- LayerNorm scale 1, bias 0, epsilon 1e-5.

GELU is the tanh approximation ("gelu_new"). With `tie_embeddings` the output
head reuses wte (`Embed.attend`), as GPT-2 does; otherwise a bias-free lm_head.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from ghn._compat import host_counted
from ghn.zoo.layers import CausalSelfAttention
from ghn.zoo.spec import ArchSpec, check

normal = jax.nn.initializers.normal


class GPT2MLP(nnx.Module):
    def __init__(self, width: int, hidden: int, *, proj_std: float, rngs: nnx.Rngs):
        self.c_fc = nnx.Linear(width, hidden, kernel_init=normal(0.02), rngs=rngs)
        self.c_proj = nnx.Linear(hidden, width, kernel_init=normal(proj_std), rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        return self.c_proj(jax.nn.gelu(self.c_fc(x_BxLxD), approximate=True))


class GPT2Block(nnx.Module):
    def __init__(
        self, width: int, num_heads: int, mlp_ratio: int, *, proj_std: float, rngs: nnx.Rngs
    ):
        self.ln_1 = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
        self.attn = CausalSelfAttention(width, num_heads, proj_std=proj_std, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
        self.mlp = GPT2MLP(width, mlp_ratio * width, proj_std=proj_std, rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x_BxLxD = x_BxLxD + self.attn(self.ln_1(x_BxLxD))
        return x_BxLxD + self.mlp(self.ln_2(x_BxLxD))


class GPT2(nnx.Module):
    def __init__(
        self,
        *,
        depth: int,
        width: int,
        num_heads: int,
        vocab_size: int = 50257,
        context_length: int = 1024,
        tie_embeddings: bool = True,
        mlp_ratio: int = 4,
        rngs: nnx.Rngs,
    ):
        self.context_length = context_length
        self.tie_embeddings = tie_embeddings
        proj_std = 0.02 / math.sqrt(2 * depth)
        self.wte = nnx.Embed(vocab_size, width, embedding_init=normal(0.02), rngs=rngs)
        self.wpe = nnx.Embed(context_length, width, embedding_init=normal(0.02), rngs=rngs)
        self.blocks = nnx.List(
            [
                GPT2Block(width, num_heads, mlp_ratio, proj_std=proj_std, rngs=rngs)
                for _ in range(depth)
            ]
        )
        self.ln_f = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
        if not tie_embeddings:
            self.lm_head = nnx.Linear(
                width, vocab_size, use_bias=False, kernel_init=normal(0.02), rngs=rngs
            )

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        if tokens_BxL.ndim != 2:
            raise ValueError(
                f"GPT2 expects token ids of shape (batch, seq_len), got {tokens_BxL.shape}"
            )
        length = tokens_BxL.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"sequence length {length} exceeds GPT2 context_length {self.context_length}"
            )
        x_BxLxD = self.wte(tokens_BxL) + self.wpe(jnp.arange(length))[None]
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD)
        x_BxLxD = self.ln_f(x_BxLxD)
        if self.tie_embeddings:
            return self.wte.attend(x_BxLxD)
        return self.lm_head(x_BxLxD)


@dataclasses.dataclass(frozen=True)
class GPT2Spec(ArchSpec):
    family: ClassVar[str] = "gpt2"

    depth: int = 12
    width: int = 768
    num_heads: int = 12
    vocab_size: int = 50257
    context_length: int = 1024
    tie_embeddings: bool = True
    mlp_ratio: int = 4

    def validate(self) -> None:
        check(self.depth >= 1 and self.width >= 1, f"bad GPT-2 depth/width in {self}")
        check(
            self.num_heads >= 1 and self.width % self.num_heads == 0,
            f"GPT-2 width {self.width} is not divisible by num_heads {self.num_heads}",
        )
        check(self.vocab_size >= 1 and self.context_length >= 1, f"bad GPT-2 sizes in {self}")

    def closed_form_num_params(self) -> int:
        d, h, v = self.width, self.mlp_ratio * self.width, self.vocab_size
        block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
        head = 0 if self.tie_embeddings else d * v
        return (v + self.context_length) * d + self.depth * block + 2 * d + head

    @property
    def name(self) -> str:
        suffix = "" if self.tie_embeddings else "-untied"
        return f"gpt2-d{self.depth}-w{self.width}-h{self.num_heads}{suffix}"

    def build(self, *, rngs: nnx.Rngs) -> GPT2:
        return GPT2(**self.kwargs(), rngs=host_counted(rngs))

    def _seq_len(self, seq_len: int | None) -> int:
        return min(self.context_length, 32) if seq_len is None else seq_len

    def input_spec(self, batch_size: int = 2, *, seq_len: int | None = None):
        return jax.ShapeDtypeStruct((batch_size, self._seq_len(seq_len)), jnp.int32)

    def example_input(
        self, batch_size: int = 2, *, seed: int = 0, seq_len: int | None = None
    ) -> jax.Array:
        shape = (batch_size, self._seq_len(seq_len))
        return jax.random.randint(jax.random.key(seed), shape, 0, self.vocab_size, jnp.int32)
