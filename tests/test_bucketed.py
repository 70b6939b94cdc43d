"""ghn/zoo/bucketed.py: padded, masked forwards equal the real ViT and GPT-2 forwards.

Every bucket's forward is jitted once (`_forward`, the bucket static) and reused
by all its specs, as meta-training does; the references are the real models'
per-architecture programs (`_real_forward`). Tolerances follow tests/tolerances.py.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerances import assert_close, assert_trees_close, transformer_reduction

from ghn import zoo
from ghn.zoo import GPT2Spec, ResNetSpec, ViTSpec
from ghn.zoo import bucketed as bk

VIT = dict(patch_size=4, image_size=8, in_channels=3, num_classes=5, head_zeroinit=False)
VIT_MEAN = dict(
    patch_size=4, image_size=16, in_channels=1, num_classes=7, pool="mean", head_zeroinit=False
)
GPT = dict(vocab_size=64, context_length=16)
GPT_UNTIED = dict(vocab_size=64, context_length=16, tie_embeddings=False)

# Each bucket's specs: its smallest (depth 1, width 16) and largest (max depth and width),
# and specs that set the maximal head count, head width and MLP hidden width separately,
# so that no spec fills the bucket and every padded axis is exercised.
BUCKETS = {
    "vit-cls": [
        ViTSpec(depth=1, width=16, num_heads=1, **VIT),  # A = 16
        ViTSpec(depth=3, width=48, num_heads=4, **VIT),  # A = 12, F = 192
        ViTSpec(depth=2, width=32, num_heads=8, mlp_ratio=2, **VIT),  # H = 8, A = 4
    ],
    "vit-mean": [
        ViTSpec(depth=2, width=16, num_heads=2, **VIT_MEAN),
        ViTSpec(depth=1, width=32, num_heads=4, **VIT_MEAN),
    ],
    "gpt2-tied": [
        GPT2Spec(depth=1, width=16, num_heads=2, **GPT),  # A = 8
        GPT2Spec(depth=3, width=64, num_heads=8, **GPT),  # F = 256
        GPT2Spec(depth=2, width=24, num_heads=8, mlp_ratio=2, **GPT),  # A = 3
    ],
    "gpt2-untied": [
        GPT2Spec(depth=2, width=32, num_heads=4, **GPT_UNTIED),
        GPT2Spec(depth=1, width=16, num_heads=8, **GPT_UNTIED),  # A = 2
    ],
}
CASES = [(name, i) for name, specs in BUCKETS.items() for i in range(len(specs))]

# One program per (bucket, input shape, dtype), shared by every test of the module.
_forward = jax.jit(bk.forward, static_argnums=0, static_argnames="dtype")
# The per-architecture reference programs (eager NNX takes seconds per small model here).
_real_forward = nnx.jit(lambda model, x: model(x))


def _bucket(name):
    return bk.smallest_bucket(BUCKETS[name])


def _input(spec, batch=2, seed=0):
    if isinstance(spec, GPT2Spec):
        # Shorter than the context for the untied bucket: wpe is cut to the sequence.
        length = spec.context_length if spec.tie_embeddings else 11
        return spec.example_input(batch, seed=seed, seq_len=length)
    return spec.example_input(batch, seed=seed)


@functools.cache
def _model(spec, seed=0):
    """The real model with every parameter mattering: LayerNorm scales and biases, the
    zero-initialized biases and the class token get random values. Cached (a build takes
    seconds): callers must not modify the model or its params."""
    model = spec.build(rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)

    def perturb(tree):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = perturb(v)
                continue
            v = np.asarray(v)
            noise = (0.1 * rng.standard_normal(v.shape)).astype(v.dtype)
            out[k] = v + noise if k == "scale" else noise if k in ("bias", "cls_token") else v
        return out

    params = perturb(nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model, params


def _tokens(bucket, x):
    """Sequence length of one example inside the blocks."""
    if bucket.family == "vit":
        return (bucket.image_size // bucket.patch_size) ** 2 + (bucket.pool == "cls")
    return x.shape[1]


def _reduction(bucket, spec, x):
    """Reduction length behind one logit, counted at the bucket's padded sizes (the
    loop lengths of the padded program; padded terms are exact zeros), per
    tests/tolerances.py: the blocks (LayerNorms, q/k/v and output projections,
    q.k over a head, softmax and probs @ v over the tokens, the MLP), the final
    LayerNorm, the head's contraction over the width, plus the patch embedding's
    p*p*C terms (ViT) or the token + position embedding sum (GPT-2)."""
    if bucket.family == "vit":
        embed = bucket.patch_size**2 * bucket.in_channels
    else:
        embed = 2
    blocks = transformer_reduction(
        depth=spec.depth,
        width=bucket.width,
        mlp_width=bucket.mlp_hidden,
        # A head's q.k: its sub-heads' partial sums over A columns, then a sum over the S
        # sub-heads (masked columns and other heads' sub-heads add exact zeros).
        head_dim=max(bucket.width, bucket.sub_heads * bucket.head_width) + bucket.sub_heads,
        tokens=_tokens(bucket, x),
    )
    return embed + blocks + bucket.width


def _garbage_like(padded, masks, seed):
    """`padded` with every padded position replaced by large garbage, inf and NaN."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in padded.items():
        if isinstance(v, dict):
            out[k] = _garbage_like(v, masks[k], seed + 1)
            continue
        junk = (1e4 * rng.standard_normal(v.shape)).astype(v.dtype)
        flat = junk.reshape(-1)
        flat[::7], flat[1::11], flat[2::13] = np.inf, -np.inf, np.nan
        out[k] = np.where(np.asarray(masks[k]) > 0, v, junk)
    return out


