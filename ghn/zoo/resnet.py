"""ResNets (He et al. 2016) in torchvision's layout, NHWC.

Basic blocks (ResNet-18/34) or bottlenecks with the stride on the 3x3 conv
(ResNet-50 "v1.5"), projection shortcuts `downsample` (1x1 conv + BN) where the
shape changes. The ImageNet stem is a 7x7 stride-2 conv and a 3x3 stride-2 max
pool with torchvision's symmetric padding; `small_input=True` uses a 3x3
stride-1 conv and no pool for 28x28 or 32x32 images.

Random init follows torchvision:
- conv kernels: He-normal with fan_out (`kaiming_normal_(mode="fan_out")`),
  untruncated; convs have no bias (a BatchNorm follows every one);
- BatchNorm scale 1, bias 0 (momentum 0.9 = PyTorch's 0.1, epsilon 1e-5);
- fc: PyTorch's nn.Linear default, kernel and bias U(+-1/sqrt(fan_in)).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from ghn._compat import host_counted
from ghn.zoo.layers import check_image, he_normal_fan_out, torch_linear_bias, torch_linear_kernel
from ghn.zoo.spec import ImageSpec, check

BLOCKS = ("basic", "bottleneck")
EXPANSION = {"basic": 1, "bottleneck": 4}


def conv(c_in: int, c_out: int, kernel: int, stride: int = 1, *, rngs: nnx.Rngs) -> nnx.Conv:
    pad = kernel // 2
    return nnx.Conv(
        c_in,
        c_out,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=he_normal_fan_out,
        rngs=rngs,
    )


def batch_norm(channels: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, rngs=rngs)


class Downsample(nnx.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, *, rngs: nnx.Rngs):
        self.conv = conv(c_in, c_out, 1, stride, rngs=rngs)
        self.bn = batch_norm(c_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
    def __init__(self, c_in: int, planes: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = conv(c_in, planes, 3, stride, rngs=rngs)
        self.bn1 = batch_norm(planes, rngs=rngs)
        self.conv2 = conv(planes, planes, 3, rngs=rngs)
        self.bn2 = batch_norm(planes, rngs=rngs)
        needs_projection = stride != 1 or c_in != planes
        self.downsample = Downsample(c_in, planes, stride, rngs=rngs) if needs_projection else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return jax.nn.relu(y + shortcut)


class Bottleneck(nnx.Module):
    def __init__(self, c_in: int, planes: int, stride: int, *, rngs: nnx.Rngs):
        c_out = planes * EXPANSION["bottleneck"]
        self.conv1 = conv(c_in, planes, 1, rngs=rngs)
        self.bn1 = batch_norm(planes, rngs=rngs)
        self.conv2 = conv(planes, planes, 3, stride, rngs=rngs)
        self.bn2 = batch_norm(planes, rngs=rngs)
        self.conv3 = conv(planes, c_out, 1, rngs=rngs)
        self.bn3 = batch_norm(c_out, rngs=rngs)
        needs_projection = stride != 1 or c_in != c_out
        self.downsample = Downsample(c_in, c_out, stride, rngs=rngs) if needs_projection else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return jax.nn.relu(y + shortcut)


class ResNet(nnx.Module):
    def __init__(
        self,
        *,
        block: str = "basic",
        layers: tuple[int, ...] = (2, 2, 2, 2),
        width: int = 64,
        image_size: int = 224,
        in_channels: int = 3,
        num_classes: int = 1000,
        small_input: bool = False,
        rngs: nnx.Rngs,
    ):
        del image_size  # global pooling makes the network resolution-agnostic
        self.in_channels = in_channels
        self.small_input = small_input
        block_cls = BasicBlock if block == "basic" else Bottleneck
        if small_input:
            self.conv1 = conv(in_channels, width, 3, rngs=rngs)
        else:
            self.conv1 = conv(in_channels, width, 7, 2, rngs=rngs)
        self.bn1 = batch_norm(width, rngs=rngs)
        stages = []
        c_in = width
        for i, num_blocks in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block_cls(c_in, planes, stride, rngs=rngs))
                c_in = planes * EXPANSION[block]
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.fc = nnx.Linear(
            c_in,
            num_classes,
            kernel_init=torch_linear_kernel,
            bias_init=torch_linear_bias(c_in),
            rngs=rngs,
        )

    def __call__(self, x_BxYxXxC: jax.Array) -> jax.Array:
        check_image(x_BxYxXxC, None, self.in_channels, "ResNet")
        x = jax.nn.relu(self.bn1(self.conv1(x_BxYxXxC)))
        if not self.small_input:
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return self.fc(jnp.mean(x, axis=(1, 2)))


@dataclasses.dataclass(frozen=True)
class ResNetSpec(ImageSpec):
    family: ClassVar[str] = "resnet"

    block: str = "basic"
    layers: tuple[int, ...] = (2, 2, 2, 2)
    width: int = 64
    image_size: int = 224
    in_channels: int = 3
    num_classes: int = 1000
    small_input: bool = False

    def validate(self) -> None:
        check(self.block in BLOCKS, f"ResNet block {self.block!r} not in {BLOCKS}")
        check(
            len(self.layers) >= 1 and all(n >= 1 for n in self.layers),
            f"ResNet layers must be block counts >= 1 per stage, got {self.layers}",
        )
        check(self.width >= 1, f"ResNet width must be >= 1, got {self.width}")

    def closed_form_num_params(self) -> int:
        k = 3 if self.small_input else 7
        total = k * k * self.in_channels * self.width + 2 * self.width
        c_in = self.width
        for i, num_blocks in enumerate(self.layers):
            p = self.width * 2**i
            c_out = p * EXPANSION[self.block]
            for j in range(num_blocks):
                if self.block == "basic":
                    total += 9 * c_in * p + 9 * p * p + 4 * p
                else:
                    total += c_in * p + 9 * p * p + p * c_out + 4 * p + 2 * c_out
                if (i > 0 and j == 0) or c_in != c_out:
                    total += c_in * c_out + 2 * c_out
                c_in = c_out
        return total + c_in * self.num_classes + self.num_classes

    @property
    def name(self) -> str:
        stages = ".".join(str(n) for n in self.layers)
        suffix = "-small" if self.small_input else ""
        return f"resnet-{self.block}-{stages}-w{self.width}{suffix}"

    def build(self, *, rngs: nnx.Rngs) -> ResNet:
        return ResNet(**self.kwargs(), rngs=host_counted(rngs))
