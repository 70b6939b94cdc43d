"""Tempering the output layer: exact rescaling of the logits, the loss-minimizing scale."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from custom_models import SmallCNN
from flax import nnx
from tolerances import assert_close, transformer_reduction

from ghn import zoo
from ghn.calibrate import (
    BLEND_GRID,
    fit_scale,
    keep_blocks,
    mean_loss,
    output_scale_paths,
    prepare,
    probe_choice,
    safeguard,
    temper,
)
from ghn.errors import ConfigError
from ghn.graph import trace
from ghn.params import with_random_blocks
from ghn.tasks import Task


def mean_ce(logits, labels, a: float) -> float:
    return float(optax.softmax_cross_entropy_with_integer_labels(a * logits, labels).mean())


@pytest.mark.parametrize("signal", [0.0, 0.5, 3.0])
def test_fit_scale_minimizes_the_loss_over_zero_to_one(signal):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 2000)
    # Logits with some signal towards the label, plus confident noise.
    logits = 4.0 * rng.normal(size=(2000, 10)) + signal * np.eye(10)[labels] * 4.0
    a = fit_scale(logits, labels)
    assert 0.0 <= a <= 1.0
    grid = np.linspace(0.0, 1.0, 201)
    best = min(mean_ce(jnp.asarray(logits), jnp.asarray(labels), g) for g in grid)
    # The convex loss at the bisection's alpha is at most the grid's best.
    assert mean_ce(jnp.asarray(logits), jnp.asarray(labels), a) <= best + 1e-5
    assert mean_ce(jnp.asarray(logits), jnp.asarray(labels), a) <= math.log(10) + 1e-6
    if signal == 0.0:
        assert a < 0.05  # pure noise: (nearly) uniform
    # Right and not overconfident: nothing to temper.
    assert fit_scale(3.0 * np.eye(10)[labels] + 0.1 * rng.normal(size=(2000, 10)), labels) == 1.0


def vit():
    spec = zoo.ViTSpec(depth=2, width=32, num_heads=2, patch_size=4, image_size=8, num_classes=5)
    return spec, spec.build(rngs=nnx.Rngs(0))


def gpt(tied: bool):
    spec = zoo.GPT2Spec(
        depth=2, width=32, num_heads=2, vocab_size=40, context_length=8, tie_embeddings=tied
    )
    return spec, spec.build(rngs=nnx.Rngs(0))


def test_output_scale_paths_follow_the_graph():
    spec, model = vit()
    assert set(output_scale_paths(trace(model, spec.input_spec(2)))) == {
        "head/kernel",
        "head/bias",
    }
    spec, model = gpt(tied=True)
    tied = set(output_scale_paths(trace(model, spec.input_spec(2, seq_len=8))))
    assert tied == {"ln_f/scale", "ln_f/bias"}  # the embedding also feeds the input
    spec, model = gpt(tied=False)
    untied = output_scale_paths(trace(model, spec.input_spec(2, seq_len=8)))
    assert untied and all(p.startswith("lm_head/") for p in untied)

    class Softmaxed(nnx.Module):
        def __init__(self, rngs):
            self.net = SmallCNN(rngs=rngs)

        def __call__(self, x):
            return self.net(x) + self.net(x)  # ends in a parameter-free sum

    with pytest.raises(ConfigError, match="cannot be rescaled"):
        output_scale_paths(trace(Softmaxed(nnx.Rngs(0)), jnp.zeros((2, 16, 16, 3))))


def perturbed(model, seed: int):
    """The model with every parameter randomized (a zero head would make tempering trivial)."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [v + jnp.asarray(rng.normal(size=v.shape), v.dtype) * 0.3 for v in leaves]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))
    return model


