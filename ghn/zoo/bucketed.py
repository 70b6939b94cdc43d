"""Shape-stable target forwards: one compiled program for every architecture of a bucket.

A `Bucket` holds the maximal sizes of a group of ViTs (or of GPT-2s) that agree
on everything else (`bucket_key`). Inside a bucket, an architecture is a set
of runtime arrays (`arch_arrays`: masks and scalars of fixed shapes), and its
parameters are laid out in the bucket's padded tree (`embed_params`); the
forward (`forward`) runs at the padded shapes, so one XLA program serves the
whole bucket and the meta-batch's architectures can be stacked and mapped over
(`jax.lax.map`: each architecture runs only its own blocks, see `_blocks`).

    bucket = smallest_bucket(specs)
    padded = embed_params(bucket, spec, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    logits = forward(bucket, padded, arch_arrays(bucket, spec), x)   # == model(x)
    params = extract_params(bucket, spec, padded)                     # the model's tree again

Sizes: n = bucket.depth (blocks), D = bucket.width (residual channels),
H = bucket.num_heads (the most heads), S = bucket.sub_heads and A =
bucket.head_width (the attention's sub-head layout, below), F =
bucket.mlp_hidden (max mlp_ratio * width).

Padded tree (`padded_shapes`): the real model's `nnx.to_pure_dict` names, with
the blocks stacked on a leading axis of n under "blocks" (no block index) so
the forward scans over them. Every real element sits at the "top-left corner"
of its padded array once the fused axes are split:
  attention in  blocks/attn/{qkv|c_attn}/kernel  n x D x 3 x D; bias n x 3 x D:
                real column t*d + c ([q | k | v], attention column c) of the (d, 3d)
                kernel sits at (t, c), real residual channel c at c;
  attention out blocks/attn/{proj|c_proj}/kernel  n x D x D;
  MLP           fc1/c_fc n x D x F, fc2/mlp.c_proj n x F x D; LayerNorms n x D;
  outside the blocks only D pads: patch_embed kernel p x p x C x D, cls_token 1 x 1 x D,
                pos_embed 1 x T x D, head kernel D x V; wte V x D, wpe ctx x D, lm_head D x V.
Heads are not an axis of the parameters: the attention columns stay D wide, as
in the real models, so the head count and head width of a bucket's
architectures may differ freely at no cost in parameters. The attention itself
runs on a layout of S sub-heads of A channels: each real head of width a is cut
into ceil(a / A) sub-heads, qkv's columns and proj's rows are gathered to that
layout at runtime (head_cols_SxA; gathering the weights, not the activations,
keeps the gathers and their gradients' scatter-adds off the batch), a head's
logits are the sum of its sub-heads' q.k (head_of_SxH), and its softmax weights
go back to each of its sub-heads for probs.v. A is chosen per bucket so that S x A
(the gathered columns) stays near the width for every architecture of the bucket
(`smallest_bucket`): 8 heads of 32 and 1 head of 256 share S x A = 8 x 32, where
an (H, A) = (8, 256) layout would run every q, k and v matmul 8 times wider than the
model's. So mixing head counts and head widths costs little compute, and
`partition` weighs what it does cost (`cost`).

Runtime arrays (`arch_arrays`), one architecture (stack them for a meta-batch):
  block_mask_n (n,)  width_mask_D (D,)  hidden_mask_F (F,): 1 on the real prefix,
  0 on padding (float32); head_cols_SxA (S, A) int32: the attention column of
  sub-head s's j-th channel (h * a + i * A + j for sub-head i of head h, real head
  width a), head_mask_SxA: 1 where (s, j) is real; head_of_SxH (S, H): 1 where
  sub-head s belongs to head h; width (): the real width (LayerNorm statistics);
  attn_scale (): 1/sqrt(real head width).

What is masked where: `forward` replaces every padded element of every parameter
it reads by an exact 0 (`jnp.where` with the masks above; a whole absent block
counts as padding), before any arithmetic. It relies on nothing about the
padded entries: garbage, inf or NaN there change no logit, and their gradient
is exactly 0. From zero padded weights it follows that the padded residual
channels, hidden units and attention columns stay exactly 0, so LayerNorm sums
over all D channels and divides by the real `width`; head h's logits sum q.k
over its own columns only (the gathered padding is masked to 0), and its output
meets the gathered rows of proj for those columns; a padded head (all of its row
masked) has logits 0 and outputs 0 and meets zero rows of proj; an
absent block is not run at all: the scan over the bucket's n blocks skips it with
`lax.cond` on `block_mask_n` (the identity on the residual stream), so depth padding
costs almost nothing (see `_blocks`).

Only families with a padded form are supported (`supports`); every other spec
keeps its per-architecture program.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ghn.zoo.gpt2 import GPT2Spec
from ghn.zoo.spec import ArchSpec
from ghn.zoo.vit import POOLS, ViTSpec

FAMILIES = ("vit", "gpt2")
_KEY_FIELDS = {
    "vit": ("patch_size", "image_size", "in_channels", "num_classes", "pool"),
    "gpt2": ("vocab_size", "context_length", "tie_embeddings"),
}
_SIZE_FIELDS = ("depth", "width", "num_heads", "sub_heads", "head_width", "mlp_hidden")
_SIZES = ("n", "D", "H", "S", "A", "F")  # their letters (the Bucket's sizes)
# Padded axis letter -> its runtime mask in `arch_arrays` (the axes parameters pad along).
_MASKS = {"n": "block_mask_n", "D": "width_mask_D", "F": "hidden_mask_F"}
_EPS = {"vit": 1e-6, "gpt2": 1e-5}  # the real models' LayerNorm epsilons
# Per-block parameter names of each family, by role.
_BLOCK_NAMES = {
    "vit": dict(
        ln1=("ln1",),
        qkv=("attn", "qkv"),
        proj=("attn", "proj"),
        ln2=("ln2",),
        fc1=("mlp", "fc1"),
        fc2=("mlp", "fc2"),
    ),
    "gpt2": dict(
        ln1=("ln_1",),
        qkv=("attn", "c_attn"),
        proj=("attn", "c_proj"),
        ln2=("ln_2",),
        fc1=("mlp", "c_fc"),
        fc2=("mlp", "c_proj"),
    ),
}

Path = tuple[Any, ...]
# A parameter's layout: one tuple per real axis, holding the padded axes it splits into;
# a letter is a bucket size (see _MASKS), an int a size every spec of the bucket shares.
Groups = tuple[tuple[str | int, ...], ...]


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Maximal sizes of a family's bucket, and the fields all its specs share.

    The fields of the other family are None. `num_heads` is the max over the specs
    of their head count, `head_width` the attention's sub-head width and `sub_heads`
    how many sub-heads the specs need at most (`smallest_bucket`), `mlp_hidden` the
    max of mlp_ratio * width.
    """

    family: str
    depth: int
    width: int
    num_heads: int
    sub_heads: int
    head_width: int
    mlp_hidden: int
    # ViT
    patch_size: int | None = None
    image_size: int | None = None
    in_channels: int | None = None
    num_classes: int | None = None
    pool: str | None = None
    # GPT-2
    vocab_size: int | None = None
    context_length: int | None = None
    tie_embeddings: bool | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"Bucket family {self.family!r} not in {FAMILIES}")
        for f in _SIZE_FIELDS:
            v = getattr(self, f)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"Bucket.{f} must be an int >= 1, got {v!r}")
        for family, fields in _KEY_FIELDS.items():
            for f in fields:
                v = getattr(self, f)
                if family == self.family and v is None:
                    raise ValueError(f"a {family} Bucket needs {f}")
                if family != self.family and v is not None:
                    raise ValueError(f"a {self.family} Bucket has no {f} (got {v!r})")
        if self.family == "vit" and self.pool not in POOLS:
            raise ValueError(f"Bucket pool {self.pool!r} not in {POOLS}")

    @property
    def key(self) -> tuple:
        """`bucket_key` of every spec in this bucket."""
        fields = _KEY_FIELDS[self.family]
        return (("family", self.family), *((f, getattr(self, f)) for f in fields))

    @property
    def name(self) -> str:
        fixed = "-".join(f"{f}={getattr(self, f)}" for f in _KEY_FIELDS[self.family])
        return (
            f"{self.family}[{fixed}]-d{self.depth}-w{self.width}-h{self.num_heads}"
            f"-s{self.sub_heads}-a{self.head_width}-f{self.mlp_hidden}"
        )

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Bucket:
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown Bucket field(s) {unknown}; valid: {valid}")
        return cls(**d)


