"""Randomly wired cell networks in the spirit of DeepNets-1M (Knyazev et al. 2021).

A network is a stem (conv3x3 + norm), a sequence of cells and a classifier
(global average pool + `head`). Like DARTS, every network has two genotypes:
`normal` for normal cells and `reduce` for reduction cells. A genotype is a
tuple of intermediate nodes `(op, input_index)`: node i (1-based) applies `op`
to node `input_index` < i, where node 0 is the cell input. The cell output
merges the nodes no later node reads ("loose ends", as in ENAS/DARTS) by
summing them, or by concatenating them and mapping back to C channels with a
ReLU-conv1x1-norm (`merge`).

A reduction cell halves the resolution and doubles the channels: its input
first goes through `pre`, a ReLU-conv1x1(stride 2)-norm, so that every op
inside a cell keeps its input's shape.

Ops (all stride 1, shape-preserving):
- conv1x1/3x3/5x5: ReLU-conv-norm;
- sep_conv3x3/5x5: ReLU-depthwise conv-pointwise 1x1 conv-norm;
- dil_conv3x3/5x5: the same with the depthwise conv dilated by 2 (DARTS's
  DilConv, which DeepNets-1M uses; a full dilated conv would cost C times more);
- max_pool3x3, avg_pool3x3 (borders averaged over valid pixels); identity;
- se: squeeze-and-excite, global average pool, 1x1 conv to max(C//4, 4),
  ReLU, 1x1 conv back to C, sigmoid gate multiplied into the input.

`norm` is per network: "bn" (BatchNorm), "ln" (LayerNorm over channels) or
"none" (then convs carry a bias).

Random init is torchvision's (as for the ResNets): conv kernels He-normal with
fan_out, norm scale 1 and bias 0, conv biases 0, and PyTorch's default
nn.Linear init for `head`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import operator
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from ghn._compat import host_counted
from ghn.zoo.layers import check_image, he_normal_fan_out, torch_linear_bias, torch_linear_kernel
from ghn.zoo.spec import ImageSpec, check

OPS = (
    "conv1x1",
    "conv3x3",
    "conv5x5",
    "sep_conv3x3",
    "sep_conv5x5",
    "dil_conv3x3",
    "dil_conv5x5",
    "max_pool3x3",
    "avg_pool3x3",
    "se",
    "identity",
)
NORMS = ("bn", "ln", "none")
MERGES = ("sum", "concat")

Genotype = tuple[tuple[str, int], ...]


def make_norm(kind: str, channels: int, *, rngs: nnx.Rngs) -> nnx.Module | None:
    if kind == "bn":
        return nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, rngs=rngs)
    if kind == "ln":
        return nnx.LayerNorm(channels, epsilon=1e-5, rngs=rngs)
    return None


def conv(
    c_in: int,
    c_out: int,
    kernel: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    use_bias: bool,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    return nnx.Conv(
        c_in,
        c_out,
        (kernel, kernel),
        strides=(stride, stride),
        padding="SAME",
        kernel_dilation=(dilation, dilation),
        feature_group_count=groups,
        use_bias=use_bias,
        kernel_init=he_normal_fan_out,
        rngs=rngs,
    )


class ConvOp(nnx.Module):
    """[ReLU]-conv-norm."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        *,
        norm: str,
        stride: int = 1,
        relu: bool = True,
        rngs: nnx.Rngs,
    ):
        self.relu = relu
        self.conv = conv(c_in, c_out, kernel, stride=stride, use_bias=norm == "none", rngs=rngs)
        self.norm = make_norm(norm, c_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(jax.nn.relu(x) if self.relu else x)
        return x if self.norm is None else self.norm(x)


class SepConvOp(nnx.Module):
    """ReLU-depthwise conv (optionally dilated)-pointwise conv-norm."""

    def __init__(self, channels: int, kernel: int, *, dilation: int, norm: str, rngs: nnx.Rngs):
        self.depthwise = conv(
            channels,
            channels,
            kernel,
            dilation=dilation,
            groups=channels,
            use_bias=False,
            rngs=rngs,
        )
        self.pointwise = conv(channels, channels, 1, use_bias=norm == "none", rngs=rngs)
        self.norm = make_norm(norm, channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.pointwise(self.depthwise(jax.nn.relu(x)))
        return x if self.norm is None else self.norm(x)


class PoolOp(nnx.Module):
    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "max":
            return nnx.max_pool(x, (3, 3), strides=(1, 1), padding="SAME")
        # DARTS averages over the valid pixels only, so borders are not darkened.
        return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=False)


class SqueezeExcite(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        hidden = max(channels // 4, 4)
        self.squeeze = conv(channels, hidden, 1, use_bias=True, rngs=rngs)
        self.excite = conv(hidden, channels, 1, use_bias=True, rngs=rngs)

    def __call__(self, x_BxYxXxC: jax.Array) -> jax.Array:
        s_Bx1x1xC = jnp.mean(x_BxYxXxC, axis=(1, 2), keepdims=True)
        gate_Bx1x1xC = jax.nn.sigmoid(self.excite(jax.nn.relu(self.squeeze(s_Bx1x1xC))))
        return x_BxYxXxC * gate_Bx1x1xC


class Identity(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def make_op(op: str, channels: int, *, norm: str, rngs: nnx.Rngs) -> nnx.Module:
    if op.startswith("conv"):
        return ConvOp(channels, channels, int(op[-1]), norm=norm, rngs=rngs)
    if op.startswith(("sep_conv", "dil_conv")):
        dilation = 2 if op.startswith("dil") else 1
        return SepConvOp(channels, int(op[-1]), dilation=dilation, norm=norm, rngs=rngs)
    if op.endswith("pool3x3"):
        return PoolOp(op[:3])
    if op == "se":
        return SqueezeExcite(channels, rngs=rngs)
    if op == "identity":
        return Identity()
    raise ValueError(f"unknown cell op {op!r}; valid: {OPS}")


def loose_ends(genotype: Genotype) -> tuple[int, ...]:
    """Intermediate nodes (1-based) that no later node reads: the cell's outputs."""
    used = {i for _, i in genotype}
    return tuple(n for n in range(1, len(genotype) + 1) if n not in used)


class Cell(nnx.Module):
    def __init__(
        self,
        genotype: Genotype,
        c_in: int,
        c_out: int,
        *,
        reduction: bool,
        norm: str,
        merge: str,
        rngs: nnx.Rngs,
    ):
        self.inputs = tuple(i for _, i in genotype)
        self.outputs = loose_ends(genotype)
        if reduction or c_in != c_out:
            stride = 2 if reduction else 1
            self.pre = ConvOp(c_in, c_out, 1, stride=stride, norm=norm, rngs=rngs)
        else:
            self.pre = None
        self.ops = nnx.List([make_op(op, c_out, norm=norm, rngs=rngs) for op, _ in genotype])
        if merge == "concat":
            c_cat = len(self.outputs) * c_out
            self.merge = ConvOp(c_cat, c_out, 1, norm=norm, rngs=rngs)
        else:
            self.merge = None

    def __call__(self, x: jax.Array) -> jax.Array:
        nodes = [x if self.pre is None else self.pre(x)]
        for op, i in zip(self.ops, self.inputs):
            nodes.append(op(nodes[i]))
        outs = [nodes[n] for n in self.outputs]
        if self.merge is None:
            return functools.reduce(operator.add, outs)
        return self.merge(jnp.concatenate(outs, axis=-1))


class CellNet(nnx.Module):
    def __init__(
        self,
        *,
        normal: Genotype,
        reduce: Genotype,
        num_cells: int,
        reductions: tuple[int, ...],
        width: int,
        norm: str = "bn",
        merge: str = "sum",
        image_size: int = 32,
        in_channels: int = 3,
        num_classes: int = 10,
        stem_stride: int = 1,
        rngs: nnx.Rngs,
    ):
        del image_size  # global pooling makes the network resolution-agnostic
        self.in_channels = in_channels
        self.stem = ConvOp(
            in_channels, width, 3, stride=stem_stride, relu=False, norm=norm, rngs=rngs
        )
        cells = []
        c = width
        for i in range(num_cells):
            reduction = i in reductions
            c_out = 2 * c if reduction else c
            genotype = reduce if reduction else normal
            cells.append(
                Cell(genotype, c, c_out, reduction=reduction, norm=norm, merge=merge, rngs=rngs)
            )
            c = c_out
        self.cells = nnx.List(cells)
        self.head = nnx.Linear(
            c,
            num_classes,
            kernel_init=torch_linear_kernel,
            bias_init=torch_linear_bias(c),
            rngs=rngs,
        )

    def __call__(self, x_BxYxXxC: jax.Array) -> jax.Array:
        check_image(x_BxYxXxC, None, self.in_channels, "CellNet")
        x = self.stem(x_BxYxXxC)
        for cell in self.cells:
            x = cell(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


def _check_genotype(genotype: Genotype, which: str) -> None:
    check(len(genotype) >= 1, f"CellNet {which} genotype needs at least one node")
    for n, node in enumerate(genotype, start=1):
        check(
            len(node) == 2 and node[0] in OPS,
            f"CellNet {which} node {n} is {node!r}; expected (op, input) with op in {OPS}",
        )
        check(
            isinstance(node[1], int) and 0 <= node[1] < n,
            f"CellNet {which} node {n} reads node {node[1]!r}; it may read nodes 0..{n - 1}",
        )


_DEFAULT_NORMAL = (("sep_conv3x3", 0), ("conv1x1", 0), ("se", 1), ("identity", 2))
_DEFAULT_REDUCE = (("max_pool3x3", 0), ("dil_conv3x3", 0), ("avg_pool3x3", 1))


@dataclasses.dataclass(frozen=True)
class CellNetSpec(ImageSpec):
    family: ClassVar[str] = "cellnet"

    normal: Genotype = _DEFAULT_NORMAL
    reduce: Genotype = _DEFAULT_REDUCE
    num_cells: int = 5
    reductions: tuple[int, ...] = (1, 3)
    width: int = 32
    norm: str = "bn"
    merge: str = "sum"
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    stem_stride: int = 1

    def validate(self) -> None:
        _check_genotype(self.normal, "normal")
        _check_genotype(self.reduce, "reduce")
        check(self.num_cells >= 1, f"CellNet num_cells must be >= 1, got {self.num_cells}")
        check(
            list(self.reductions) == sorted(set(self.reductions))
            and all(0 <= r < self.num_cells for r in self.reductions),
            f"CellNet reductions {self.reductions} must be increasing cell indices "
            f"in [0, {self.num_cells})",
        )
        check(self.width >= 1, f"CellNet width must be >= 1, got {self.width}")
        check(self.norm in NORMS, f"CellNet norm {self.norm!r} not in {NORMS}")
        check(self.merge in MERGES, f"CellNet merge {self.merge!r} not in {MERGES}")

    def closed_form_num_params(self) -> int:
        extra = 0 if self.norm == "none" else 1  # norm: scale and bias; else conv bias

        def conv_op(c_in: int, c_out: int, k: int) -> int:
            return k * k * c_in * c_out + c_out * (1 + extra)

        def op_params(op: str, c: int) -> int:
            if op.startswith("conv"):
                return conv_op(c, c, int(op[-1]))
            if op.startswith(("sep_conv", "dil_conv")):
                return int(op[-1]) ** 2 * c + conv_op(c, c, 1)
            if op == "se":
                h = max(c // 4, 4)
                return 2 * c * h + h + c
            return 0

        total = conv_op(self.in_channels, self.width, 3)
        c = self.width
        for i in range(self.num_cells):
            reduction = i in self.reductions
            genotype = self.reduce if reduction else self.normal
            c_out = 2 * c if reduction else c
            total += conv_op(c, c_out, 1) if reduction else 0
            total += sum(op_params(op, c_out) for op, _ in genotype)
            if self.merge == "concat":
                total += conv_op(len(loose_ends(genotype)) * c_out, c_out, 1)
            c = c_out
        return total + c * self.num_classes + self.num_classes

    @property
    def name(self) -> str:
        # The genotypes do not fit in a short name; a stable digest tells specs apart.
        digest = hashlib.sha1(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()
        return (
            f"cellnet-c{self.num_cells}-w{self.width}-n{len(self.normal)}r{len(self.reduce)}"
            f"-{self.norm}-{self.merge}-{digest[:6]}"
        )

    def build(self, *, rngs: nnx.Rngs) -> CellNet:
        return CellNet(**self.kwargs(), rngs=host_counted(rngs))


def darts_reductions(num_cells: int, num_reductions: int = 2) -> tuple[int, ...]:
    """Reduction cells evenly spaced, as in DARTS (cells n//3 and 2n//3 for two)."""
    check(
        num_cells > num_reductions,
        f"{num_cells} cells cannot hold {num_reductions} reduction cells and a normal one",
    )
    return tuple(k * num_cells // (num_reductions + 1) for k in range(1, num_reductions + 1))