def _real_positions(bucket, spec, params):
    """1 where a padded parameter holds a real element, from the host-side layout alone
    (not from the device-side masks under test)."""
    ones = jax.tree.map(lambda v: np.ones(np.shape(v), np.int8), params)
    return bk.embed_params(bucket, spec, ones, fill=0)


def _stack(trees):
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


@pytest.mark.parametrize("name,i", CASES)
def test_forward_equals_real_model(name, i):
    bucket, spec = _bucket(name), BUCKETS[name][i]
    model, params = _model(spec, seed=i)
    x = _input(spec)
    got = _forward(bucket, bk.embed_params(bucket, spec, params), bk.arch_arrays(bucket, spec), x)
    want = _real_forward(model, x)
    assert got.dtype == jnp.float32
    assert_close(got, want, reduction=_reduction(bucket, spec, x), err_msg=spec.name)


def test_bucket_sizes_key_and_json():
    bucket = _bucket("vit-cls")
    assert (bucket.depth, bucket.width, bucket.num_heads) == (3, 48, 8)
    # Head widths 16, 12 and 4: sub-heads of 4 gather 12 x 4 = 48 columns for every
    # spec, where one sub-head per head would gather 8 x 16 = 128.
    assert (bucket.sub_heads, bucket.head_width, bucket.mlp_hidden) == (12, 4, 192)
    assert bucket.key == bk.bucket_key(BUCKETS["vit-cls"][0])
    assert all(bk.fits(bucket, s) for s in BUCKETS["vit-cls"])
    for name in BUCKETS:
        b = _bucket(name)
        again = bk.Bucket.from_json(json.loads(json.dumps(b.to_json())))
        assert again == b and hash(again) == hash(b)
    untied = _bucket("gpt2-untied")
    assert untied.tie_embeddings is False and untied.pool is None
    assert (untied.num_heads, untied.sub_heads, untied.head_width) == (8, 16, 2)
    assert bk.supports(BUCKETS["gpt2-tied"][0]) and bk.supports(BUCKETS["vit-mean"][0])
    assert not bk.supports(ResNetSpec())