@pytest.mark.parametrize("family", ["vit", "gpt_tied", "gpt_untied"])
def test_temper_scales_the_logits_exactly_and_never_raises_the_loss(family):
    rng = np.random.default_rng(1)
    if family == "vit":
        spec, model = vit()
        task = "image"  # a plain string works as well as a Task
        batches = [
            {
                "image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
                "label": rng.integers(0, 5, 16),
            }
            for _ in range(3)
        ]
        inputs = [jnp.asarray(b["image"]) for b in batches]
        labels = np.concatenate([b["label"] for b in batches])
        classes, tokens = 5, 5
    else:
        spec, model = gpt(tied=family == "gpt_tied")
        task = Task("text", seq_len=8)
        batches = [{"tokens": rng.integers(0, 40, (4, 9)).astype(np.int32)} for _ in range(3)]
        inputs = [jnp.asarray(b["tokens"][:, :-1]) for b in batches]
        labels = np.concatenate([b["tokens"][:, 1:].reshape(-1) for b in batches])
        classes, tokens = 40, 8
    model = perturbed(model, 0)
    before = np.concatenate([np.asarray(model(x)).reshape(-1, classes) for x in inputs])
    alpha = temper(model, task, batches)
    after = np.concatenate([np.asarray(model(x)).reshape(-1, classes) for x in inputs])
    assert 0.0 <= alpha <= 1.0
    # Random labels and perturbed weights: confidently wrong, so tempering must act.
    assert alpha < 1.0
    reduction = transformer_reduction(depth=2, width=32, mlp_width=128, head_dim=16, tokens=tokens)
    assert_close(after, alpha * before, reduction=reduction, scale=np.abs(before).max())
    loss_before = mean_ce(jnp.asarray(before), jnp.asarray(labels), 1.0)
    loss_after = mean_ce(jnp.asarray(after), jnp.asarray(labels), 1.0)
    assert loss_after <= min(loss_before, math.log(classes)) + 1e-5


def test_worse_than_uniform_tempers_only_predictions_worse_than_chance():
    """A confidently wrong prediction is tempered; one better than the uniform guess keeps
    every parameter, bitwise."""
    rng = np.random.default_rng(2)
    _, model = vit()
    model = perturbed(model, 0)
    images = [rng.normal(size=(16, 8, 8, 3)).astype(np.float32) for _ in range(3)]
    logits = [np.asarray(model(jnp.asarray(x))) for x in images]
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))

    # Labels = the model's own argmax: every image's label has probability >= 1/C, so
    # the loss is below ln C and nothing changes.
    right = [{"image": x, "label": z.argmax(-1)} for x, z in zip(images, logits, strict=True)]
    assert temper(model, "image", right, when="worse_than_uniform") == 1.0
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, after, before)

    # Labels = its least likely class: worse than chance, so it is tempered, as "always".
    wrong = [{"image": x, "label": z.argmin(-1)} for x, z in zip(images, logits, strict=True)]
    alpha = temper(model, "image", wrong, when="worse_than_uniform")
    assert 0.0 <= alpha < 1.0
    with pytest.raises(ConfigError, match="when"):
        temper(model, "image", wrong, when="sometimes")


def _loss(model, batches) -> float:
    z = np.concatenate([np.asarray(model(jnp.asarray(b["image"]))) for b in batches])
    return mean_loss(z, np.concatenate([b["label"] for b in batches]))


