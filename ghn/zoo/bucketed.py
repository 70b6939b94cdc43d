"""Shape-stable target forwards: one compiled program for every architecture of a bucket.

A `Bucket` holds the maximal sizes of a group of ViTs (or of GPT-2s) that agree
on everything else (`bucket_key`). Inside a bucket, an architecture is a set
of runtime arrays (`arch_arrays`: masks and scalars of fixed shapes), and its
parameters are laid out in the bucket's padded tree (`embed_params`); the
forward (`forward`) runs at the padded shapes, so one XLA program serves the
whole bucket and the meta-batch's architectures can be stacked and vmapped.

    bucket = smallest_bucket(specs)
    padded = embed_params(bucket, spec, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    logits = forward(bucket, padded, arch_arrays(bucket, spec), x)   # == model(x)
    params = extract_params(bucket, spec, padded)                     # the model's tree again

Sizes: n = bucket.depth (blocks), D = bucket.width (residual channels),
H = bucket.num_heads, A = bucket.head_width (max width // num_heads), F =
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
runs on an (H, A) layout: qkv's columns and proj's rows are gathered to it at
runtime (head_cols_HxA; gathering the weights, not the activations, keeps the
gathers and their gradients' scatter-adds off the batch), and then costs
H x A x L x L multiply-adds per block for q.k and again for probs.v, against
the real h x a x L x L. So heads cost compute where a bucket
mixes many heads with wide heads, and `partition` weighs that (`cost`).

Runtime arrays (`arch_arrays`), one architecture (stack them for vmap):
  block_mask_n (n,)  width_mask_D (D,)  hidden_mask_F (F,): 1 on the real prefix,
  0 on padding (float32); head_cols_HxA (H, A) int32: the column of head h's
  j-th attention channel (h * a + j for real head width a), head_mask_HxA: 1 where
  (h, j) is real; width (): the real width (LayerNorm statistics);
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
absent block's residual update is 0, and is masked by `block_mask_n` besides.

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
_SIZE_FIELDS = ("depth", "width", "num_heads", "head_width", "mlp_hidden")
_SIZES = ("n", "D", "H", "A", "F")  # their letters (the Bucket's maximal sizes)
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

    The fields of the other family are None. `head_width` is the max over the
    specs of width // num_heads, `mlp_hidden` the max of mlp_ratio * width.
    """

    family: str
    depth: int
    width: int
    num_heads: int
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
            f"-a{self.head_width}-f{self.mlp_hidden}"
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


def _spec_sizes(spec: ArchSpec) -> dict[str, int]:
    return {
        "n": spec.depth,
        "D": spec.width,
        "H": spec.num_heads,
        "A": spec.width // spec.num_heads,
        "F": spec.mlp_ratio * spec.width,
    }


def _bucket_sizes(bucket: Bucket) -> dict[str, int]:
    return {
        "n": bucket.depth,
        "D": bucket.width,
        "H": bucket.num_heads,
        "A": bucket.head_width,
        "F": bucket.mlp_hidden,
    }


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
    sizes = [_spec_sizes(s) for s in specs]
    big = {k: max(s[k] for s in sizes) for k in _SIZES}
    return Bucket(
        depth=big["n"],
        width=big["D"],
        num_heads=big["H"],
        head_width=big["A"],
        mlp_hidden=big["F"],
        **dict(bucket_key(specs[0])),
    )


def _misfit(bucket: Bucket, spec: ArchSpec) -> str | None:
    """Why `spec` does not fit `bucket`, or None."""
    if not supports(spec):
        return f"{type(spec).__name__} has no bucketed forward"
    if bucket_key(spec) != bucket.key:
        return f"its bucket key {bucket_key(spec)} differs from the bucket's {bucket.key}"
    real, padded = _spec_sizes(spec), _bucket_sizes(bucket)
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
    real, padded = _spec_sizes(spec), _bucket_sizes(bucket)
    arrays = {
        name: (np.arange(padded[k]) < real[k]).astype(np.float32) for k, name in _MASKS.items()
    }
    # Head h of the real model reads columns h*a .. h*a + a - 1 (a its head width); the
    # attention runs on an (H, A) layout gathered from those columns (padding: column 0,
    # masked).
    a = real["A"]
    h_HxA, j_HxA = np.meshgrid(np.arange(padded["H"]), np.arange(padded["A"]), indexing="ij")
    real_HxA = (h_HxA < real["H"]) & (j_HxA < a)
    arrays["head_mask_HxA"] = real_HxA.astype(np.float32)
    arrays["head_cols_HxA"] = np.where(real_HxA, h_HxA * a + j_HxA, 0).astype(np.int32)
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


def cost(bucket: Bucket) -> int:
    """Multiply-adds per token of one architecture run at `bucket`'s padded shapes: one
    per padded weight, plus attention's q.k and probs.v over the (H, A) layout in every
    block (what a bucket mixing head counts and head widths pays)."""
    attention = 2 * bucket.depth * bucket.num_heads * bucket.head_width * _tokens(bucket)
    return padded_size(bucket) + attention


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
    cost_ab = {
        (a, b): (ends[b] - ends[a]) * cost(smallest_bucket(members[ends[a] : ends[b]]))
        for a in range(len(ends))
        for b in range(a + 1, len(ends))
    }
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
    group's: padded weights plus attention, per token), over at most `_MAX_CUTS`
    evenly spaced candidate cuts, and the cheaper ordering wins. Heads pad no
    weight, only attention's (H, A) layout. Measured padded / real parameters, 1,
    2, 4, 8 buckets: vits-1k's 1,740 ViTs (2 patch sizes) 5.0x, 5.0x, 2.9x, 2.0x;
    gpts-1k's 168 GPT-2s 1.9x, 1.5x, 1.3x, 1.2x (ordering by depth first, or by
    parameter count, pads more). Deterministic.
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


