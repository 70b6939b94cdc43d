"""Bucketed prediction equals per-architecture prediction; one program serves a bucket."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerances import assert_close, ghn_reduction, roundoff_atol, transformer_reduction

import ghn
from ghn.hypernet import bucketed as hb
from ghn.hypernet.predict import FAST_COMPILE_OPTIONS, prepare
from ghn.tasks import Task
from ghn.train import step
from ghn.zoo import bucketed as zb

CONFIG = ghn.GHNConfig(d_model=32, num_layers=1, num_heads=2, rank=8, max_dim=512)
VIT = dict(patch_size=4, image_size=8, in_channels=1, num_classes=10)
GPT = dict(vocab_size=64, context_length=16)

FAMILIES = {
    "vit": [
        ghn.zoo.ViTSpec(depth=1, width=16, num_heads=1, **VIT),
        ghn.zoo.ViTSpec(depth=2, width=24, num_heads=3, **VIT),
        ghn.zoo.ViTSpec(depth=3, width=32, num_heads=2, **VIT),
    ],
    "gpt2": [
        ghn.zoo.GPT2Spec(depth=1, width=16, num_heads=2, **GPT),
        ghn.zoo.GPT2Spec(depth=3, width=32, num_heads=4, **GPT),
    ],
}


def input_spec(spec):
    if isinstance(spec, ghn.zoo.GPT2Spec):
        return spec.input_spec(2, seq_len=8)
    return spec.input_spec(2)


@pytest.fixture(scope="module")
def hyper():
    return ghn.GHN(CONFIG, rngs=nnx.Rngs(0))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_program_predicts_every_architecture_of_a_bucket(hyper, family):
    specs = FAMILIES[family]
    bucket = zb.smallest_bucket(specs)
    plan = hb.make_bucket_plan(bucket, specs, input_spec, CONFIG)
    graphdef, state = nnx.split(hyper)

    def run(state, inputs):
        return hb.predict_padded(nnx.merge(graphdef, state), plan, inputs)

    example = hb.arch_inputs(plan, specs[0], input_spec(specs[0]), CONFIG)
    compiled = jax.jit(run).lower(state, example).compile()  # once for the whole bucket
    for spec in specs:
        inputs = hb.arch_inputs(plan, spec, input_spec(spec), CONFIG)
        padded = jax.tree.map(np.asarray, compiled(state, inputs))
        model = nnx.eval_shape(lambda spec=spec: spec.build(rngs=nnx.Rngs(0)))
        want = nnx.to_pure_dict(hyper.predict(model, input_spec(spec)))
        got = zb.extract_params(bucket, spec, padded)
        # The bucket's padded graph and widest slot bound the reduction lengths.
        widest = max(max(leaf.rows, leaf.cols) for leaf in plan.leaves)
        n = ghn_reduction(CONFIG, num_nodes=plan.num_nodes, max_dim=widest)
        for (path, w), (_, g) in zip(
            jax.tree_util.tree_flatten_with_path(want)[0],
            jax.tree_util.tree_flatten_with_path(got)[0],
            strict=True,
        ):
            assert np.shape(g) == np.shape(w), path
            # Two different programs compute the same decoding (masked vs exact sizes).
            assert_close(g, np.asarray(w), reduction=n, err_msg=jax.tree_util.keystr(path))
        # Padding holds exact zeros: nothing is decoded there.
        mask = zb.embed_params(
            bucket, spec, jax.tree.map(lambda x: np.ones(np.shape(x), bool), want), fill=False
        )
        for m, x in zip(jax.tree.leaves(mask), jax.tree.leaves(padded), strict=True):
            assert not np.any(x[~m]), "padding must be exactly zero"


def test_a_spec_outside_the_plan_is_a_clear_error():
    specs = FAMILIES["vit"]
    plan = hb.make_bucket_plan(zb.smallest_bucket(specs[:2]), specs[:2], input_spec, CONFIG)
    with pytest.raises(ValueError, match="does not fit bucket"):
        hb.arch_inputs(plan, specs[2], input_spec(specs[2]), CONFIG)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bucketed_meta_loss_and_gradients_equal_the_per_architecture_ones(hyper, family):
    specs = FAMILIES[family][:2]
    bucket = zb.smallest_bucket(specs)
    plan = hb.make_bucket_plan(bucket, specs, input_spec, CONFIG)
    params = nnx.state(hyper, nnx.Param)
    graphdef = nnx.graphdef(hyper)
    key = jax.random.key(1)
    if family == "vit":
        task = Task("image")
        batch = {
            "image": jax.random.normal(key, (4, 8, 8, 1)),
            "label": jax.random.randint(key, (4,), 0, 10),
        }
    else:
        task = Task("text", seq_len=8)
        batch = {"tokens": jax.random.randint(key, (4, 9), 0, 64)}
    kw = dict(ghn_graphdef=graphdef, task=task, pred_weight_decay=3e-5)
    wants, jitted = [], []
    for spec in specs:
        model = nnx.eval_shape(lambda spec=spec: spec.build(rngs=nnx.Rngs(0)))
        prepared = prepare(model, (input_spec(spec),), CONFIG)
        g, _, rest = nnx.split(model, nnx.Param, ...)
        target = step.Target(prepared.plan, prepared.treedef, g, rest)

        def fn(p, g, b, t=target):
            return step.meta_grads(p, g, b, target=t, **kw)

        wants.append(jax.jit(fn)(params, prepared.batch, batch))
        # The same math as another program (XLA's backend optimizations off): how far
        # round-off alone moves these gradients.
        other = jax.jit(fn, compiler_options=FAST_COMPILE_OPTIONS)
        jitted.append(other(params, prepared.batch, batch))
    want = jax.tree.map(lambda *xs: sum(xs) / len(xs), *wants)
    want_jit = jax.tree.map(lambda *xs: sum(xs) / len(xs), *jitted)
    stacked = jax.tree.map(
        lambda *xs: np.stack(xs), *[hb.arch_inputs(plan, s, input_spec(s), CONFIG) for s in specs]
    )
    got = jax.jit(
        lambda p, i, b: step.meta_grads(p, i, b, loss_fn=step.bucketed_meta_loss, plan=plan, **kw)
    )(params, stacked, batch)
    widest = max(max(leaf.rows, leaf.cols) for leaf in plan.leaves)
    # The GHN's prediction, then the target's forward and backward: both chains add up.
    n = ghn_reduction(CONFIG, num_nodes=plan.num_nodes, max_dim=widest)
    n += transformer_reduction(
        depth=bucket.depth,
        width=bucket.width,
        mlp_width=bucket.mlp_hidden,
        # A head's q.k: sub-heads' partial sums, then a sum over the sub-heads.
        head_dim=bucket.sub_heads * bucket.head_width + bucket.sub_heads,
        tokens=17,
    )
    for k in ("loss", "task_loss", "metric", "reg"):
        assert_close(np.asarray(got[k]), np.asarray(want[k]), reduction=n, err_msg=k)

    # Gradients: against the whole gradient's norm (test_train_common.assert_close_grads),
    # with the backward's extra sums over batch x tokens, graph nodes and decoded rows.
    def distance(a, b):
        pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        return float(np.sqrt(sum(np.sum((np.asarray(x) - np.asarray(y)) ** 2.0) for x, y in pairs)))

    norm = distance(want["grads"], jax.tree.map(jnp.zeros_like, want["grads"]))
    sums = len(specs) * 4 * 17 + plan.num_nodes + widest
    # The GPT-2 gradients are worse conditioned than the reduction count says (the
    # normalization's rsqrt and the vocabulary softmax amplify round-off): the
    # reference's own program-to-program spread, measured here, bounds it too.
    spread = distance(want_jit["grads"], want["grads"])
    tol = max(roundoff_atol(2 * n + sums, norm), 8 * spread)
    diff = distance(got["grads"], want["grads"])
    assert diff <= tol, (diff, tol, spread, norm)


def test_each_architecture_of_a_meta_batch_runs_only_its_own_blocks(hyper):
    """The meta-batch is mapped over, not vmapped: each block stays a real branch
    (`lax.cond` on the architecture's own block mask), so a 1-block GPT-2 in a 3-block
    bucket skips two blocks. Under vmap the cond would become a select that runs them."""
    specs = FAMILIES["gpt2"]
    plan = hb.make_bucket_plan(zb.smallest_bucket(specs), specs, input_spec, CONFIG)
    stacked = jax.tree.map(
        lambda *xs: np.stack(xs), *[hb.arch_inputs(plan, s, input_spec(s), CONFIG) for s in specs]
    )
    batch = {"tokens": jnp.zeros((4, 9), jnp.int32)}
    kw = dict(ghn_graphdef=nnx.graphdef(hyper), task=Task("text", seq_len=8), plan=plan)
    grads = jax.make_jaxpr(
        lambda p, i, b: step.meta_grads(
            p, i, b, loss_fn=step.bucketed_meta_loss, pred_weight_decay=3e-5, **kw
        )
    )(nnx.state(hyper, nnx.Param), stacked, batch)
    text = str(grads)
    # Forward and backward each branch on the block mask.
    assert text.count("cond[") >= 2, "the blocks are no longer skipped per architecture"