def supports(spec: ArchSpec) -> bool:
    """Whether `spec`'s family has a padded form here (others keep per-architecture programs)."""
    return isinstance(spec, ViTSpec | GPT2Spec)


def bucket_key(spec: ArchSpec) -> tuple:
    """The fields that must be equal within a bucket, with the family; hashable."""
    if not supports(spec):
        raise ValueError(
            f"{type(spec).__name__} ({getattr(spec, 'name', spec)}) has no bucketed forward; "
            f"only {FAMILIES} do (check `supports(spec)` and use its per-architecture program)"
        )
    return (("family", spec.family), *((f, getattr(spec, f)) for f in _KEY_FIELDS[spec.family]))


def _spec_sizes(spec: ArchSpec, sub_width: int | None = None) -> dict[str, int]:
    """`spec`'s sizes, its heads cut into sub-heads of `sub_width` (default: its own
    head width, one sub-head per head)."""
    a = spec.width // spec.num_heads
    sub_width = sub_width or a
    return {
        "n": spec.depth,
        "D": spec.width,
        "H": spec.num_heads,
        "S": spec.num_heads * -(-a // sub_width),
        "A": sub_width,
        "F": spec.mlp_ratio * spec.width,
    }


def _bucket_sizes(bucket: Bucket) -> dict[str, int]:
    return {k: getattr(bucket, f) for k, f in zip(_SIZES, _SIZE_FIELDS, strict=True)}


def _sub_width(specs: list[ArchSpec]) -> int:
    """The sub-head width that gathers the fewest attention columns (S x A) for the
    widest need among `specs`; ties go to the wider (fewer sub-heads to sum)."""
    widths = sorted({s.width // s.num_heads for s in specs})
    need = {a: max(_spec_sizes(s, a)["S"] * a for s in specs) for a in widths}
    return min(widths, key=lambda a: (need[a], -a))


def smallest_bucket(specs: Iterable[ArchSpec]) -> Bucket:
    """The smallest bucket holding every spec; they must share one `bucket_key`."""
    specs = list(specs)
    if not specs:
        raise ValueError("smallest_bucket needs at least one spec")
    keys = {bucket_key(s) for s in specs}
    if len(keys) > 1:
        raise ValueError(
            f"specs with different bucket keys cannot share a bucket: {sorted(map(str, keys))}; "
            "group them by `bucket_key(spec)` first"
        )
    sub_width = _sub_width(specs)
    sizes = [_spec_sizes(s, sub_width) for s in specs]
    big = {k: max(s[k] for s in sizes) for k in _SIZES}
    fields = {f: big[k] for k, f in zip(_SIZES, _SIZE_FIELDS, strict=True)}
    return Bucket(**fields, **dict(bucket_key(specs[0])))


def _misfit(bucket: Bucket, spec: ArchSpec) -> str | None:
    """Why `spec` does not fit `bucket`, or None."""
    if not supports(spec):
        return f"{type(spec).__name__} has no bucketed forward"
    if bucket_key(spec) != bucket.key:
        return f"its bucket key {bucket_key(spec)} differs from the bucket's {bucket.key}"
    real, padded = _spec_sizes(spec, bucket.head_width), _bucket_sizes(bucket)
    names = dict(zip(_SIZES, _SIZE_FIELDS, strict=True))
    over = [f"{names[k]} {real[k]} > {padded[k]}" for k in _SIZES if real[k] > padded[k]]
    return ", ".join(over) if over else None


def fits(bucket: Bucket, spec: ArchSpec) -> bool:
    return _misfit(bucket, spec) is None


def _check_fits(bucket: Bucket, spec: ArchSpec) -> None:
    why = _misfit(bucket, spec)
    if why is not None:
        name = spec.name if supports(spec) else type(spec).__name__
        raise ValueError(f"{name} does not fit bucket {bucket.name}: {why}")


def arch_arrays(bucket: Bucket, spec: ArchSpec) -> dict[str, np.ndarray]:
    """`spec`'s runtime description inside `bucket` (see the module docstring); float32."""
    _check_fits(bucket, spec)
    real, padded = _spec_sizes(spec, bucket.head_width), _bucket_sizes(bucket)
    arrays = {
        name: (np.arange(padded[k]) < real[k]).astype(np.float32) for k, name in _MASKS.items()
    }
    # Head h of the real model reads columns h*a .. h*a + a - 1 (a its head width), cut
    # into u = ceil(a / A) sub-heads: sub-head s = h*u + i holds columns h*a + i*A + j for
    # j < A while i*A + j < a (padding: column 0, masked).
    a, sub = spec.width // spec.num_heads, padded["A"]
    u = real["S"] // real["H"]
    s_SxA, j_SxA = np.meshgrid(np.arange(padded["S"]), np.arange(sub), indexing="ij")
    h_SxA, i_SxA = s_SxA // u, s_SxA % u
    real_SxA = (s_SxA < real["S"]) & (i_SxA * sub + j_SxA < a)
    arrays["head_mask_SxA"] = real_SxA.astype(np.float32)
    arrays["head_cols_SxA"] = np.where(real_SxA, h_SxA * a + i_SxA * sub + j_SxA, 0).astype(
        np.int32
    )
    s_S = np.arange(padded["S"])
    arrays["head_of_SxH"] = (
        (s_S[:, None] < real["S"]) & (s_S[:, None] // u == np.arange(padded["H"])[None, :])
    ).astype(np.float32)
    arrays["width"] = np.asarray(spec.width, np.float32)
    arrays["attn_scale"] = np.asarray(1.0 / math.sqrt(a), np.float32)
    return arrays


def _block_layout(family: str) -> dict[Path, Groups]:
    names = _BLOCK_NAMES[family]
    width = (("D",),)
    roles: dict[str, dict[str, Groups]] = {
        "ln1": {"scale": width, "bias": width},
        "qkv": {"kernel": (("D",), (3, "D")), "bias": ((3, "D"),)},
        "proj": {"kernel": (("D",), ("D",)), "bias": width},
        "ln2": {"scale": width, "bias": width},
        "fc1": {"kernel": (("D",), ("F",)), "bias": (("F",),)},
        "fc2": {"kernel": (("F",), ("D",)), "bias": width},
    }
    return {
        (*names[role], leaf): groups
        for role, leaves in roles.items()
        for leaf, groups in leaves.items()
    }


def _top_layout(bucket: Bucket) -> dict[Path, Groups]:
    width = (("D",),)
    if bucket.family == "vit":
        p, c, v = bucket.patch_size, bucket.in_channels, bucket.num_classes
        tokens = (bucket.image_size // p) ** 2 + (bucket.pool == "cls")
        layout = {
            ("patch_embed", "kernel"): ((p,), (p,), (c,), ("D",)),
            ("patch_embed", "bias"): width,
            ("pos_embed",): ((1,), (tokens,), ("D",)),
            ("norm", "scale"): width,
            ("norm", "bias"): width,
            ("head", "kernel"): (("D",), (v,)),
            ("head", "bias"): ((v,),),
        }
        if bucket.pool == "cls":
            layout[("cls_token",)] = ((1,), (1,), ("D",))
        return layout
    v = bucket.vocab_size
    layout = {
        ("wte", "embedding"): ((v,), ("D",)),
        ("wpe", "embedding"): ((bucket.context_length,), ("D",)),
        ("ln_f", "scale"): width,
        ("ln_f", "bias"): width,
    }
    if not bucket.tie_embeddings:
        layout[("lm_head", "kernel")] = (("D",), (v,))
    return layout


def _layout(bucket: Bucket) -> dict[Path, tuple[bool, Groups]]:
    """Padded path -> (stacked over blocks, layout), for every parameter of the bucket."""
    top = {path: (False, groups) for path, groups in _top_layout(bucket).items()}
    blocks = {("blocks", *p): (True, g) for p, g in _block_layout(bucket.family).items()}
    return {**top, **blocks}


def _axes(stacked: bool, groups: Groups) -> tuple[str | int, ...]:
    return (("n",) if stacked else ()) + tuple(ax for g in groups for ax in g)


def _size(ax: str | int, sizes: Mapping[str, int]) -> int:
    return sizes[ax] if isinstance(ax, str) else ax


def unflatten_tree(flat: Mapping[Path, Any]) -> dict:
    """{(k1, k2, ...): leaf} -> nested dicts (the inverse of `flatten_tree`)."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return tree


def flatten_tree(tree: Any, prefix: Path = ()) -> dict[Path, Any]:
    """Nested dicts (a pure-dict parameter tree) -> {(k1, k2, ...): leaf}."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat: dict[Path, Any] = {}
    for k, v in tree.items():
        flat.update(flatten_tree(v, (*prefix, k)))
    return flat


def padded_shapes(bucket: Bucket, dtype=jnp.float32) -> dict:
    """The padded parameter tree of `bucket`, as `jax.ShapeDtypeStruct`s."""
    sizes = _bucket_sizes(bucket)
    return unflatten_tree(
        {
            path: jax.ShapeDtypeStruct(tuple(_size(a, sizes) for a in _axes(s, g)), dtype)
            for path, (s, g) in _layout(bucket).items()
        }
    )


_MAX_CUTS = 32


def padded_size(bucket: Bucket) -> int:
    """Elements of the padded parameter tree: what one architecture of `bucket` costs."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(padded_shapes(bucket)))


def _tokens(bucket: Bucket) -> int:
    if bucket.family == "vit":
        return (bucket.image_size // bucket.patch_size) ** 2 + (bucket.pool == "cls")
    return bucket.context_length


def _cost_parts(bucket: Bucket) -> tuple[int, int]:
    """(outside the blocks, one block): multiply-adds per token at the padded shapes.

    A block's attention matmuls run on the gathered sub-head layout: D x 3SA for q, k
    and v and SA x D for the output instead of its padded D x 3D and D x D weights,
    plus q.k and probs.v (S x A x L each) and the sums between sub-heads and heads
    (S x H x L each way)."""
    shapes = padded_shapes(bucket)
    per_block = sum(math.prod(x.shape[1:]) for x in jax.tree.leaves(shapes["blocks"]))
    d, sa, tokens = bucket.width, bucket.sub_heads * bucket.head_width, _tokens(bucket)
    per_block += (
        4 * d * (sa - d) + 2 * sa * tokens + 2 * bucket.sub_heads * bucket.num_heads * tokens
    )
    top = {k: v for k, v in shapes.items() if k != "blocks"}
    top = sum(math.prod(x.shape) for x in jax.tree.leaves(top))
    return top, per_block


def cost(bucket: Bucket, depth: int | None = None) -> int:
    """Multiply-adds per token of one architecture with `depth` blocks (default: the
    bucket's) run at `bucket`'s padded shapes: one per padded weight of the layers it
    runs, its attention on the bucket's sub-head layout (`_cost_parts`: what a bucket
    mixing head counts and head widths pays) in each of its blocks. The bucket's
    other blocks are skipped (`_blocks`) and cost nothing here."""
    top, per_block = _cost_parts(bucket)
    return top + (bucket.depth if depth is None else depth) * per_block


# Orderings the partition cuts along: width first (what pads most), then depth or heads.
_ORDERS = (
    lambda s: (s.width, s.depth, s.num_heads),
    lambda s: (s.width, s.num_heads, s.depth),
)


def _best_splits(members: list[ArchSpec], k_max: int, order) -> list[tuple[float, list]]:
    """For k = 1..k_max: (summed cost, runs) of the cheapest cut of `members`, sorted by
    `order`, into at most k contiguous runs (a dynamic program over candidate cuts)."""
    members = sorted(members, key=lambda s: (order(s), str(s)))
    head = [order(s) for s in members]
    n = len(members)
    # Runs end only where the ordering key changes.
    cuts = [i for i in range(1, n) if head[i] != head[i - 1]]
    if len(cuts) > _MAX_CUTS:
        cuts = [cuts[round(j * (len(cuts) - 1) / (_MAX_CUTS - 1))] for j in range(_MAX_CUTS)]
    ends = [0, *cuts, n]
    # A run's cost: each member pays the run's bucket, at its own depth (`cost`).
    depth_sum = np.concatenate([[0], np.cumsum([s.depth for s in members])])
    cost_ab = {}
    for a in range(len(ends)):
        for b in range(a + 1, len(ends)):
            top, per_block = _cost_parts(smallest_bucket(members[ends[a] : ends[b]]))
            blocks = int(depth_sum[ends[b]] - depth_sum[ends[a]])
            cost_ab[a, b] = (ends[b] - ends[a]) * top + blocks * per_block
    # best[k][b]: cheapest split of members[:ends[b]] into k runs, and its last start.
    inf = float("inf")
    best = [[(inf, -1)] * len(ends) for _ in range(k_max + 1)]
    best[0][0] = (0.0, -1)
    for k in range(1, k_max + 1):
        for b in range(1, len(ends)):
            options = [(best[k - 1][a][0] + cost_ab[a, b], a) for a in range(b)]
            best[k][b] = min((o for o in options if o[0] < inf), default=(inf, -1))
    out = []
    for k_top in range(1, k_max + 1):
        k = min(range(1, k_top + 1), key=lambda k: (best[k][-1][0], k))
        total, runs, b = best[k][-1][0], [], len(ends) - 1
        while k > 0:
            a = best[k][b][1]
            runs.append(tuple(members[ends[a] : ends[b]]))
            b, k = a, k - 1
        out.append((total, runs[::-1]))
    return out


def partition(specs: Iterable[ArchSpec], max_buckets: int = 1) -> list[tuple[ArchSpec, ...]]:
    """`specs` (all `supports`-ed) split into groups that each get a bucket.

    Specs of different `bucket_key`s never share a group, so there is at least one
    group per key; the rest of the `max_buckets` budget goes, one bucket at a time,
    to the key where it saves the most. Within a key, the distinct specs are
    ordered by (width, depth, heads) and by (width, heads, depth), each ordering
    is cut into contiguous runs minimizing the summed `cost` (each spec costs its
    group's bucket, at its own depth), over at most `_MAX_CUTS`
    evenly spaced candidate cuts, and the cheaper ordering wins. Heads pad no
    weight, and little attention (the sub-head layout). Measured padded / real cost
    (`cost`, each spec at its own depth), 1, 2, 4, 8 buckets: vits-1k's 1,740 ViTs
    (2 patch sizes) 3.3x, 3.3x, 2.1x, 1.6x; gpts-1k's 168 GPT-2s 1.6x, 1.3x, 1.1x,
    1.06x; the 1,488 GPT-2s of 1-12 blocks, width 16-256 (multiples of 8) and 1, 2,
    4 or 8 heads 2.7x, 1.7x, 1.3x, 1.14x (6 buckets: 1.20x). Deterministic.
    """
    if max_buckets < 1:
        raise ValueError(f"max_buckets must be >= 1, got {max_buckets}")
    by_key: dict[tuple, list[ArchSpec]] = {}
    for spec in dict.fromkeys(specs):
        by_key.setdefault(bucket_key(spec), []).append(spec)
    keys = sorted(by_key, key=str)
    spare = max(max_buckets - len(keys), 0)
    curves = {}
    for key in keys:
        members = by_key[key]
        k_max = min(1 + spare, len(members))
        each = [_best_splits(members, k_max, order) for order in _ORDERS]
        curves[key] = [min(options, key=lambda o: o[0]) for options in zip(*each)]
    chosen = dict.fromkeys(keys, 0)  # index into the key's curve: extra buckets
    for _ in range(spare):
        gains = {
            key: curves[key][chosen[key]][0] - curves[key][chosen[key] + 1][0]
            for key in keys
            if chosen[key] + 1 < len(curves[key])
        }
        if not gains or max(gains.values()) <= 0:
            break
        chosen[max(gains, key=lambda k: (gains[k], str(k)))] += 1
    return [tuple(run) for key in keys for run in curves[key][chosen[key]][1]]


def _real_items(bucket: Bucket, spec: ArchSpec):
    """(padded path, real path, index into the padded array, real shape, split real shape)."""
    sizes = _spec_sizes(spec)
    for path, (stacked, groups) in _layout(bucket).items():
        split = tuple(_size(a, sizes) for g in groups for a in g)
        shape = tuple(math.prod(_size(a, sizes) for a in g) for g in groups)
        corner = tuple(slice(0, k) for k in split)
        if stacked:
            for i in range(spec.depth):
                yield path, ("blocks", i, *path[1:]), (i, *corner), shape, split
        else:
            yield path, path, corner, shape, split


def _fmt(path: Path) -> str:
    return "/".join(map(str, path))


def _real_values(bucket: Bucket, spec: ArchSpec, params: Mapping):
    """(padded path, real path, padded index, real shape, split shape, real value) of every
    leaf of `params` (the real model's pure-dict tree), checked against `spec`."""
    _check_fits(bucket, spec)
    flat = {p: np.asarray(v) for p, v in flatten_tree(params).items()}
    items = list(_real_items(bucket, spec))
    expected = {real for _, real, _, _, _ in items}
    missing, unexpected = expected - set(flat), set(flat) - expected
    if missing or unexpected:
        raise ValueError(
            f"params do not match {spec.name}'s parameter tree: missing "
            f"{sorted(map(_fmt, missing))}, unexpected {sorted(map(_fmt, unexpected))}"
        )
    for path, real, index, shape, split in items:
        value = flat[real]
        if value.shape != shape:
            raise ValueError(f"{spec.name} param {_fmt(real)} has shape {value.shape}, not {shape}")
        yield path, real, index, shape, split, value


def embed_params(bucket: Bucket, spec: ArchSpec, params: Mapping, fill: Any = 0) -> dict:
    """The real model's params (its `nnx.to_pure_dict`, any dtype) in `bucket`'s padded tree.

    Host-side NumPy. Every real element goes to its padded position (module docstring),
    `fill` everywhere else; each leaf keeps its dtype.
    """
    shapes = {p: s.shape for p, s in flatten_tree(padded_shapes(bucket)).items()}
    out: dict[Path, np.ndarray] = {}
    for path, _, index, _, split, value in _real_values(bucket, spec, params):
        if path not in out:
            out[path] = np.full(shapes[path], fill, dtype=value.dtype)
        elif out[path].dtype != value.dtype:
            raise ValueError(
                f"{spec.name}'s blocks mix dtypes in {_fmt(path)}: {out[path].dtype}, {value.dtype}"
            )
        out[path][index] = value.reshape(split)
    return unflatten_tree(out)


def embed_offsets(bucket: Bucket, spec: ArchSpec, positions: Mapping) -> dict:
    """`embed_params(bucket, spec, positions)` for integer `positions` (e.g. where each
    element is gathered from), factored: per padded leaf, a tuple of one int32 vector
    per padded axis whose broadcast sum (`sum_offsets`) equals the embedded positions
    at every real element. Padding holds 0 in every vector (so the sum there means
    nothing: mask it with `param_masks`). What ships is the sum of the axis lengths,
    not the padded size (a GPT-2 bucket's positions are tens of MB).

    Needs each real leaf's positions to be affine in each axis index (true for
    row-major positions in any transposed or reshaped-by-split layout) and every
    block's to differ only by a constant; checked, ValueError otherwise.
    """
    shapes = {p: s.shape for p, s in flatten_tree(padded_shapes(bucket)).items()}
    out: dict[Path, list[np.ndarray]] = {}
    for path, real, index, _, split, value in _real_values(bucket, spec, positions):
        value = value.reshape(split).astype(np.int64)
        ndim, stacked = value.ndim, len(index) > len(split)
        origin = value[(0,) * ndim]
        edges = [
            value[tuple(slice(None) if b == a else 0 for b in range(ndim))] - origin
            for a in range(ndim)
        ]
        affine = origin + sum(
            e.reshape([-1 if b == a else 1 for b in range(ndim)]) for a, e in enumerate(edges)
        )
        if not np.array_equal(affine, value):
            raise ValueError(f"{_fmt(real)}: positions are not affine in each axis index")
        first = path not in out
        offs = out.setdefault(path, [np.zeros(n, np.int64) for n in shapes[path]])
        if stacked:
            offs[0][index[0]] = origin
        elif ndim:
            edges[0] = edges[0] + origin
        lo = int(stacked)
        for a, e in enumerate(edges):
            if not first and not np.array_equal(offs[lo + a][: split[a]], e):
                raise ValueError(f"{_fmt(real)}: blocks' positions differ by more than a constant")
            offs[lo + a][: split[a]] = e
    for path, offs in out.items():
        if any(np.abs(o).max(initial=0) >= 2**31 // len(offs) for o in offs):
            raise ValueError(f"{_fmt(path)}: positions exceed int32")
    return unflatten_tree({p: tuple(o.astype(np.int32) for o in offs) for p, offs in out.items()})


def sum_offsets(offsets) -> jax.Array:
    """The broadcast sum of one `embed_offsets` leaf: the positions, at the padded shape."""
    k = len(offsets)
    total = jnp.zeros((1,) * k, jnp.int32)
    for a, off in enumerate(offsets):
        total = total + jnp.reshape(off, [-1 if b == a else 1 for b in range(k)])
    return total


def extract_params(bucket: Bucket, spec: ArchSpec, padded: Mapping) -> dict:
    """Inverse of `embed_params`: the real model's pure-dict params (NumPy) cut from `padded`."""
    _check_fits(bucket, spec)
    flat = flatten_tree(padded)
    out = {}
    for path, real, index, shape, _ in _real_items(bucket, spec):
        if path not in flat:
            raise ValueError(f"padded params of {bucket.name} lack {_fmt(path)}")
        out[real] = np.asarray(flat[path])[index].reshape(shape)
    return unflatten_tree(out)


def _mask(axes: tuple[str | int, ...], arrays: Mapping[str, jax.Array]) -> jax.Array | None:
    """Product of the masks of the padded axes, broadcastable to the parameter (same rank)."""
    mask = None
    for i, ax in enumerate(axes):
        if isinstance(ax, str):
            shape = [1] * len(axes)
            shape[i] = -1
            m = jnp.reshape(arrays[_MASKS[ax]], shape)
            mask = m if mask is None else mask * m
    return mask


def param_masks(bucket: Bucket, arrays: Mapping[str, jax.Array]) -> dict:
    """1.0 where a padded parameter holds a real element of `arrays`' spec, else 0.0."""
    sizes = _bucket_sizes(bucket)
    out = {}
    for path, (stacked, groups) in _layout(bucket).items():
        axes = _axes(stacked, groups)
        shape = tuple(_size(a, sizes) for a in axes)
        mask = _mask(axes, arrays)
        out[path] = jnp.ones(shape) if mask is None else jnp.broadcast_to(mask, shape)
    return unflatten_tree(out)


def _check_inputs(bucket: Bucket, padded_params: Mapping, arrays: Mapping) -> None:
    want = {p: s.shape for p, s in flatten_tree(padded_shapes(bucket)).items()}
    got = {p: tuple(np.shape(v)) for p, v in flatten_tree(padded_params).items()}
    if want != got:
        diff = sorted(_fmt(p) for p in set(want) | set(got) if want.get(p) != got.get(p))
        raise ValueError(
            f"padded params do not match padded_shapes({bucket.name}) at {diff}; "
            "build them with embed_params (one architecture; map over a meta-batch)"
        )
    sizes = _bucket_sizes(bucket)
    want_arrays = {name: (sizes[k],) for k, name in _MASKS.items()} | {
        "head_mask_SxA": (sizes["S"], sizes["A"]),
        "head_cols_SxA": (sizes["S"], sizes["A"]),
        "head_of_SxH": (sizes["S"], sizes["H"]),
        "width": (),
        "attn_scale": (),
    }
    got_arrays = {k: tuple(np.shape(v)) for k, v in arrays.items()}
    if want_arrays != got_arrays:
        raise ValueError(
            f"arrays {got_arrays} do not match arch_arrays for {bucket.name}: {want_arrays}"
        )


def _layer_norm(x_BxLxD, p, width, eps):
    """nnx.LayerNorm's arithmetic over the real channels: padded channels of x are 0."""
    x = x_BxLxD.astype(jnp.float32)
    mean_BxLx1 = jnp.sum(x, axis=-1, keepdims=True) / width
    mean2_BxLx1 = jnp.sum(x * x, axis=-1, keepdims=True) / width
    var_BxLx1 = jnp.maximum(0.0, mean2_BxLx1 - mean_BxLx1 * mean_BxLx1)
    scale_1x1xD = p["scale"].astype(jnp.float32)[None, None]
    y = (x - mean_BxLx1) * (jax.lax.rsqrt(var_BxLx1 + eps) * scale_1x1xD)
    return (y + p["bias"].astype(jnp.float32)[None, None]).astype(x_BxLxD.dtype)


def _attention(x_BxLxD, qkv, proj, arrays, scale, causal):
    # The weights, not the activations, are gathered to the bucket's sub-head layout: qkv's
    # columns and proj's rows of sub-head s's j-th channel, 0 where (s, j) is padding. So
    # q, k and v come out of one einsum already in that layout, and the gathers and their
    # scatter-add gradients cost D x 3SA per block, not batch x tokens x 3SA. A head's
    # logits sum its sub-heads' q.k (over its real columns only: padding is 0); a padded
    # head has logits 0, and its probabilities reach no sub-head.
    cols_SxA = arrays["head_cols_SxA"]
    mask_SxA = arrays["head_mask_SxA"].astype(x_BxLxD.dtype)
    head_of_SxH = arrays["head_of_SxH"]
    kernel_Dx3xSxA = jnp.take(qkv["kernel"], cols_SxA, axis=2) * mask_SxA[None, None]
    bias_3xSxA = jnp.take(qkv["bias"], cols_SxA, axis=1) * mask_SxA[None]
    qkv_BxLx3xSxA = jnp.einsum("bld,dtsa->bltsa", x_BxLxD, kernel_Dx3xSxA)
    qkv_BxLx3xSxA = qkv_BxLx3xSxA + bias_3xSxA[None, None]
    q_BxLxSxA, k_BxLxSxA, v_BxLxSxA = (qkv_BxLx3xSxA[:, :, t] for t in range(3))
    parts_BxSxLxL = jnp.einsum("bqsa,bksa->bsqk", q_BxLxSxA, k_BxLxSxA).astype(jnp.float32)
    logits_BxHxLxL = jnp.einsum("bsqk,sh->bhqk", parts_BxSxLxL, head_of_SxH) * scale
    if causal:
        length = x_BxLxD.shape[1]
        mask_1x1xLxL = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        logits_BxHxLxL = jnp.where(mask_1x1xLxL, logits_BxHxLxL, jnp.finfo(jnp.float32).min)
    probs_BxHxLxL = jax.nn.softmax(logits_BxHxLxL, axis=-1)
    probs_BxSxLxL = jnp.einsum("bhqk,sh->bsqk", probs_BxHxLxL, head_of_SxH).astype(x_BxLxD.dtype)
    out_BxLxSxA = jnp.einsum("bsqk,bksa->bqsa", probs_BxSxLxL, v_BxLxSxA)
    proj_SxAxD = jnp.take(proj["kernel"], cols_SxA, axis=0) * mask_SxA[..., None]
    return jnp.einsum("bqsa,sad->bqd", out_BxLxSxA, proj_SxAxD) + proj["bias"][None, None]


def _mlp(x_BxLxD, fc1, fc2, approximate):
    h_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, fc1["kernel"]) + fc1["bias"][None, None]
    h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=approximate)
    return jnp.einsum("blf,fd->bld", h_BxLxF, fc2["kernel"]) + fc2["bias"][None, None]


def _get(tree: Mapping, path: Path) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _blocks(bucket: Bucket, blocks: Mapping, arrays: Mapping, x_BxLxD: jax.Array) -> jax.Array:
    """The transformer blocks, scanned: compile time does not grow with depth.

    An absent block is skipped (`lax.cond`), and a present one is rematerialized in
    the backward pass (`jax.checkpoint`): the scan's backward then keeps one residual
    per block (its input), instead of every activation of every block, and the
    skipped branch writes only that. Measured on 2 CPU cores (GPT-2, width 128, 32 x
    64 tokens, a 12-block bucket; target forward + backward): 12 real blocks 0.51 s
    without either, 0.38 s with both; 1 real block 0.48 s without, 0.068 s with
    (0.038 s in a 1-block bucket). `lax.cond` alone left the 1-block architecture at
    0.32 s: XLA zero-fills the untaken branch's residuals, every activation of a
    block. Under `vmap` the cond would become a select that runs every block, so a
    meta-batch is mapped over, not vmapped (`ghn.train.step.bucketed_meta_loss`).
    """
    family = bucket.family
    names, eps = _BLOCK_NAMES[family], _EPS[family]
    width, scale = arrays["width"], arrays["attn_scale"].astype(x_BxLxD.dtype)

    def block(x_BxLxD, p):
        h_BxLxD = _layer_norm(x_BxLxD, _get(p, names["ln1"]), width, eps)
        qkv, proj = _get(p, names["qkv"]), _get(p, names["proj"])
        x_BxLxD = x_BxLxD + _attention(h_BxLxD, qkv, proj, arrays, scale, family == "gpt2")
        h_BxLxD = _layer_norm(x_BxLxD, _get(p, names["ln2"]), width, eps)
        mlp = _mlp(h_BxLxD, _get(p, names["fc1"]), _get(p, names["fc2"]), family == "gpt2")
        return x_BxLxD + mlp

    def maybe_block(x_BxLxD, xs):
        p, on = xs
        skip = lambda x, _: x  # noqa: E731
        return jax.lax.cond(on > 0, jax.checkpoint(block), skip, x_BxLxD, p), None

    x_BxLxD, _ = jax.lax.scan(maybe_block, x_BxLxD, (blocks, arrays["block_mask_n"]))
    return x_BxLxD


def _vit(bucket: Bucket, p: Mapping, arrays: Mapping, x_BxYxXxC: jax.Array, dtype) -> jax.Array:
    s, ps, c = bucket.image_size, bucket.patch_size, bucket.in_channels
    if x_BxYxXxC.ndim != 4 or x_BxYxXxC.shape[1:] != (s, s, c):
        raise ValueError(
            f"bucket {bucket.name} expects NHWC images of shape (batch, {s}, {s}, {c}), "
            f"got {tuple(x_BxYxXxC.shape)}"
        )
    b, g = x_BxYxXxC.shape[0], s // ps
    # Non-overlapping patches as rows of (ky, kx, c): the conv kernel's (p, p, C, D) order.
    x = x_BxYxXxC.astype(dtype).reshape(b, g, ps, g, ps, c).transpose(0, 1, 3, 2, 4, 5)
    patches_BxLxI = x.reshape(b, g * g, ps * ps * c)
    kernel_IxD = p["patch_embed"]["kernel"].reshape(ps * ps * c, bucket.width)
    x_BxLxD = jnp.einsum("bli,id->bld", patches_BxLxI, kernel_IxD)
    x_BxLxD = x_BxLxD + p["patch_embed"]["bias"][None, None]
    if bucket.pool == "cls":
        cls_Bx1xD = jnp.broadcast_to(p["cls_token"], (b, 1, bucket.width))
        x_BxLxD = jnp.concatenate([cls_Bx1xD, x_BxLxD], axis=1)
    x_BxLxD = _blocks(bucket, p["blocks"], arrays, x_BxLxD + p["pos_embed"])
    x_BxLxD = _layer_norm(x_BxLxD, p["norm"], arrays["width"], _EPS["vit"])
    x_BxD = x_BxLxD[:, 0] if bucket.pool == "cls" else jnp.mean(x_BxLxD, axis=1)
    return x_BxD @ p["head"]["kernel"] + p["head"]["bias"][None]


def _gpt2(bucket: Bucket, p: Mapping, arrays: Mapping, tokens_BxL: jax.Array) -> jax.Array:
    if tokens_BxL.ndim != 2 or tokens_BxL.shape[1] > bucket.context_length:
        raise ValueError(
            f"bucket {bucket.name} expects token ids of shape (batch, seq_len) with seq_len <= "
            f"{bucket.context_length}, got {tuple(tokens_BxL.shape)}"
        )
    wte_VxD = p["wte"]["embedding"]
    length = tokens_BxL.shape[1]
    x_BxLxD = jnp.take(wte_VxD, tokens_BxL, axis=0) + p["wpe"]["embedding"][None, :length]
    x_BxLxD = _blocks(bucket, p["blocks"], arrays, x_BxLxD)
    x_BxLxD = _layer_norm(x_BxLxD, p["ln_f"], arrays["width"], _EPS["gpt2"])
    if bucket.tie_embeddings:
        return jnp.einsum("bld,vd->blv", x_BxLxD, wte_VxD)
    return jnp.einsum("bld,dv->blv", x_BxLxD, p["lm_head"]["kernel"])


def forward(
    bucket: Bucket, padded_params: Mapping, arrays: Mapping, x: jax.Array, *, dtype=jnp.float32
) -> jax.Array:
    """The real architecture's logits at `bucket`'s padded shapes; pure, jit/grad-able.

    padded_params: `embed_params` layout (one architecture; `lax.map` over a leading
      meta-batch axis of padded_params and arrays for several).
    arrays: `arch_arrays(bucket, spec)`.
    x: ViT: NHWC images (B, image_size, image_size, in_channels) -> logits (B, num_classes);
      GPT-2: int tokens (B, L), L <= context_length -> logits (B, L, vocab_size).
    dtype: compute dtype of the matmuls and the residual stream; LayerNorm statistics
      and softmax run in float32; logits are returned in float32.
    """
    _check_inputs(bucket, padded_params, arrays)
    flat = flatten_tree(padded_params)
    masked = {}
    for path, (stacked, groups) in _layout(bucket).items():
        mask = _mask(_axes(stacked, groups), arrays)
        value = flat[path] if mask is None else jnp.where(mask > 0, flat[path], 0)
        masked[path] = jnp.asarray(value).astype(dtype)
    p = unflatten_tree(masked)
    if bucket.family == "vit":
        logits = _vit(bucket, p, arrays, x, dtype)
    else:
        logits = _gpt2(bucket, p, arrays, x)
    return logits.astype(jnp.float32)