def test_safeguard_holds_a_prediction_to_the_reference_init():
    """eval.py's default: untouched when no worse than the reference init; tempered when
    that suffices; blended toward the reference when the reference beats the uniform
    guess and tempering cannot reach it. The loss on the batches never ends above the
    reference's."""
    rng = np.random.default_rng(3)
    images = [rng.normal(size=(16, 8, 8, 3)).astype(np.float32) for _ in range(3)]

    def fresh(seed):
        return perturbed(vit()[1], seed)

    model = fresh(0)
    logits = [np.asarray(model(jnp.asarray(x))) for x in images]
    right = [{"image": x, "label": z.argmax(-1)} for x, z in zip(images, logits, strict=True)]
    wrong = [{"image": x, "label": z.argmin(-1)} for x, z in zip(images, logits, strict=True)]

    # Better than the reference (the zoo's zero-head init: exactly ln C): bitwise untouched.
    reference = vit()[1]
    assert _loss(reference, right) == pytest.approx(math.log(5), abs=1e-6)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    assert safeguard(model, reference, "image", right) == (1.0, 1.0)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model)), before)

    # A reference loss the caller measured is the bar (`prepare` passes keep_blocks'): with
    # a bar of 0 no tempering reaches sends the prediction to the reference (b = 0), where
    # the chance-level reference's own loss would stop at tempering (next check).
    assert safeguard(fresh(0), reference, "image", wrong, reference_loss=0.0)[1] == 0.0

    # Worse than a chance-level reference: tempering reaches it, no blend.
    alpha, b = safeguard(model, reference, "image", wrong)
    assert 0.0 <= alpha < 1.0 and b == 1.0
    assert _loss(model, wrong) <= math.log(5) + 1e-6

    # A reference better than chance on these labels (the model whose argmax they are),
    # and a prediction that is the same model with its logits negated and sharpened
    # (confidently wrong): tempering stops at ln C, above the reference, so the
    # prediction is blended toward it.
    good = fresh(0)
    bar = _loss(good, right)
    assert bar < math.log(5)
    bad = fresh(0)
    bad.head.kernel[...] = -3.0 * bad.head.kernel[...]
    bad.head.bias[...] = -3.0 * bad.head.bias[...]
    assert _loss(bad, right) > math.log(5)
    alpha, b = safeguard(bad, good, "image", right)
    assert alpha < 1.0 and b < 1.0 and b in BLEND_GRID
    # safeguard compares losses of its jitted forward, `_loss` runs eagerly: float32
    # round-off of a loss ~1 over 5 classes and a 2-block forward, far below any gap.
    assert _loss(bad, right) <= bar + 1e-5


def _params(model) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def test_safeguard_returns_one_blend_of_the_tempered_prediction_and_the_reference():
    """Labels from the midpoint of two ViTs with one head; the reference a quarter of the
    way from the second to the first; the prediction the first with its head negated and
    sharpened. Tempering zeroes that head (loss ln 5, above the reference's), and the
    blend's body passes the midpoint at b = 1/3, so the best b lies inside the grid."""
    rng = np.random.default_rng(3)
    images = [rng.normal(size=(16, 8, 8, 3)).astype(np.float32) for _ in range(3)]
    a, b_ = perturbed(vit()[1], 0), perturbed(vit()[1], 1)
    b_.head.kernel[...], b_.head.bias[...] = a.head.kernel[...], a.head.bias[...]

    def between(w):
        m = vit()[1]
        pa, pb = nnx.state(a, nnx.Param), nnx.state(b_, nnx.Param)
        nnx.update(m, jax.tree.map(lambda x, y: w * x + (1 - w) * y, pa, pb))
        return m

    mid = between(0.5)
    labels = [{"image": x, "label": np.asarray(mid(jnp.asarray(x))).argmax(-1)} for x in images]
    reference = between(0.25)
    pred = perturbed(vit()[1], 0)
    pred.head.kernel[...], pred.head.bias[...] = -3 * a.head.kernel[...], -3 * a.head.bias[...]
    before, ref = _params(pred), _params(reference)
    alpha, b = safeguard(pred, reference, "image", labels)
    assert 0.0 < b < 1.0 and b in BLEND_GRID and alpha < 1.0
    assert _loss(pred, labels) < _loss(reference, labels)
    # One blend of the tempered prediction and the reference (the blends tried along the
    # grid do not compound): a few float32 roundings per element.
    for k, p in _params(pred).items():
        t = before[k].astype(np.float64) * (alpha if k.startswith("['head']") else 1.0)
        want = b * t + (1.0 - b) * ref[k]
        scale = np.abs(t).max() + np.abs(ref[k]).max()
        assert_close(p, want, reduction=3, scale=scale, err_msg=k)


