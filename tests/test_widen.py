"""Function-preserving widening (ghn.zoo.widen) and predictions past a GHN's trained widths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerances import assert_close, transformer_reduction

import ghn
from ghn import evaluate, zoo
from ghn.errors import ConfigError
from ghn.zoo import widen

GPT = zoo.GPT2Spec(depth=2, width=16, num_heads=2, vocab_size=11, context_length=8)
VIT = zoo.ViTSpec(
    depth=2, width=16, num_heads=2, image_size=8, patch_size=4, in_channels=1, num_classes=3
)


def random_params(state, seed: int):
    """Every parameter of `state` drawn N(0, 0.5^2): norm scales, biases and the zero-init
    head included, so a copy or a scale applied to the wrong axis shows in the output."""
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        treedef, [jnp.asarray(0.5 * rng.standard_normal(x.shape), jnp.float32) for x in leaves]
    )


def forward(spec, params, x):
    """`spec`'s model holding `params`, on x: one compiled program, built abstractly (eager
    NNX would compile every op and every initializer)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0))))
    return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x)


def abstract_params(spec):
    return nnx.state(nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0))), nnx.Param)


widen_jit = jax.jit(widen.widen, static_argnums=(1, 2))


@pytest.mark.parametrize(
    "source, width, heads",
    [
        (GPT, 32, 2),  # head width doubled: the query divided by sqrt(2)
        (GPT, 32, 4),  # heads doubled
        (GPT.replace(tie_embeddings=False), 96, 6),  # k = 6: 3x heads, 2x head width
        (VIT, 48, 2),  # k = 3 in head width
        (VIT, 64, 4),
        (VIT.replace(pool="mean"), 32, 4),
    ],
)
def test_a_widened_model_computes_the_narrow_models_function(source, width, heads):
    target = source.replace(width=width, num_heads=heads)
    params = random_params(abstract_params(source), 1)
    x = source.example_input(3)
    want = forward(source, params, x)
    got = forward(target, widen_jit(params, source, target), x)
    tokens = x.shape[1] if isinstance(source, zoo.GPT2Spec) else 5
    # The wide model sums k copies where the narrow one has one term: the reduction
    # lengths are the wide model's.
    reduction = transformer_reduction(
        depth=target.depth, width=width, mlp_width=4 * width, head_dim=width // heads, tokens=tokens
    )
    reduction += width + 16  # the head (or tied embedding) over the width; the patch kernel
    assert_close(got, want, reduction=reduction)
    # And it is not the trivial match: the wide model differs from a random one.
    other = random_params(abstract_params(target), 2)
    assert not np.allclose(forward(target, other, x), want, atol=1e-2)


def test_widening_copies_units_and_divides_what_reads_them():
    target = GPT.replace(width=48, num_heads=2)  # k = 3 = head width ratio
    params = random_params(abstract_params(GPT), 2)
    wide = widen.widen(params, GPT, target)
    fc = np.asarray(params["blocks"][0]["mlp"]["c_fc"]["kernel"][...])
    wfc = np.asarray(wide["blocks"][0]["mlp"]["c_fc"]["kernel"][...])
    assert wfc.shape == (48, 192)
    # Elementwise: x / 3 * 3 rounds twice.
    assert_close(wfc[::3, ::3] * 3, fc, reduction=1)  # read residual copies / 3
    np.testing.assert_array_equal(wfc[1::3], wfc[::3])
    # Query columns of head 0 copy the narrow head 0's, divided by sqrt(3).
    qkv = np.asarray(params["blocks"][0]["attn"]["c_attn"]["kernel"][...])
    wqkv = np.asarray(wide["blocks"][0]["attn"]["c_attn"]["kernel"][...])
    assert_close(wqkv[0, :24:3] * 3 * np.sqrt(3), qkv[0, :8], reduction=1)
    assert_close(wqkv[0, 48:72:3] * 3, qkv[0, 16:24], reduction=1)  # keys: not scaled
    # The tied head reads the embedding over copied units: the final norm carries 1/k.
    ln = np.asarray(params["ln_f"]["scale"][...])
    assert_close(np.asarray(wide["ln_f"]["scale"][...])[::3] * 3, ln, reduction=1)


def test_ratios_reject_what_is_not_an_integer_widening():
    with pytest.raises(ConfigError, match="integer widening"):
        widen.ratios(GPT, GPT.replace(width=24, num_heads=2))
    with pytest.raises(ConfigError, match="fields other than width"):
        widen.ratios(GPT, GPT.replace(width=32, depth=3))
    with pytest.raises(ConfigError, match="two ViTs or two GPT-2s"):
        widen.ratios(GPT, VIT.replace(width=32))
    with pytest.raises(ConfigError, match="integer widening"):  # 3 heads of 16 from 2 of 8
        widen.ratios(GPT, GPT.replace(width=48, num_heads=3))