@pytest.mark.parametrize("name", list(BUCKETS))
def test_embed_extract_roundtrip_and_gather_map(name):
    bucket = _bucket(name)
    shapes = bk.padded_shapes(bucket)
    for spec in BUCKETS[name]:
        _, params = _model(spec)
        padded = bk.embed_params(bucket, spec, params)
        assert jax.tree.structure(padded) == jax.tree.structure(shapes)
        assert jax.tree.map(np.shape, padded) == jax.tree.map(lambda s: s.shape, shapes)
        back = bk.extract_params(bucket, spec, padded)
        assert jax.tree.structure(back) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)  # a copy: bitwise

        # Integer params numbering every real element, fill -1: a gather map that holds
        # each real index exactly once, exactly where the device-side masks say "real".
        leaves, treedef = jax.tree.flatten(params)
        sizes = np.cumsum([0] + [leaf.size for leaf in leaves])
        numbered = jax.tree.unflatten(
            treedef,
            [
                np.arange(lo, hi, dtype=np.int32).reshape(leaf.shape)
                for lo, hi, leaf in zip(sizes[:-1], sizes[1:], leaves)
            ],
        )
        gather = bk.embed_params(bucket, spec, numbered, fill=-1)
        assert all(g.dtype == np.int32 for g in jax.tree.leaves(gather))
        hits = np.concatenate([g.reshape(-1) for g in jax.tree.leaves(gather)])
        np.testing.assert_array_equal(np.sort(hits[hits >= 0]), np.arange(sizes[-1]))
        masks = bk.param_masks(bucket, bk.arch_arrays(bucket, spec))
        for g, m in zip(jax.tree.leaves(gather), jax.tree.leaves(masks)):
            np.testing.assert_array_equal(g >= 0, np.asarray(m) > 0)
        # The same map, factored into one vector per padded axis: equal wherever real.
        offsets = bk.flatten_tree(bk.embed_offsets(bucket, spec, numbered))
        for path, g in bk.flatten_tree(gather).items():
            assert [len(o) for o in offsets[path]] == list(g.shape)
            summed = np.asarray(bk.sum_offsets(offsets[path]))
            np.testing.assert_array_equal(summed[g >= 0], g[g >= 0], err_msg=str(path))
        # Positions that are not affine per axis cannot be factored: a clear error.
        scrambled = dict(bk.flatten_tree(numbered))
        path = max(scrambled, key=lambda p: scrambled[p].size)
        flat = scrambled[path].reshape(-1)
        scrambled[path] = np.random.default_rng(0).permutation(flat).reshape(scrambled[path].shape)
        with pytest.raises(ValueError, match="affine"):
            bk.embed_offsets(bucket, spec, bk.unflatten_tree(scrambled))
        half = jax.tree.map(lambda v: v.astype(np.float16), params)
        assert all(
            v.dtype == np.float16 for v in jax.tree.leaves(bk.embed_params(bucket, spec, half))
        )