def test_keep_blocks_keeps_blocks_that_carry_the_gain_and_only_those():
    rng = np.random.default_rng(4)
    images = [rng.normal(size=(16, 8, 8, 3)).astype(np.float32) for _ in range(3)]

    def labelled_by(model):
        return [{"image": x, "label": np.asarray(model(jnp.asarray(x))).argmax(-1)} for x in images]

    reference = vit()[1]  # the zoo's init: zero head, loss ln 5 on any labels
    # The labels are the prediction's own argmax, which runs through its blocks: with the
    # reference's blocks under the same stem and head the labels are (mostly) missed.
    pred = perturbed(vit()[1], 0)
    right = labelled_by(pred)
    keep, losses = keep_blocks(pred, reference, "image", right)
    swapped = perturbed(vit()[1], 0)
    nnx.update(swapped, with_random_blocks(nnx.state(pred), nnx.state(reference)))
    # Jitted against eager forwards: float32 round-off of a loss ~1, far below the gaps.
    assert losses["pred"] == pytest.approx(_loss(pred, right), abs=1e-5)
    assert losses["ref"] == pytest.approx(math.log(5), abs=1e-5)
    assert losses["blocks"] == pytest.approx(_loss(swapped, right), abs=1e-5)
    assert losses["blocks"] - losses["pred"] >= 0.5 * (losses["ref"] - losses["pred"]) > 0
    assert keep
    np.testing.assert_equal(_params(pred), _params(perturbed(vit()[1], 0)))  # not changed

    # A prediction whose blocks are the reference's: they carry none of its gain.
    labels = labelled_by(swapped)
    keep, losses = keep_blocks(swapped, reference, "image", labels)
    assert losses["pred"] < losses["ref"] and losses["blocks"] == losses["pred"]
    assert not keep

    # A prediction worse than the reference has no gain for its blocks to carry.
    wrong = [
        {"image": b["image"], "label": np.asarray(pred(jnp.asarray(b["image"]))).argmin(-1)}
        for b in right
    ]
    keep, losses = keep_blocks(pred, reference, "image", wrong)
    assert losses["pred"] > losses["ref"] and not keep

    # A model with no repeated blocks (a plain CNN) has nothing to replace.
    cnn = SmallCNN(rngs=nnx.Rngs(0))
    images = [
        {"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32), "label": np.zeros(4, int)}
    ]
    assert keep_blocks(cnn, SmallCNN(rngs=nnx.Rngs(1)), "image", images) == (True, {})


def test_prepare_takes_blocks_mixes_matrices_and_holds_the_loss():
    rng = np.random.default_rng(5)
    images = [rng.normal(size=(16, 8, 8, 3)).astype(np.float32) for _ in range(3)]
    labels = [{"image": x, "label": rng.integers(0, 5, 16)} for x in images]
    reference = perturbed(vit()[1], 1)  # nonzero everywhere, so every mix is visible
    pred, ref = _params(perturbed(vit()[1], 0)), _params(reference)

    # Both rules: "add" (the default) p + a r, "blend" sqrt(1 - a^2) p + a r (a = 0.6: 0.8 p).
    for combine, keep in (("add", 1.0), ("blend", 0.8)):
        model = perturbed(vit()[1], 0)
        done = prepare(
            model,
            reference,
            "image",
            labels,
            blocks="random",
            mix=0.6,
            temper_mode="never",
            **({} if combine == "add" else {"combine": combine}),
        )
        assert (done.blocks, done.mix, done.combine) == ("random", 0.6, combine)
        assert (done.alpha, done.blend) == (1.0, 1.0)
        got = _params(model)
        for k, p in pred.items():
            if k.startswith("['blocks']"):
                np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
            elif p.ndim >= 2:  # one float32 multiply-add per element, at the terms' scale
                want = keep * p.astype(np.float64) + 0.6 * ref[k]
                scale = keep * np.abs(p).max() + 0.6 * np.abs(ref[k]).max()
                assert_close(got[k], want, reduction=1, scale=scale, err_msg=f"{combine} {k}")
            else:
                np.testing.assert_array_equal(got[k], p, err_msg=k)
    with pytest.raises(ConfigError, match="combine"):
        prepare(model, reference, "image", labels, combine="average")
    with pytest.raises(ConfigError, match=r"\[0, 1\] to blend"):
        prepare(model, reference, "image", labels, mix=1.5, combine="blend")
    with pytest.raises(ConfigError, match="mix must be >= 0"):
        prepare(model, reference, "image", labels, mix=-0.5)

    model = perturbed(vit()[1], 0)
    done = prepare(model, reference, "image", labels, blocks="predicted", mix=0.0)
    for k, p in pred.items():
        if k.startswith("['blocks']"):
            np.testing.assert_array_equal(_params(model)[k], p, err_msg=k)
    # temper_mode "auto" (the default): never above the reference on the batches.
    assert _loss(model, labels) <= _loss(reference, labels) + 1e-5
    assert done.blocks == "predicted" and done.losses == {}
    with pytest.raises(ConfigError, match="blocks"):
        prepare(model, reference, "image", labels, blocks="some")


def test_probe_takes_the_random_init_only_when_it_fine_tunes_better():
    """`prepare`'s last step: the probe scores the prepared prediction and the reference;
    the reference replaces the prediction only when it scores strictly lower (or the
    prediction's score is not a number)."""
    rng = np.random.default_rng(6)
    labels = [
        {
            "image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
            "label": rng.integers(0, 5, 16),
        }
        for _ in range(2)
    ]
    reference = perturbed(vit()[1], 1)
    ref = _params(reference)

    def run(pred_score: float, ref_score: float):
        seen = []

        def probe(params) -> float:
            flat = {
                jax.tree_util.keystr(p): np.asarray(v)
                for p, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]
            }
            is_ref = all(np.array_equal(flat[k], v) for k, v in ref.items())
            seen.append((is_ref, flat))
            return ref_score if is_ref else pred_score

        model = perturbed(vit()[1], 0)
        done = prepare(model, reference, "image", labels, blocks="random", probe=probe)
        return model, done, seen

    for pred_score, ref_score, choice in (
        (1.0, 2.0, "prediction"),
        (1.5, 1.5, "random"),  # a tie is no reason to leave the user's init
        (2.0, 1.0, "random"),
        (float("nan"), 1.0, "random"),
    ):
        model, done, seen = run(pred_score, ref_score)
        assert done.choice == choice, (pred_score, ref_score)
        assert [s[0] for s in seen] == [False, True]  # the prediction first, then the reference
        want = {"prediction": pred_score, "random": ref_score, "stderr": 0.0}
        np.testing.assert_equal(done.probe, want)
        got = _params(model)
        # The probe saw what `prepare` made (random blocks, + random, safeguard) ...
        want = ref if choice == "random" else seen[0][1]
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)
        # ... which is the prediction, not the reference, outside the blocks.
        assert not np.array_equal(seen[0][1]["['head']['kernel']"], ref["['head']['kernel']"])
    done = prepare(perturbed(vit()[1], 0), reference, "image", labels)
    assert (done.choice, done.probe) == ("prediction", {})  # no probe given: none run


