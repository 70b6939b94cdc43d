"""Mimetic init (ghn.baselines): the attention products it promises, read as the forward pass
reads the kernels, on the state tree of the family's random init."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerances import assert_close, transformer_reduction

import ghn
from ghn import baselines, evaluate, zoo
from ghn.errors import ConfigError

SPECS = {
    "vit": zoo.get(
        "vit-ti", depth=2, width=32, num_heads=2, patch_size=7, image_size=28, in_channels=1
    ),
    "gpt2": zoo.get("gpt2", depth=2, width=32, num_heads=4, vocab_size=64, context_length=16),
}


def attention_layers(model):
    """(qkv Linear, output Linear, num_heads) of each attention layer, in model order."""
    out = []
    for _, m in nnx.iter_modules(model):
        if type(m) in baselines.ATTENTION_LAYERS:
            qkv, proj = baselines.ATTENTION_LAYERS[type(m)]
            out.append((getattr(m, qkv), getattr(m, proj), m.num_heads))
    return out


def head_weights(qkv_DxD3, num_heads):
    """q, k, v of each head as (H, D, A): the kernel's columns s * D + h * A + a."""
    d = qkv_DxD3.shape[0]
    w_Dx3xHxA = np.asarray(qkv_DxD3, np.float64).reshape(d, 3, num_heads, d // num_heads)
    return tuple(np.transpose(w_Dx3xHxA[:, s], (1, 0, 2)) for s in range(3))


def reference_attention(x_LxD, qkv, proj, num_heads, *, causal):
    """Self-attention written from `head_weights`' reading of the kernels, in float64."""
    wq, wk, wv = head_weights(qkv.kernel[...], num_heads)
    b = np.asarray(qkv.bias[...], np.float64).reshape(3, num_heads, -1)
    x = np.asarray(x_LxD, np.float64)
    length, d = x.shape
    a = d // num_heads
    heads = []
    for h in range(num_heads):
        q, k, v = (x @ w[h] + b[s, h] for s, w in enumerate((wq, wk, wv)))
        logits_LxL = q @ k.T / math.sqrt(a)
        if causal:
            logits_LxL = np.where(np.tri(length, dtype=bool), logits_LxL, -np.inf)
        p_LxL = np.exp(logits_LxL - logits_LxL.max(axis=1, keepdims=True))
        heads.append((p_LxL / p_LxL.sum(axis=1, keepdims=True)) @ v)
    out = np.concatenate(heads, axis=1) @ np.asarray(proj.kernel[...], np.float64)
    return out + np.asarray(proj.bias[...], np.float64)


def mimetic_model(family, seed=0, **kw):
    spec = SPECS[family]
    model = spec.build(rngs=nnx.Rngs(seed))
    nnx.update(model, baselines.mimetic_init(model, spec, seed=seed, **kw))
    return spec, model


@pytest.mark.parametrize("family", ["vit", "gpt2"])
def test_head_reading_is_the_forward_pass(family):
    # Pins `head_weights` (used below) to the model's own attention.
    spec, model = mimetic_model(family)
    attn = model.blocks[0].attn
    qkv, proj, h = attention_layers(model)[0]
    x_1xLxD = jax.random.normal(jax.random.key(1), (1, 8, spec.width))
    got = attn(x_1xLxD)[0]
    want = reference_attention(x_1xLxD[0], qkv, proj, h, causal=family == "gpt2")
    # float32 forward against float64: round-off of the qkv projection (D terms), logits
    # (A), mixing (L = 8) and output projection (D), at the scale of the output.
    d = spec.width
    assert_close(got, want, reduction=d + d // h + 8 + d)


@pytest.mark.parametrize("family", ["vit", "gpt2"])
def test_query_key_and_value_output_products_are_the_targets(family):
    spec, model = mimetic_model(family, seed=3)
    d = spec.width
    for i, (qkv, proj, h) in enumerate(attention_layers(model)):
        a = d // h
        wq_HxDxA, wk_HxDxA, _ = head_weights(qkv.kernel[...], h)
        key = baselines.layer_key(3, i)
        qk_HxDxD, vo_DxD = baselines.mimetic_targets(key, d, h, 0.7, 0.7, 0.4, 0.4)
        for j in range(h):
            p_DxD = wq_HxDxA[j] @ wk_HxDxA[j].T
            # The best rank-A approximation of the head's target, by a full SVD here. (Its
            # trace is not β1·D: the top singular directions of α1 Z1 + β1 I lean towards
            # the identity, so tr/A ranges over 1.05-1.42 for D/A = 2-12; hence the
            # reconstruction, and `test_pure_identity_targets_give_scaled_projections`.)
            u, s, vt = np.linalg.svd(qk_HxDxD[j])
            best_DxD = (u[:, :a] * s[:a]) @ vt[:a]
            # float32 factors (one rounding each), A products summed.
            scale = np.abs(wq_HxDxA[j]).max() * np.abs(wk_HxDxA[j]).max()
            assert_close(p_DxD, best_DxD, reduction=a, scale=scale, err_msg=f"layer {i} head {j}")
            # The check tells query from key: swapping them (Pᵀ) is far outside it.
            assert np.abs(p_DxD.T - best_DxD).max() > 100 * np.abs(p_DxD - best_DxD).max()
        wv_DxD = np.asarray(qkv.kernel[...], np.float64)[:, 2 * d :]
        vo = wv_DxD @ np.asarray(proj.kernel[...], np.float64)
        scale = np.abs(wv_DxD).max() * np.abs(np.asarray(proj.kernel[...])).max()
        assert_close(vo, vo_DxD, reduction=d, scale=scale, err_msg=f"layer {i} value-output")
        # Its projection on the identity: -β2 + α2 tr(Z2)/D, where tr(Z2) ~ N(0, 1)
        # (D entries of variance 1/D): within 4 standard deviations, 4 α2 / D.
        assert abs(np.trace(vo) / d + 0.4) < 4 * 0.4 / d


@pytest.mark.parametrize("family", ["vit", "gpt2"])
def test_pure_identity_targets_give_scaled_projections(family):
    # α = 0 leaves β I: per head β times a rank-A orthogonal projection, and -β2 I exactly.
    spec, model = mimetic_model(family, alpha1=0.0, beta1=0.7, alpha2=0.0, beta2=0.4)
    d = spec.width
    for qkv, proj, h in attention_layers(model):
        a = d // h
        wq_HxDxA, wk_HxDxA, _ = head_weights(qkv.kernel[...], h)
        for j in range(h):
            p = wq_HxDxA[j] @ wk_HxDxA[j].T
            assert_close(p, p.T, reduction=a, scale=0.7)
            assert_close(p @ p, 0.7 * p, reduction=a + d, scale=0.7**2)
            assert np.trace(p) == pytest.approx(0.7 * a, rel=1e-5)
        vo = np.asarray(qkv.kernel[...], np.float64)[:, 2 * d :] @ np.asarray(proj.kernel[...])
        assert_close(vo, -0.4 * np.eye(d), reduction=d, scale=0.4)


@pytest.mark.parametrize("family", ["vit", "gpt2"])
def test_state_matches_the_model_and_only_attention_kernels_change(family):
    spec = SPECS[family]
    model = spec.build(rngs=nnx.Rngs(0))
    random = nnx.state(model, nnx.Param)
    before = jax.tree.map(np.array, random)
    state = baselines.mimetic_init(model, spec, seed=0)
    assert jax.tree.structure(state) == jax.tree.structure(random)
    flat = jax.tree_util.tree_flatten_with_path
    changed = []
    for (path, x), y, b in zip(flat(state)[0], jax.tree.leaves(random), jax.tree.leaves(before)):
        assert x.shape == y.shape and x.dtype == y.dtype, path
        np.testing.assert_array_equal(y, b)  # the model's own parameters are untouched
        if not np.array_equal(x, y):
            changed.append(jax.tree_util.keystr(path))
    # 2 blocks x (fused qkv kernel, output kernel); biases, MLPs, embeddings, norms, head keep
    # the random init.
    assert len(changed) == 4 and all("kernel" in c for c in changed), changed
    assert all(("qkv" in c or "proj" in c or "c_attn" in c or "c_proj" in c) for c in changed)


def test_deterministic_given_the_seed():
    spec = SPECS["gpt2"]
    model = spec.build(rngs=nnx.Rngs(0))
    a = baselines.mimetic_init(model, spec, seed=0)
    b = baselines.mimetic_init(spec.build(rngs=nnx.Rngs(0)), spec, seed=0)
    c = baselines.mimetic_init(model, spec, seed=1)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)  # the same program on the same inputs
    assert any(not np.array_equal(x, z) for x, z in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def test_cnns_and_unknown_names_get_a_clear_error():
    spec = zoo.get("resnet18", num_classes=10, image_size=32)
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    with pytest.raises(ConfigError, match=re.escape(f"{spec.name} is a resnet")):
        baselines.mimetic_init(model, spec, seed=0)
    with pytest.raises(ConfigError, match="vit and gpt2"):
        baselines.check_baseline("mimetic", spec)
    with pytest.raises(ConfigError, match="unknown baseline 'fixup'; available: mimetic"):
        baselines.check_baseline("fixup", SPECS["vit"])


def test_mimetic_init_sets_attention_that_runs_and_is_finite():
    for family, spec in SPECS.items():
        _, model = mimetic_model(family)
        out = model(spec.example_input())
        assert bool(jnp.all(jnp.isfinite(out))), family


@pytest.mark.slow  # ~40 s: a GHN prediction and three fine-tunings compile
def test_compare_adds_a_mimetic_row_that_starts_from_mimetic_init():
    setup = evaluate.Setup.from_name("mnist5k")
    # A non-zero head, so that every init's step-0 loss depends on its attention.
    spec = setup.fit(SPECS["vit"].replace(head_zeroinit=False, depth=1, width=16))
    hyper = ghn.GHN(
        ghn.GHNConfig(d_model=32, num_layers=1, num_heads=2, rank=4, max_dim=256), rngs=nnx.Rngs(0)
    )
    recipe = evaluate.Recipe(
        steps=2,
        warmup_steps=0,
        batch_size=8,
        eval_batches=1,
        eval_batch_size=50,
        num_points=1,
        seed=5,
    )
    result = evaluate.compare(hyper, spec, setup, recipe, baselines=["mimetic"])
    assert list(result.curves) == ["predicted", "mimetic", "random"]
    rows = {r["init"]: r for r in result.rows()}
    assert "speedup" in rows["mimetic"] and rows["random"]["speedup"] is None

    model = spec.build(rngs=nnx.Rngs(recipe.seed))
    random_loss = eager_loss(model, setup, recipe)
    nnx.update(model, baselines.mimetic_init(model, spec, seed=recipe.seed))
    mimetic_loss = eager_loss(model, setup, recipe)
    assert abs(mimetic_loss - random_loss) > 1e-3  # the attention matters at step 0
    # compare's jitted evaluation against this eager one: round-off along the 1-block ViT
    # and the mean over 50 images, at the scale of the loss.
    tokens = (spec.image_size // spec.patch_size) ** 2 + 1
    n = (
        spec.patch_size**2
        + transformer_reduction(depth=1, width=16, mlp_width=64, head_dim=8, tokens=tokens)
        + 10
        + 50
    )
    for init, loss in (("mimetic", mimetic_loss), ("random", random_loss)):
        assert_close(result.curves[init].eval_loss[0], loss, reduction=n, scale=loss, err_msg=init)

    with pytest.raises(ConfigError, match="is a resnet"):
        evaluate.compare(hyper, zoo.get("resnet18"), setup, recipe, baselines=["mimetic"])


def eager_loss(model, setup, recipe) -> float:
    sums = setup.task.sums(model, setup.eval_batches(recipe)[0])
    return float(sums["loss_sum"] / sums["count"])