def embed_params(bucket: Bucket, spec: ArchSpec, params: Mapping, fill: Any = 0) -> dict:
    """The real model's params (its `nnx.to_pure_dict`, any dtype) in `bucket`'s padded tree.

    Host-side NumPy. Every real element goes to its padded position (module docstring),
    `fill` everywhere else; each leaf keeps its dtype (integer index arrays with
    fill=-1 give gather maps).
    """
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
    shapes = {p: s.shape for p, s in flatten_tree(padded_shapes(bucket)).items()}
    out: dict[Path, np.ndarray] = {}
    for path, real, index, shape, split in items:
        value = flat[real]
        if value.shape != shape:
            raise ValueError(f"{spec.name} param {_fmt(real)} has shape {value.shape}, not {shape}")
        if path not in out:
            out[path] = np.full(shapes[path], fill, dtype=value.dtype)
        elif out[path].dtype != value.dtype:
            raise ValueError(
                f"{spec.name}'s blocks mix dtypes in {_fmt(path)}: {out[path].dtype}, {value.dtype}"
            )
        out[path][index] = value.reshape(split)
    return unflatten_tree(out)


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
            "build them with embed_params (one architecture; vmap for a meta-batch)"
        )
    sizes = _bucket_sizes(bucket)
    want_arrays = {name: (sizes[k],) for k, name in _MASKS.items()} | {
        "head_mask_HxA": (sizes["H"], sizes["A"]),
        "head_cols_HxA": (sizes["H"], sizes["A"]),
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
    # The weights, not the activations, are gathered to the bucket's (H, A) layout: qkv's
    # columns and proj's rows of head h's j-th channel, 0 where (h, j) is padding. So q, k
    # and v come out of one einsum already in that layout (a head's q.k sums over its real
    # columns only; a padded head has logits 0 and outputs 0), and the gathers and their
    # scatter-add gradients cost D x 3HA per block, not batch x tokens x 3HA.
    cols_HxA = arrays["head_cols_HxA"]
    mask_HxA = arrays["head_mask_HxA"].astype(x_BxLxD.dtype)
    kernel_Dx3xHxA = jnp.take(qkv["kernel"], cols_HxA, axis=2) * mask_HxA[None, None]
    bias_3xHxA = jnp.take(qkv["bias"], cols_HxA, axis=1) * mask_HxA[None]
    qkv_BxLx3xHxA = jnp.einsum("bld,dtha->bltha", x_BxLxD, kernel_Dx3xHxA)
    qkv_BxLx3xHxA = qkv_BxLx3xHxA + bias_3xHxA[None, None]
    q_BxLxHxA, k_BxLxHxA, v_BxLxHxA = (qkv_BxLx3xHxA[:, :, t] for t in range(3))
    logits_BxHxLxL = jnp.einsum("bqha,bsha->bhqs", q_BxLxHxA, k_BxLxHxA) * scale
    logits_BxHxLxL = logits_BxHxLxL.astype(jnp.float32)
    if causal:
        length = x_BxLxD.shape[1]
        mask_1x1xLxL = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        logits_BxHxLxL = jnp.where(mask_1x1xLxL, logits_BxHxLxL, jnp.finfo(jnp.float32).min)
    probs_BxHxLxL = jax.nn.softmax(logits_BxHxLxL, axis=-1).astype(x_BxLxD.dtype)
    out_BxLxHxA = jnp.einsum("bhqs,bsha->bqha", probs_BxHxLxL, v_BxLxHxA)
    proj_HxAxD = jnp.take(proj["kernel"], cols_HxA, axis=0) * mask_HxA[..., None]
    return jnp.einsum("bqha,had->bqd", out_BxLxHxA, proj_HxAxD) + proj["bias"][None, None]


def _mlp(x_BxLxD, fc1, fc2, approximate):
    h_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, fc1["kernel"]) + fc1["bias"][None, None]
    h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=approximate)
    return jnp.einsum("blf,fd->bld", h_BxLxF, fc2["kernel"]) + fc2["bias"][None, None]


def _get(tree: Mapping, path: Path) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _blocks(bucket: Bucket, blocks: Mapping, arrays: Mapping, x_BxLxD: jax.Array) -> jax.Array:
    """The transformer blocks, scanned: compile time does not grow with depth."""
    family = bucket.family
    names, eps = _BLOCK_NAMES[family], _EPS[family]
    width, scale = arrays["width"], arrays["attn_scale"].astype(x_BxLxD.dtype)

    def block(x_BxLxD, xs):
        p, on = xs
        on = on.astype(x_BxLxD.dtype)
        h_BxLxD = _layer_norm(x_BxLxD, _get(p, names["ln1"]), width, eps)
        qkv, proj = _get(p, names["qkv"]), _get(p, names["proj"])
        attn = _attention(h_BxLxD, qkv, proj, arrays, scale, family == "gpt2")
        x_BxLxD = x_BxLxD + on * attn
        h_BxLxD = _layer_norm(x_BxLxD, _get(p, names["ln2"]), width, eps)
        mlp = _mlp(h_BxLxD, _get(p, names["fc1"]), _get(p, names["fc2"]), family == "gpt2")
        return x_BxLxD + on * mlp, None

    x_BxLxD, _ = jax.lax.scan(block, x_BxLxD, (blocks, arrays["block_mask_n"]))
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
    """The real architecture's logits at `bucket`'s padded shapes; pure, jit/grad/vmap-able.

    padded_params: `embed_params` layout (one architecture; vmap over a leading
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
