"""Vision Transformer (Dosovitskiy et al. 2021), pre-LN, NHWC images.

Random init follows big_vision's ViT (timm's "jax" mode):
- dense kernels (qkv, proj, fc1, fc2): xavier-uniform; the fused qkv kernel is
  drawn as three separate (d, d) xavier kernels, as big_vision's separate
  q/k/v projections are;
- MLP biases N(0, 1e-6), other biases 0;
- patch embedding: lecun-normal (truncated), bias 0;
- pos_embed N(0, 0.02), cls_token 0;
- head: kernel and bias 0 (`head_zeroinit=True`, big_vision's default),
  otherwise lecun-normal kernel and zero bias;
- LayerNorm scale 1, bias 0, epsilon 1e-6.

GELU is the exact (erf) form, as in the ViT paper and its PyTorch ports.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from ghn._compat import host_counted
from ghn.zoo.layers import Mlp, SelfAttention, check_image
from ghn.zoo.spec import ImageSpec, check

POOLS = ("cls", "mean")


class ViTBlock(nnx.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(width, epsilon=1e-6, rngs=rngs)
        self.attn = SelfAttention(width, num_heads, rngs=rngs)
        self.ln2 = nnx.LayerNorm(width, epsilon=1e-6, rngs=rngs)
        self.mlp = Mlp(width, mlp_ratio * width, rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x_BxLxD = x_BxLxD + self.attn(self.ln1(x_BxLxD))
        return x_BxLxD + self.mlp(self.ln2(x_BxLxD))


class VisionTransformer(nnx.Module):
    def __init__(
        self,
        *,
        depth: int,
        width: int,
        num_heads: int,
        mlp_ratio: int = 4,
        patch_size: int = 16,
        image_size: int = 224,
        in_channels: int = 3,
        num_classes: int = 1000,
        pool: str = "cls",
        head_zeroinit: bool = True,
        rngs: nnx.Rngs,
    ):
        self.image_size = image_size
        self.in_channels = in_channels
        self.pool = pool
        p = patch_size
        self.patch_embed = nnx.Conv(
            in_channels,
            width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            kernel_init=jax.nn.initializers.lecun_normal(),
            rngs=rngs,
        )
        num_tokens = (image_size // p) ** 2
        if pool == "cls":
            self.cls_token = nnx.Param(jnp.zeros((1, 1, width)))
            num_tokens += 1
        self.pos_embed = nnx.Param(jax.random.normal(rngs.params(), (1, num_tokens, width)) * 0.02)
        self.blocks = nnx.List(
            [ViTBlock(width, num_heads, mlp_ratio, rngs=rngs) for _ in range(depth)]
        )
        self.norm = nnx.LayerNorm(width, epsilon=1e-6, rngs=rngs)
        head_init = (
            jax.nn.initializers.zeros if head_zeroinit else jax.nn.initializers.lecun_normal()
        )
        self.head = nnx.Linear(width, num_classes, kernel_init=head_init, rngs=rngs)

    def __call__(self, x_BxYxXxC: jax.Array) -> jax.Array:
        check_image(x_BxYxXxC, self.image_size, self.in_channels, "VisionTransformer")
        x_BxYxXxD = self.patch_embed(x_BxYxXxC)
        b, h, w, d = x_BxYxXxD.shape
        x_BxLxD = x_BxYxXxD.reshape(b, h * w, d)
        if self.pool == "cls":
            cls_Bx1xD = jnp.broadcast_to(self.cls_token[...], (b, 1, d))
            x_BxLxD = jnp.concatenate([cls_Bx1xD, x_BxLxD], axis=1)
        x_BxLxD = x_BxLxD + self.pos_embed[...]
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD)
        x_BxLxD = self.norm(x_BxLxD)
        x_BxD = x_BxLxD[:, 0] if self.pool == "cls" else jnp.mean(x_BxLxD, axis=1)
        return self.head(x_BxD)


@dataclasses.dataclass(frozen=True)
class ViTSpec(ImageSpec):
    family: ClassVar[str] = "vit"

    depth: int = 12
    width: int = 768
    num_heads: int = 12
    mlp_ratio: int = 4
    patch_size: int = 16
    image_size: int = 224
    in_channels: int = 3
    num_classes: int = 1000
    pool: str = "cls"
    head_zeroinit: bool = True

    def validate(self) -> None:
        check(self.depth >= 1 and self.width >= 1, f"bad ViT depth/width in {self}")
        check(
            self.num_heads >= 1 and self.width % self.num_heads == 0,
            f"ViT width {self.width} is not divisible by num_heads {self.num_heads}",
        )
        check(
            self.patch_size >= 1 and self.image_size % self.patch_size == 0,
            f"ViT image_size {self.image_size} is not divisible by patch_size {self.patch_size}",
        )
        check(self.pool in POOLS, f"ViT pool {self.pool!r} not in {POOLS}")

    def closed_form_num_params(self) -> int:
        d, h = self.width, self.mlp_ratio * self.width
        tokens = (self.image_size // self.patch_size) ** 2 + (self.pool == "cls")
        embed = self.patch_size**2 * self.in_channels * d + d + tokens * d
        embed += d if self.pool == "cls" else 0
        block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
        return embed + self.depth * block + 2 * d + d * self.num_classes + self.num_classes

    @property
    def name(self) -> str:
        suffix = "" if self.pool == "cls" else f"-{self.pool}"
        return f"vit-d{self.depth}-w{self.width}-h{self.num_heads}-p{self.patch_size}{suffix}"

    def build(self, *, rngs: nnx.Rngs) -> VisionTransformer:
        return VisionTransformer(**self.kwargs(), rngs=host_counted(rngs))