def test_attention_layout_keeps_columns_and_masks_heads():
    bucket = _bucket("vit-cls")
    spec = BUCKETS["vit-cls"][1]  # width 48, 4 heads of 12 in a bucket of 8 heads, width 48
    _, params = _model(spec)
    padded = bk.embed_params(bucket, spec, params)
    w, a = spec.width, spec.width // spec.num_heads
    c, t, e = np.meshgrid(np.arange(w), np.arange(3), np.arange(w), indexing="ij")
    for i in range(spec.depth):
        real = params["blocks"][i]["attn"]
        qkv = padded["blocks"]["attn"]["qkv"]
        np.testing.assert_array_equal(
            qkv["kernel"][i][c, t, e], real["qkv"]["kernel"][c, t * w + e]
        )
        np.testing.assert_array_equal(qkv["bias"][i][:, :w].reshape(-1), real["qkv"]["bias"])
        proj = padded["blocks"]["attn"]["proj"]["kernel"][i]
        np.testing.assert_array_equal(proj[:w, :w], real["proj"]["kernel"])
    arrays = bk.arch_arrays(bucket, spec)
    cols, mask = arrays["head_cols_SxA"], arrays["head_mask_SxA"]
    head_of = arrays["head_of_SxH"]
    sub = bucket.head_width
    assert cols.shape == mask.shape == (bucket.sub_heads, sub)
    assert head_of.shape == (bucket.sub_heads, bucket.num_heads)
    u = -(-a // sub)  # sub-heads per head
    assert u > 1  # this case cuts each head into sub-heads
    for s in range(bucket.sub_heads):
        h, i = divmod(s, u)
        assert head_of[s].tolist() == [
            float(s < spec.num_heads * u and k == h) for k in range(bucket.num_heads)
        ]
        for j in range(sub):
            real = h < spec.num_heads and i * sub + j < a
            assert mask[s, j] == float(real)
            if real:  # head h's (i * sub + j)-th column of the real model
                assert cols[s, j] == h * a + i * sub + j
    # Every real column is read by exactly one real (sub-head, position): nothing is lost.
    assert sorted(cols[mask > 0].tolist()) == list(range(w))


@pytest.mark.parametrize("name,i", [("vit-cls", 2), ("gpt2-tied", 2), ("gpt2-untied", 1)])
def test_padding_contributes_nothing_and_gets_no_gradient(name, i):
    """Garbage (1e4-sized, inf, NaN) at every padded position, an absent block included,
    changes no logit and no gradient; padded positions get exactly zero gradient and the
    real positions the real model's gradient."""
    bucket, spec = _bucket(name), BUCKETS[name][i]
    model, params = _model(spec, seed=3)
    x = _input(spec)
    arrays = bk.arch_arrays(bucket, spec)
    masks = _real_positions(bucket, spec, params)
    clean = bk.embed_params(bucket, spec, params)
    dirty = _garbage_like(clean, masks, seed=5)
    assert any(np.isnan(v).any() for v in jax.tree.leaves(dirty))
    # The same program on inputs that agree after masking: bitwise.
    np.testing.assert_array_equal(
        _forward(bucket, dirty, arrays, x), _forward(bucket, clean, arrays, x)
    )
    out_shape = _forward(bucket, clean, arrays, x).shape
    w = jax.random.normal(jax.random.key(1), out_shape)

    @functools.partial(jax.jit, static_argnums=0)
    def grad(bucket, padded):
        return jax.grad(lambda p: jnp.sum(bk.forward(bucket, p, arrays, x) * w))(padded)

    g_dirty, g_clean = grad(bucket, dirty), grad(bucket, clean)
    for g, gc, m in zip(*map(jax.tree.leaves, (g_dirty, g_clean, masks))):
        g, m = np.asarray(g), np.asarray(m)
        assert np.all(g[m == 0] == 0)
        np.testing.assert_array_equal(g, gc)
    real_grad = nnx.jit(nnx.grad(lambda mdl: jnp.sum(mdl(x) * w)))
    want = nnx.to_pure_dict(real_grad(model))
    # Backward runs the forward's reductions again, plus the sum over the batch's
    # tokens that every weight gradient is.
    assert_trees_close(
        bk.extract_params(bucket, spec, g_dirty),
        jax.tree.map(np.asarray, want),
        reduction=_reduction(bucket, spec, x) + x.shape[0] * _tokens(bucket, x),
        err_msg=spec.name,
    )


def test_bfloat16_compute_ignores_padding():
    bucket, spec = _bucket("gpt2-tied"), BUCKETS["gpt2-tied"][2]
    _, params = _model(spec)
    x, arrays = _input(spec), bk.arch_arrays(bucket, spec)
    clean = bk.embed_params(bucket, spec, params)
    dirty = _garbage_like(clean, _real_positions(bucket, spec, params), seed=2)
    got = _forward(bucket, dirty, arrays, x, dtype=jnp.bfloat16)
    assert got.dtype == jnp.float32 and np.all(np.isfinite(got))
    np.testing.assert_array_equal(got, _forward(bucket, clean, arrays, x, dtype=jnp.bfloat16))


def test_sampled_pools_fit_their_smallest_bucket():
    vits = zoo.sample("vits-1k", 20, depth=(1, 4), width=(16, 64), min_head_dim=4, **VIT)
    gpts = zoo.sample("gpts-1k", 20, depth=(1, 4), width=(16, 64), **GPT)
    for specs in (vits, gpts):
        bucket = bk.smallest_bucket(specs)
        assert all(bk.fits(bucket, s) for s in specs)
        assert bucket.depth == max(s.depth for s in specs)
        # The sub-head width is a head width of the pool, and the gathered attention
        # columns (sub-heads x width) are no wider than any single head width would give.
        widths = {s.width // s.num_heads for s in specs}
        assert bucket.head_width in widths
        need = {
            a: max(s.num_heads * -(-(s.width // s.num_heads) // a) * a for s in specs)
            for a in widths
        }
        assert bucket.sub_heads * bucket.head_width == min(need.values())
        shapes = {jax.tree.map(np.shape, bk.arch_arrays(bucket, s)).__repr__() for s in specs}
        assert len(shapes) == 1  # stackable over a meta-batch


@pytest.mark.parametrize("name", ["vit-cls", "gpt2-tied"])
def test_one_compiled_program_serves_the_bucket(name):
    bucket, specs = _bucket(name), BUCKETS[name][:3]
    assert len({(s.depth, s.width, s.num_heads) for s in specs}) == 3
    x = _input(specs[0])
    arrays_spec = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), bk.arch_arrays(bucket, specs[0])
    )
    # A fresh jit, lowered and compiled once: every call below runs this one executable
    # (a compiled object cannot retrace or recompile; a shape mismatch would raise).
    compiled = (
        jax.jit(functools.partial(bk.forward, bucket))
        .lower(bk.padded_shapes(bucket), arrays_spec, jax.ShapeDtypeStruct(x.shape, x.dtype))
        .compile()
    )
    for seed, spec in enumerate(specs):
        model, params = _model(spec, seed)
        got = compiled(bk.embed_params(bucket, spec, params), bk.arch_arrays(bucket, spec), x)
        assert_close(
            got, _real_forward(model, x), reduction=_reduction(bucket, spec, x), err_msg=spec.name
        )


@pytest.mark.parametrize("name,pair", [("vit-cls", (0, 1)), ("gpt2-tied", (1, 2))])
def test_vmap_over_meta_batch(name, pair):
    bucket = _bucket(name)
    specs = [BUCKETS[name][i] for i in pair]
    params = [bk.embed_params(bucket, s, _model(s, seed)[1]) for seed, s in enumerate(specs)]
    arrays = [bk.arch_arrays(bucket, s) for s in specs]
    x = _input(specs[0])
    batched = jax.jit(jax.vmap(functools.partial(bk.forward, bucket), in_axes=(0, 0, None)))
    got = batched(_stack(params), _stack(arrays), x)
    for k, spec in enumerate(specs):
        want = _forward(bucket, params[k], arrays[k], x)
        assert_close(got[k], want, reduction=_reduction(bucket, spec, x), err_msg=spec.name)


def test_clear_errors():
    vit_bucket, gpt_bucket = _bucket("vit-cls"), _bucket("gpt2-tied")
    too_deep = ViTSpec(depth=4, width=16, num_heads=1, **VIT)
    too_many_heads = ViTSpec(depth=1, width=48, num_heads=16, **VIT)
    assert not bk.fits(vit_bucket, too_deep) and not bk.fits(vit_bucket, too_many_heads)
    with pytest.raises(ValueError, match="depth 4 > 3"):
        bk.arch_arrays(vit_bucket, too_deep)
    with pytest.raises(ValueError, match="num_heads 16 > 8"):
        bk.embed_params(vit_bucket, too_many_heads, {})
    other_patch = ViTSpec(depth=1, width=16, num_heads=1, **{**VIT, "patch_size": 2})
    assert not bk.fits(vit_bucket, other_patch)
    with pytest.raises(ValueError, match="bucket key"):
        bk.arch_arrays(vit_bucket, other_patch)
    with pytest.raises(ValueError, match="different bucket keys"):
        bk.smallest_bucket([BUCKETS["vit-cls"][0], other_patch])
    with pytest.raises(ValueError, match="different bucket keys"):
        bk.smallest_bucket([BUCKETS["vit-cls"][0], BUCKETS["gpt2-tied"][0]])
    with pytest.raises(ValueError, match="different bucket keys"):
        bk.smallest_bucket(BUCKETS["gpt2-tied"] + BUCKETS["gpt2-untied"])
    assert not bk.fits(gpt_bucket, BUCKETS["vit-cls"][0])
    with pytest.raises(ValueError, match="no bucketed forward"):
        bk.bucket_key(ResNetSpec())
    assert not bk.fits(vit_bucket, ResNetSpec())
    with pytest.raises(ValueError, match="at least one"):
        bk.smallest_bucket([])
    with pytest.raises(ValueError, match="pool"):
        bk.Bucket.from_json({**vit_bucket.to_json(), "pool": "max"})
    with pytest.raises(ValueError, match="has no vocab_size"):
        bk.Bucket.from_json({**vit_bucket.to_json(), "vocab_size": 5})
    with pytest.raises(ValueError, match="unknown Bucket field"):
        bk.Bucket.from_json({**gpt_bucket.to_json(), "heads": 5})

    spec = BUCKETS["gpt2-tied"][0]
    params = {k: v for k, v in _model(spec)[1].items() if k != "ln_f"}
    with pytest.raises(ValueError, match="missing.*ln_f"):
        bk.embed_params(gpt_bucket, spec, params)
    padded = bk.embed_params(gpt_bucket, spec, _model(spec)[1])
    arrays = bk.arch_arrays(gpt_bucket, spec)
    with pytest.raises(ValueError, match="seq_len <= 16"):
        bk.forward(gpt_bucket, padded, arrays, jnp.zeros((2, 17), jnp.int32))
    with pytest.raises(ValueError, match="padded_shapes"):
        bk.forward(_bucket("gpt2-untied"), padded, arrays, jnp.zeros((2, 4), jnp.int32))


def test_partition_cuts_along_the_width_and_lowers_the_cost():
    specs = zoo.space(
        "vits-1k", depth=(2, 4), width=(32, 128), width_multiple=16, max_heads=8, patch_size=4
    )
    specs += zoo.space("vits-1k", depth=2, width=(32, 64), width_multiple=32, patch_size=8)

    def cost(groups):
        return sum(len(g) * bk.cost(bk.smallest_bucket(g)) for g in groups)

    one, three = bk.partition(specs, 1), bk.partition(specs, 3)
    assert len(one) == 2  # one per bucket key (the patch sizes), whatever max_buckets
    assert len(three) == 3  # the spare bucket goes to the key where it saves most
    for groups in (one, three):
        listed = [s for g in groups for s in g]
        assert len(listed) == len(set(listed)) and set(listed) == set(specs)  # each spec once
        for g in groups:
            assert len({bk.bucket_key(s) for s in g}) == 1
    assert cost(three) < 0.75 * cost(one)
    # Runs are cut along the width: within a key, the groups' widths do not interleave.
    key = bk.bucket_key(three[0][0])
    ranges = [(min(s.width for s in g), max(s.width for s in g)) for g in three]
    ranges = [r for r, g in zip(ranges, three, strict=True) if bk.bucket_key(g[0]) == key]
    assert len(ranges) == 2 and ranges[0][1] <= ranges[1][0], ranges
    assert bk.partition(reversed(specs), 3) == three  # deterministic, order-free
    with pytest.raises(ValueError, match="max_buckets"):
        bk.partition(specs, 0)


def test_sub_heads_keep_mixed_head_layouts_near_the_width():
    """Same width and depth, 1-4 heads (head widths 48, 24, 16, 12): no weight pads, and
    the attention's sub-head layout gathers about the width in columns for all of them,
    where one sub-head per head would run 4 heads of 48 (4x the width) for every spec."""
    import dataclasses

    vit = {**VIT, "image_size": 32}  # 64 patches: attention matters
    specs = [ViTSpec(**vit, depth=3, width=48, num_heads=h) for h in (1, 2, 3, 4)]
    one = bk.smallest_bucket(specs)
    assert bk.padded_size(one) == bk.padded_size(bk.smallest_bucket(specs[:1]))
    assert (one.num_heads, one.sub_heads, one.head_width) == (4, 4, 16)  # 64 columns
    per_head = dataclasses.replace(one, sub_heads=4, head_width=48)
    assert bk.fits(per_head, specs[0]) and bk.fits(one, specs[0])
    assert bk.cost(one) < 0.6 * bk.cost(per_head)
    real = sum(bk.cost(bk.smallest_bucket([s])) for s in specs)
    assert len(specs) * bk.cost(one) < 1.3 * real
    # Exact for every head layout (the model's own attention, summed from sub-heads).
    x = _input(specs[0])
    for seed, spec in enumerate(specs):
        model, params = _model(spec, seed)
        got = _forward(one, bk.embed_params(one, spec, params), bk.arch_arrays(one, spec), x)
        assert_close(
            got, _real_forward(model, x), reduction=_reduction(one, spec, x), err_msg=spec.name
        )
    two = bk.partition(specs, 2)
    split = sum(len(g) * bk.cost(bk.smallest_bucket(g)) for g in two)
    assert split <= len(specs) * bk.cost(one)
    assert len(bk.partition(specs, 1)) == 1
