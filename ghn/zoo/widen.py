"""Function-preserving widening of the zoo's ViTs and GPT-2s (Net2WiderNet, Chen et al. 2016).

A low-rank decoder builds each index of a dimension from decoder parameters of
its own, so a GHN cannot predict widths it never trained (RESULTS.md, "Why
larger architectures are predicted badly"). A wider target can instead start
from the prediction for a narrower model of the same family, widened so that
it computes exactly the same function:

    source = widen.narrower(spec, trained)     # vit-d9-w192-h8 -> vit-d9-w96-h8
    wide_state = widen.widen(narrow_state, source, spec)

Width w_t = k w_s (k an integer). Every unit of the narrow model is copied k
times (unit j of the wide model is unit j // k of the narrow one) and every
weight that reads copied units is divided by k, so the copies add up to the
original: residual stream, MLP hidden units, LayerNorms (mean and variance of
a vector whose entries all appear k times are unchanged), embeddings, the
head. Attention keeps its per-head structure: H_t = a H_s heads of head width
hd_t = b hd_s (a b = k); wide head h reads narrow head h // a with each of its
dimensions copied b times, and the query is divided by sqrt(b) so the logits
q·k / sqrt(hd_t) are unchanged. A tied GPT-2 head reads the token embedding
over copied units, so its final LayerNorm is divided by k instead.

The copies receive the same gradient, so fine-tuning needs their symmetry
broken: `ghn.calibrate.prepare` adds the random init to every predicted matrix
(P + R), which does it.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import jax
import jax.numpy as jnp
import numpy as np

from ghn.errors import ConfigError
from ghn.treepath import path_names
from ghn.zoo.gpt2 import GPT2Spec
from ghn.zoo.spec import ArchSpec
from ghn.zoo.vit import ViTSpec

FAMILIES = (ViTSpec, GPT2Spec)
WIDTH_FIELDS = ("width", "num_heads")  # the fields a widening changes

# Per parameter (matched on the end of its path): what each axis indexes. "d" the
# residual width, "h" the MLP's hidden units, "qkv" a fused [q | k | v] projection
# laid out (3, heads, head width), "att" the attention output laid out (heads, head
# width), None an axis widening leaves alone; a trailing "<" marks an axis the
# layer reads (contracts), which is divided by its copy count.
_NORMS = ("ln1", "ln2", "norm", "ln_1", "ln_2", "ln_f")
AXES: dict[tuple[str, ...], tuple[str | None, ...]] = {
    **{(n, p): ("d",) for n in _NORMS for p in ("scale", "bias")},
    ("patch_embed", "kernel"): (None, None, None, "d"),
    ("patch_embed", "bias"): ("d",),
    ("cls_token",): (None, None, "d"),
    ("pos_embed",): (None, None, "d"),
    ("head", "kernel"): ("d<", None),
    ("head", "bias"): (None,),
    ("wte", "embedding"): (None, "d"),
    ("wpe", "embedding"): (None, "d"),
    ("lm_head", "kernel"): ("d<", None),
    **{(n, "kernel"): ("d<", "qkv") for n in ("qkv", "c_attn")},
    **{(n, "bias"): ("qkv",) for n in ("qkv", "c_attn")},
    **{(*n, "kernel"): ("att<", "d") for n in (("attn", "proj"), ("attn", "c_proj"))},
    **{(*n, "bias"): ("d",) for n in (("attn", "proj"), ("attn", "c_proj"))},
    **{(*n, "kernel"): ("d<", "h") for n in (("mlp", "fc1"), ("mlp", "c_fc"))},
    **{(*n, "bias"): ("h",) for n in (("mlp", "fc1"), ("mlp", "c_fc"))},
    **{(*n, "kernel"): ("h<", "d") for n in (("mlp", "fc2"), ("mlp", "c_proj"))},
    **{(*n, "bias"): ("d",) for n in (("mlp", "fc2"), ("mlp", "c_proj"))},
}


def ratios(source: ArchSpec, target: ArchSpec) -> tuple[int, int, int]:
    """(k, a, b): width, head-count and head-width ratios of `target` to `source`;
    a `ConfigError` unless `target` is `source` widened (same family and every other
    field, integer ratios with k = a b)."""
    if type(source) is not type(target) or not isinstance(source, FAMILIES):
        raise ConfigError(
            f"widening needs two ViTs or two GPT-2s, got {source.name} and {target.name}"
        )
    others = {f: getattr(target, f) for f in source.field_names() if f not in WIDTH_FIELDS}
    if source.replace(**others) != source:
        raise ConfigError(
            f"{target.name} is not {source.name} widened: fields other than width differ"
        )
    ws, wt, hs, ht = source.width, target.width, source.num_heads, target.num_heads
    dt, ds = wt // ht, ws // hs
    if wt % ws or ht % hs or dt % ds or (wt // ws) != (ht // hs) * (dt // ds):
        raise ConfigError(
            f"{target.name} is not an integer widening of {source.name}: width, heads and "
            "head width must each be a multiple of the source's"
        )
    return wt // ws, ht // hs, dt // ds


def _rule(path: tuple[str, ...]) -> tuple[str | None, ...]:
    for n in range(len(path), 0, -1):
        if path[-n:] in AXES:
            return AXES[path[-n:]]
    raise ConfigError(f"widening has no rule for parameter {'/'.join(path)}")


def _axis_map(kind: str, n: int, k: int, a: int, b: int, hs: int, ds: int) -> np.ndarray:
    """For each index of a widened axis of size n, the narrow index it copies."""
    j = np.arange(n)
    if kind in ("d", "h"):
        return j // k
    width_t = hs * a * ds * b
    chunk, r = j // width_t, j % width_t
    head, t = r // (ds * b), r % (ds * b)
    return chunk * hs * ds + (head // a) * ds + t // b


def widen(state, source: ArchSpec, target: ArchSpec):
    """`source`'s parameters (`nnx.state(model, nnx.Param)` of `source.build`) as
    parameters of `target`, a wider model of the same family computing the same function."""
    k, a, b = ratios(source, target)
    hs, ds = source.num_heads, source.width // source.num_heads
    tied_head = isinstance(target, GPT2Spec) and target.tie_embeddings

    def grow(path, x):
        names = path_names(path)
        names = tuple(n for n in names if n not in ("value", "raw_value"))
        kinds = _rule(names)
        if len(kinds) != x.ndim:
            raise ConfigError(f"widening rule for {'/'.join(names)} expects {len(kinds)} axes")
        scale = 1.0
        for axis, kind in enumerate(kinds):
            if kind is None:
                continue
            base = kind.rstrip("<")
            idx = _axis_map(base, x.shape[axis] * k, k, a, b, hs, ds)
            x = jnp.take(x, jnp.asarray(idx), axis=axis)
            if kind.endswith("<"):
                scale /= k
            if base == "qkv" and b > 1:  # the query's copies: q·k / sqrt(hd_t) unchanged
                shape = [1] * x.ndim
                shape[axis] = x.shape[axis]
                q = np.where(np.arange(x.shape[axis]) < target.width, 1 / math.sqrt(b), 1.0)
                x = x * jnp.asarray(q.reshape(shape), x.dtype)
        if tied_head and names[-2:-1] == ("ln_f",):
            scale /= k
        return x * jnp.asarray(scale, x.dtype) if scale != 1.0 else x

    return jax.tree_util.tree_map_with_path(grow, state)


def widenings(target: ArchSpec) -> list[tuple[ArchSpec, int, int]]:
    """Every narrower spec `target` is an integer widening of, with its (a, b)."""
    if not isinstance(target, FAMILIES):
        return []
    wt, ht = target.width, target.num_heads
    dt = wt // ht
    out = []
    for k in range(2, wt + 1):
        if wt % k:
            continue
        for a in range(1, k + 1):
            b = k // a
            if k % a or ht % a or dt % b:
                continue
            out.append((target.replace(width=wt // k, num_heads=ht // a), a, b))
    return out


def narrower(target: ArchSpec, trained: Collection[tuple[int, int]]) -> ArchSpec | None:
    """The spec whose prediction, widened, should initialize `target`, or None.

    `trained`: the (width, heads) pairs a GHN trained on. None when `target` is no
    wider than the widest of them (the GHN predicts it directly), or is not a ViT or
    GPT-2, or has no integer narrowing within the range of trained widths. Otherwise the
    widest such narrowing, preferring one whose (width, heads) was trained, then
    fewer copied heads (each wide head its own narrow head where possible).
    """
    if not trained or not isinstance(target, FAMILIES):
        return None
    narrowest, widest = min(w for w, _ in trained), max(w for w, _ in trained)
    if target.width <= widest:
        return None
    pairs = set(trained)
    fits = [(s, a) for s, a, _ in widenings(target) if narrowest <= s.width <= widest]
    if not fits:
        return None
    best = max(fits, key=lambda f: ((f[0].width, f[0].num_heads) in pairs, f[0].width, -f[1]))
    return best[0]