def test_narrower_takes_the_widest_trained_width_a_target_is_a_multiple_of():
    target = zoo.GPT2Spec(depth=9, width=192, num_heads=8)
    trained = {(w, 8) for w in range(16, 129, 8)}
    assert widen.narrower(target, trained) == target.replace(width=96)
    # Among equal widths, a trained (width, heads) pair first, then fewer copied heads.
    assert widen.narrower(target, {(96, 4), (128, 8)}) == target.replace(width=96, num_heads=4)
    assert widen.narrower(target, {(64, 1)}).num_heads == 8  # 64 = 8 heads of 8: a = 1
    # GPT-2 small from 8-head training: no 8-head narrowing of 12 heads; the widest
    # width within training, keeping as many heads as divide.
    small = zoo.get("gpt2")
    assert widen.narrower(small, trained) == small.replace(width=128, num_heads=4)
    assert widen.narrower(target.replace(width=128), trained) is None  # trained width
    assert widen.narrower(target, set()) is None
    assert widen.narrower(zoo.get("resnet18"), trained) is None
    assert widen.narrower(target.replace(width=193, num_heads=1), trained) is None  # prime


def test_predict_model_widens_past_the_trained_widths():
    """A target past the decoder's K, which the GHN cannot predict directly, is predicted
    at a trained width and widened: the same function as that prediction."""
    setup = evaluate.Setup.from_name("mnist5k")
    hyper = ghn.GHN(ghn.GHNConfig.named("tiny", max_dim=400), rngs=nnx.Rngs(0))
    spec = setup.fit(zoo.get("vit-ti", depth=1, width=128, num_heads=2, patch_size=7))
    with pytest.raises(ConfigError, match="does not fit"):
        evaluate.check_fits(hyper, spec, setup)  # 896-row patch kernel, 512-wide MLP: > K
    widths = {(32, 2), (48, 2)}
    evaluate.check_fits(hyper, spec, setup, widths=widths)
    source = evaluate.widened_from(spec, widths)
    assert source == spec.replace(width=32)  # 128 = 4 x 32; 48 does not divide it
    model, predicted = evaluate.predict_model(hyper, spec, setup, widths=widths)
    narrow, _ = evaluate.predict_model(hyper, source, setup)
    x = spec.example_input(4)
    tokens = 17  # 16 patches and the class token
    reduction = transformer_reduction(
        depth=1, width=128, mlp_width=512, head_dim=64, tokens=tokens
    ) + (128 + 49)  # the head over the width; the 7 x 7 patch kernel
    got = forward(spec, nnx.state(model, nnx.Param), x)
    assert_close(got, forward(source, nnx.state(narrow, nnx.Param), x), reduction=reduction)
    assert jax.tree.structure(predicted) == jax.tree.structure(nnx.state(model, nnx.Param))
    # compare() fine-tunes that init and says where it came from.
    recipe = evaluate.Recipe(steps=2, batch_size=8, eval_batch_size=50, eval_batches=1)
    no_probe = evaluate.Policy(probe_steps=0)  # an untrained GHN: the probe may take random
    families = {type(spec)}  # the GHN's own family
    result = evaluate.compare(
        hyper, spec, setup, recipe, policy=no_probe, widths=widths, families=families
    )
    pred, rand = result.rows()
    assert pred["widened_from"] == source.name and "widened_from" not in rand
    assert f"(widened from {source.name})" in evaluate.init_label(pred)
    # The default mix adds the random init to a widened prediction (its copies must part),
    # nothing to one of the GHN's own family at a trained width, and the random init again
    # to one of a family the GHN did not train on (no `families`).
    assert pred["mix"] == 1.0 and ", + random" in evaluate.init_label(pred)
    direct = spec.replace(width=48, num_heads=2)
    for fams, mix in [(families, 0.0), (None, 1.0)]:
        result = evaluate.compare(
            hyper, direct, setup, recipe, policy=no_probe, widths=widths, families=fams
        )
        pred, _ = result.rows()
        assert pred["mix"] == mix and "widened_from" not in pred
        label = evaluate.init_label(pred).replace("random blocks", "")
        assert ("+ random" in label) == bool(mix), label


def test_the_auto_mix_adds_nothing_only_to_the_ghns_own_families():
    policy = evaluate.Policy()
    assert (policy.mix_for(in_family=True), policy.mix_for(in_family=False)) == (0.0, 1.0)
    assert evaluate.Policy(mix=0.5).mix_for(in_family=True) == 0.5
    with pytest.raises(ConfigError, match="auto"):
        evaluate.Policy(mix="sometimes")
    with pytest.raises(ConfigError, match="blend"):
        evaluate.Policy(mix=1.5, combine="blend")


def test_trained_widths_are_those_a_shipped_ghn_trained_on():
    widths = evaluate.trained_widths(ghn.hub.info("gpt2-text"))
    # gpts-1k with 8 heads over widths 16-128 in multiples of 8.
    assert widths == {(w, 8) for w in range(16, 129, 8)}
    vit = evaluate.trained_widths(ghn.hub.info("vit-mnist"))
    assert max(w for w, _ in vit) == 128 and (96, 8) in vit and (128, 1) in vit
    assert evaluate.trained_widths({}) is None  # no training record
    assert evaluate.trained_families(ghn.hub.info("vit-mnist")) == {zoo.ViTSpec}
    assert evaluate.trained_families(ghn.hub.info("gpt2-text")) == {zoo.GPT2Spec}
    assert evaluate.trained_families({}) is None