def test_probe_choice_keeps_a_prediction_only_when_it_wins_beyond_the_noise():
    """Per-batch losses, paired: the prediction must win by more than the standard error
    of the differences (reported); ties, unclear wins and NaN go to the random init."""
    # Differences 0.3, 0.1, 0.2, 0.2: mean 0.2, sample std sqrt(0.02 / 3), stderr / 2.
    choice, scores = probe_choice([1.0, 1.2, 1.1, 1.0], [1.3, 1.3, 1.3, 1.2])
    assert choice == "prediction"
    assert scores["prediction"] == pytest.approx(1.075)
    assert scores["random"] == pytest.approx(1.275)
    assert scores["stderr"] == pytest.approx(math.sqrt(0.02 / 3) / 2)
    # A mean win of 0.05 with differences +0.5 and -0.4: stderr 0.45, not a win ...
    choice, scores = probe_choice([1.0, 2.0], [1.5, 1.6])
    assert choice == "random" and scores["stderr"] == pytest.approx(0.45)
    # ... and the same win with differences 0.06 and 0.04 (stderr 0.01) is one.
    assert probe_choice([1.0, 2.0], [1.06, 2.04])[0] == "prediction"
    assert probe_choice([1.0, 2.0], [1.0, 2.0])[0] == "random"  # level
    assert probe_choice([1.0, float("nan")], [1.5, 1.6])[0] == "random"
    want = ("prediction", {"prediction": 1.0, "random": 1.5, "stderr": 0.0})
    assert probe_choice(1.0, 1.5) == want
    with pytest.raises(ConfigError, match="scored 2 and 3 batches"):
        probe_choice([1.0, 2.0], [1.0, 2.0, 3.0])
