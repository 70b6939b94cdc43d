"""Parameter prediction: tree equality, statistics per role, rank, sharding, gradients, errors."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from custom_models import Llama, MLPMixer, SmallCNN
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tolerances import assert_close, assert_trees_close, predict_reduction

import ghn
from ghn import hostmem, zoo
from ghn.graph import ExampleInputError, ParamInfo
from ghn.hypernet import make_plan, residual_projections
from ghn.hypernet import predict as predict_lib
from ghn.hypernet.normalize import EPS


@pytest.fixture(scope="module")
def hyper():
    return ghn.GHN(rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def hypers(hyper):
    """A GHN per factor form: the default (the view) and LoGAH's transposed factors (the
    form of GHNs recorded before the view became the default)."""
    transpose = ghn.GHN(ghn.GHNConfig.named("tiny", factors="transpose"), rngs=nnx.Rngs(0))
    return {"view": hyper, "transpose": transpose}


def small_specs():
    return {
        "vit": zoo.ViTSpec(depth=2, width=32, num_heads=2, patch_size=4, image_size=16),
        "gpt2": zoo.GPT2Spec(depth=2, width=32, num_heads=4, vocab_size=64, context_length=16),
        "resnet": zoo.ResNetSpec(
            block="basic", layers=(1, 1), width=8, small_input=True, image_size=16
        ),
        "cellnet": zoo.sample("cnns-1k", 1, seed=3, image_size=16, width=(8, 8))[0],
    }


def custom_models():
    return {
        "mixer": (MLPMixer(rngs=nnx.Rngs(0)), jnp.zeros((2, 16, 16, 1))),
        "llama": (Llama(rngs=nnx.Rngs(0)), jnp.zeros((2, 8), jnp.int32)),
        "cnn": (SmallCNN(rngs=nnx.Rngs(0)), jnp.zeros((2, 16, 16, 3))),
    }


def check_same_tree(params, model):
    ref = nnx.state(model, nnx.Param)
    assert jax.tree.structure(params) == jax.tree.structure(ref)
    for p, r in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        assert p.shape == r.shape and p.dtype == r.dtype
    chex.assert_tree_all_finite(params)


@pytest.mark.parametrize("family", ["vit", "gpt2", "resnet", "cellnet"])
def test_zoo_families(hyper, family):
    spec = small_specs()[family]
    model = spec.build(rngs=nnx.Rngs(0))
    params = hyper.predict(model, spec.example_input())
    check_same_tree(params, model)
    out = ghn.with_params(model, params)(spec.example_input())
    chex.assert_tree_all_finite(out)


@pytest.mark.parametrize("name", ["mixer", "llama", "cnn"])
def test_custom_models(hyper, name):
    model, x = custom_models()[name]
    params = hyper.predict(model, x)
    check_same_tree(params, model)
    chex.assert_tree_all_finite(ghn.with_params(model, params)(x))


def test_abstract_model_needs_no_random_copy(hyper):
    spec = small_specs()["gpt2"]
    abstract = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    concrete = spec.build(rngs=nnx.Rngs(1))
    a = hyper.predict(abstract, spec.input_spec())
    b = hyper.predict(concrete, spec.example_input())
    # A function of the architecture only: the same compiled program on the same GHN
    # state and graph batch, on the same machine, so bitwise equal.
    chex.assert_trees_all_equal(a, b)
    ghn.with_params(abstract, a)
    chex.assert_tree_all_finite(abstract(spec.example_input()))


def test_statistics_per_role(hyper):
    spec = zoo.GPT2Spec(depth=4, width=128, num_heads=4, vocab_size=512, context_length=64)
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    graph = ghn.trace(model, spec.input_spec())
    params = dict(zip(graph.params, jax.tree.leaves(hyper.predict(model, spec.input_spec()))))
    residual = residual_projections(graph)
    # attn.c_proj and mlp.c_proj of each block: GPT-2's 1/sqrt(2 n_layer) applies.
    assert residual == {f"blocks/{i}/{m}/c_proj/kernel" for i in range(4) for m in ("attn", "mlp")}
    for path, value in params.items():
        info = graph.params[path]
        v = np.asarray(value, np.float64)
        if info.role == "dense":
            expected = 1 / math.sqrt(info.fan_in) / (math.sqrt(8) if path in residual else 1)
            assert 0.5 * expected < v.std() < 2 * expected, path
            assert abs(v.mean()) < 0.2 * expected, path
        elif info.role == "embedding":  # the default embedding_scale: fan-in
            assert 0.5 < v.std() * math.sqrt(info.fan_in) < 2, path
        elif info.role == "pos_embedding":  # the default position_scale: the token embedding's
            assert 0.5 < v.std() * math.sqrt(spec.width) < 2, path
        elif info.role == "norm_scale":
            assert abs(v.mean() - 1) < 0.1 and v.min() > 0.7 and v.max() < 1.3, path
        elif info.role in ("bias", "norm_bias"):
            assert abs(v.mean()) < 0.05 and np.abs(v).max() <= 0.1, path


def assert_rms(p, want, config, err_msg):
    p = np.asarray(p[...], np.float64)
    rms = np.sqrt(np.mean(np.square(p.reshape(-1, p.shape[-1]))))
    # The rescale sets the rms from float32 sums: ||A B||^2 through r x r Gram
    # matrices of rows + cols terms each, then the r-term products of the entries.
    rows, cols = math.prod(p.shape[:-1]), p.shape[-1]
    n = config.rank * (rows + cols) + config.rank**2 + config.rank
    assert_close(rms, want, reduction=n, err_msg=err_msg)


@pytest.mark.parametrize("position", ["stream", "init"])
@pytest.mark.parametrize("scale", ["fan_in", "init"])
def test_embedding_scales_set_the_gpt2_embeddings_rms(scale, position):
    config = ghn.GHNConfig.named("tiny", embedding_scale=scale, position_scale=position)
    hyper = ghn.GHN(config, rngs=nnx.Rngs(0))
    spec = zoo.GPT2Spec(depth=2, width=48, num_heads=4, vocab_size=96, context_length=16)
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    params = hyper.predict(model, spec.input_spec())
    want = {"fan_in": 1 / math.sqrt(spec.width), "init": 0.02}[scale]
    assert_rms(params["wte"]["embedding"], want, config, "wte")
    # "stream": positions at the scale of the token embeddings they are added to.
    assert_rms(params["wpe"]["embedding"], want if position == "stream" else 0.02, config, "wpe")


@pytest.mark.parametrize("position", ["stream", "init"])
def test_position_scale_sets_the_vit_positional_embedding_rms(position):
    config = ghn.GHNConfig.named("tiny", position_scale=position)
    hyper = ghn.GHN(config, rngs=nnx.Rngs(0))
    spec = zoo.ViTSpec(
        depth=1, width=32, num_heads=2, patch_size=7, image_size=28, in_channels=1, num_classes=10
    )
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    params = hyper.predict(model, spec.input_spec())
    # No token embedding: the patch features of standardized pixels are at unit scale.
    assert_rms(params["pos_embed"], 1.0 if position == "stream" else 0.02, config, "pos_embed")
    assert_rms(params["cls_token"], 0.02, config, "cls_token")


def test_conv_fan_in_uses_real_layout(hyper):
    spec = small_specs()["resnet"]
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    graph = ghn.trace(model, spec.input_spec())
    params = dict(zip(graph.params, jax.tree.leaves(hyper.predict(model, spec.input_spec()))))
    for path, value in params.items():
        info = graph.params[path]
        if info.role == "conv":
            expected = math.sqrt(2 / info.fan_in)  # fan-in = k_h * k_w * c_in (HWIO)
            assert info.fan_in == math.prod(info.shape[:3])
            assert 0.5 * expected < float(jnp.std(value)) < 2 * expected, path


def numerical_rank(x) -> int:
    s = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
    return int(np.sum(s > 1e-4 * s[0]))  # float32 round-off sits far below 1e-4


def test_low_rank_and_no_tiling(hyper):
    r = hyper.config.rank
    spec = zoo.GPT2Spec(depth=1, width=64, num_heads=4, vocab_size=4096, context_length=16)
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    params = hyper.predict(model, spec.input_spec())
    emb = np.asarray(params["wte"]["embedding"][...], np.float64)
    assert emb.shape == (4096, 64)
    # The reference tiles 2048-row chunks; here every row is decoded.
    assert not np.allclose(emb[:2048], emb[2048:])
    assert numerical_rank(emb) <= r
    fc = np.asarray(params["blocks"][0]["mlp"]["c_fc"]["kernel"][...], np.float64)
    assert numerical_rank(fc) <= r


def test_width_past_k_is_a_clear_error():
    small = ghn.GHN(ghn.GHNConfig.named("tiny", max_dim=128), rngs=nnx.Rngs(0))
    spec = zoo.GPT2Spec(depth=1, width=32, num_heads=4, vocab_size=256, context_length=16)
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"'wte/embedding' \(256, 32\).*K=128"):
        small.predict(model, spec.input_spec())


def test_unknown_op_and_bad_input_are_clear_errors(hyper):
    model, x = custom_models()["mixer"]
    with pytest.raises(ExampleInputError, match="stem"):
        hyper.predict(model, jnp.zeros((2, 16, 16, 3)))
    graph = ghn.trace(model, x)
    graph.node_ops[3] = "fancy_op"
    with pytest.raises(ValueError, match="unknown node ops \\['fancy_op'\\]"):
        ghn.hypernet.make_batch([graph], hyper.config)


def test_output_sharding(hyper):
    spec = small_specs()["gpt2"]
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    mesh = jax.make_mesh((8,), ("model",))
    plain = hyper.predict(model, spec.input_spec())
    replicated = NamedSharding(mesh, PartitionSpec())
    rep = hyper.predict(model, spec.input_spec(), sharding=replicated)
    assert all(v.sharding == replicated for v in jax.tree.leaves(rep))
    auto = hyper.predict(model, spec.input_spec(), sharding=mesh)
    emb = auto["wte"]["embedding"][...]
    assert len(emb.sharding.device_set) == 8 and emb.sharding.spec == PartitionSpec("model", None)
    assert emb.addressable_shards[0].data.shape == (8, 32)
    # out_shardings make another program: XLA may partition the computation and sum in
    # another order. Round-off along the whole prediction (encoder, decoder, A @ B).
    n = predict_reduction(hyper, model, spec.input_spec())
    assert_trees_close(auto, plain, reduction=n)


def test_gradients_reach_every_ghn_parameter(hyper):
    spec = small_specs()["vit"]
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    x = spec.example_input(batch_size=4)
    labels = jnp.arange(4) % spec.num_classes

    def loss_fn(h):
        m = ghn.with_params(
            nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0))), h.predict(model, x)
        )
        return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()

    grads = nnx.grad(loss_fn)(hyper)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert flat
    zero = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g))]
    assert not zero, f"no gradient reaches {zero}"


def test_plan_groups_by_shape():
    spec = zoo.GPT2Spec(depth=6, width=32, num_heads=4, vocab_size=64, context_length=16)
    graph = ghn.trace(nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0))), spec.input_spec())
    plan = make_plan(graph)
    # Compiled program size follows distinct shapes, not depth.
    assert len(plan.groups) <= 10
    assert sorted(leaf for g in plan.groups for leaf in g.leaves) == list(range(len(graph.params)))


@pytest.mark.parametrize(
    "overrides", [dict(decoder="tiled"), dict(factors="transpose")], ids=["tiled", "transpose"]
)
def test_decoder_variants_predict(overrides):
    hyper = ghn.GHN(ghn.GHNConfig.named("tiny", max_dim=512, **overrides), rngs=nnx.Rngs(0))
    spec = zoo.GPT2Spec(depth=2, width=32, num_heads=4, vocab_size=300, context_length=16)
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    params = hyper.predict(model, spec.input_spec())
    check_same_tree(params, model)
    fc = params["blocks"][0]["mlp"]["c_fc"]["kernel"][...]
    assert 0.5 / math.sqrt(32) < float(jnp.std(fc)) < 2 / math.sqrt(32)
    emb = np.asarray(params["wte"]["embedding"][...])
    if overrides.get("decoder") == "tiled":
        # The GHN-3 baseline repeats its 64-row chunk: what LoGAH avoids. Tiling copies
        # the chunk and the rescaling multiplies equal values by one factor: bitwise.
        np.testing.assert_array_equal(emb[:64], emb[64:128])
    else:
        assert numerical_rank(emb) <= hyper.config.rank
    # The tiled decoder takes the per-layout programs, the transpose its cores and write
    # programs: each pinned to the one program like the default one.
    n = predict_reduction(hyper, model, spec.input_spec())
    assert_trees_close(params, _one_program(hyper, model, spec.input_spec()), reduction=n)


def _one_program(hyper, model, x):
    """Every parameter from one jit-compiled `predict_leaves`: the reference the staged
    programs are pinned against (meta-training differentiates through this one)."""
    prepared = predict_lib.prepare(model, (x,), hyper.config)
    graphdef, state = nnx.split(hyper)
    fn = jax.jit(lambda s, b: predict_lib.predict_leaves(nnx.merge(graphdef, s), b, prepared.plan))
    return jax.tree_util.tree_unflatten(prepared.treedef, fn(state, prepared.batch))


@pytest.fixture(params=[True, False], ids=["host_writes", "device_writes"])
def write_on_host(request, monkeypatch):
    """Matrices written by host BLAS (what CPU outputs get) or by a compiled write program
    per layout (what accelerators run), both checked here on CPU."""
    monkeypatch.setattr(predict_lib, "WRITE_ON_HOST", request.param)
    return request.param


@pytest.mark.parametrize("factors", ["view", "transpose"])
@pytest.mark.parametrize("name", ["cnn", "mixer", "gpt2", "vit"])
def test_staged_prediction_equals_the_one_program(hypers, name, factors, write_on_host):
    """Conv layouts, dense kernels in both orders, embeddings, 1-D parameters (finished on
    the host) and matrices (decoded 8 to a call, padded; written on the host or by write
    programs) all land on their own leaves, with either factor form."""
    hyper = hypers[factors]
    if name in ("gpt2", "vit"):
        spec = {
            "gpt2": zoo.GPT2Spec(depth=7, width=32, num_heads=4, vocab_size=64, context_length=16),
            "vit": small_specs()["vit"],
        }[name]
        model, x = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0))), spec.input_spec()
    else:
        model, x = custom_models()[name]
    staged = hyper.predict(model, x)
    # Two sets of programs (backend optimizations off and on, other fusion and summation
    # order at every stage; the transpose's staged W = (P^T C) P for the one program's
    # (Z_A^T)(Z_B), the view's Z = [ReLU(M), 1] P over r + 1 for ReLU(M) W2 + b2 over r):
    # round-off along the whole prediction, i.e. the encoder's layers, the decoder MLP,
    # the last layer, the normalization's sums over the matrix and the contractions that
    # form W (tolerances.ghn_reduction counts the longer, the transpose's staged form),
    # against each parameter's max |value|.
    assert_trees_close(
        staged, _one_program(hyper, model, x), reduction=predict_reduction(hyper, model, x)
    )


def gpt_of(depth: int, width: int = 32):
    spec = zoo.GPT2Spec(depth=depth, width=width, num_heads=4, vocab_size=64, context_length=8)
    return nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0))), spec.input_spec()


def counting_compiles(mp) -> list[int]:
    """Programs compiled per `predict` call (`_compile_all` is where every compile happens)."""
    compiled = []
    original = predict_lib._compile_all
    mp.setattr(predict_lib, "_compile_all", lambda jobs: compiled.append(original(jobs)))
    return compiled


@pytest.mark.parametrize("factors", ["view", "transpose"])
def test_programs_follow_layouts_not_depth(hypers, factors, monkeypatch):
    """A deeper model of the same width compiles no new decoding program: matrices are
    decoded 8 to a call whatever their layout, then written by one program per layout
    (the device writes, as on an accelerator)."""
    monkeypatch.setattr(predict_lib, "WRITE_ON_HOST", False)
    hyper = hypers[factors]
    with pytest.MonkeyPatch.context() as mp:
        compiled = counting_compiles(mp)
        jax.block_until_ready(hyper.predict(*gpt_of(16)))
        programs = len(predict_lib.LEAF_PROGRAMS)
        jax.block_until_ready(hyper.predict(*gpt_of(32)))
        assert len(predict_lib.LEAF_PROGRAMS) == programs
        # At most the encoder again: 32 blocks pad the graph to a larger node bucket.
        assert compiled[1] <= 1, compiled
        jax.block_until_ready(hyper.predict(*gpt_of(32)))
        assert compiled[2] == 0
    model, x = gpt_of(32)
    plan = predict_lib.prepare(model, (x,), hyper.config).plan
    keys = predict_lib.write_keys(plan, hyper.config)
    assert all((key, None) in predict_lib.LEAF_PROGRAMS for key in keys)
    # 32 blocks of 4 kernels plus the two embeddings; the tied head is the token embedding.
    assert len(keys) == 6 and sum(len(g.leaves) for g in plan.groups if g.kind == "matrix") == 130


@pytest.mark.parametrize("factors", ["view", "transpose"])
def test_a_new_width_compiles_only_its_write_programs(hypers, factors, monkeypatch):
    """On an accelerator (the device writes), the second width of a family in a process
    compiles one small write program per matrix layout it has not met, and nothing else: no
    encoder (same graph), no decoding program (those serve every width), nothing for its
    1-D parameters (finished on the host)."""
    monkeypatch.setattr(predict_lib, "WRITE_ON_HOST", False)
    hyper = hypers[factors]
    first, second = gpt_of(3, width=40), gpt_of(3, width=56)
    with pytest.MonkeyPatch.context() as mp:
        compiled = counting_compiles(mp)
        jax.block_until_ready(hyper.predict(*first))
        model, x = second
        plan = predict_lib.prepare(model, (x,), hyper.config).plan
        keys = predict_lib.write_keys(plan, hyper.config)
        new = {k for k in keys if (k, None) not in predict_lib.LEAF_PROGRAMS}
        # The embeddings and the four block kernels: each width its own GEMM shapes.
        assert len(new) == 6, new
        jax.block_until_ready(hyper.predict(*second))
        assert compiled[1] == len(new), compiled
        assert all((k, None) in predict_lib.LEAF_PROGRAMS for k in new)


@pytest.mark.parametrize("factors", ["view", "transpose"])
def test_on_cpu_a_new_width_compiles_nothing(hypers, factors):
    """With CPU outputs every float32 matrix is written by host BLAS into a buffer JAX
    adopts as is: a second width of a family (same graph size) compiles no program at all,
    and the outputs alias those buffers (no second copy of the prediction)."""
    hyper = hypers[factors]
    assert predict_lib._writes_on_host(None)
    with pytest.MonkeyPatch.context() as mp:
        compiled = counting_compiles(mp)
        jax.block_until_ready(hyper.predict(*gpt_of(3, width=48)))
        params = jax.block_until_ready(hyper.predict(*gpt_of(3, width=72)))
        assert compiled[1] == 0, compiled
    kernel = params["blocks"][0]["mlp"]["c_fc"]["kernel"][...]
    assert kernel.shape == (72, 288)
    base = kernel.unsafe_buffer_pointer()
    assert base % hostmem.ALIGN == 0
    # A buffer of this size holds no huge page (HUGE_MIN), so it starts 64-byte aligned;
    # the big ones start on a 2 MB boundary.
    big = hostmem.empty((1024, 2048), np.float32)
    assert big.ctypes.data % hostmem.HUGE_PAGE == 0 and big.flags.c_contiguous
    assert jax.device_put(big).unsafe_buffer_pointer() == big.ctypes.data


@pytest.mark.parametrize("rows, cols", [(5, 7), (48, 31), (70, 100)])
def test_the_basis_gives_the_decoder_at_every_width(rows, cols):
    """W = P[:, :rows]^T C P[:, :cols] with P = [W2; b2] and C from the decoder run with an
    identity last layer (`basis_cores`): the decoder is linear in its last layer, column by
    column, also past K (70, 100 > K = 48 wrap around). The transposed factors' basis."""
    config = ghn.GHNConfig(d_model=16, num_layers=1, num_heads=2, rank=4, max_dim=48)
    config = config.replace(factors="transpose", past_max_dim="wrap")
    decoder = ghn.GHN(config, rngs=nnx.Rngs(0)).decoder
    decoder.b2[...] = jax.random.normal(jax.random.key(1), decoder.b2.shape)
    e_GxD = jax.random.normal(jax.random.key(2), (3, 16))
    graphdef, state = nnx.split(decoder)
    c_Gxkxk = jax.jit(lambda s, e: predict_lib.basis_cores(nnx.merge(graphdef, s), e))(state, e_GxD)
    p = np.concatenate([np.asarray(decoder.w2[...]), np.asarray(decoder.b2[...])[None]])
    p_rows, p_cols = p[:, np.arange(rows) % 48], p[:, np.arange(cols) % 48]
    got = np.einsum("kR,gkl,lC->gRC", p_rows, np.asarray(c_Gxkxk), p_cols)
    a, b = decoder.factors(e_GxD, rows, cols)
    want = np.asarray(jnp.einsum("gRr,grC->gRC", a, b))
    # Round-off of the contractions after the shared MLP: Z = ReLU(M) W2 + b2 and A @ B
    # (r + 1 and r terms) against C = A_I B_I, P^T C and (P^T C) P (r, r + 1, r + 1).
    assert_close(got, want, reduction=5 * (config.rank + 1))


def _dense_layout(shape: tuple[int, int], stored_io: bool) -> ParamInfo:
    """A dense kernel's layout: (out, in), or (in, out) as flax stores it."""
    out_axis, in_axis = (1, 0) if stored_io else (0, 1)
    return ParamInfo("", shape, "float32", 0, "", out_axes=(out_axis,), in_axes=(in_axis,))


@pytest.mark.parametrize("rows, cols", [(5, 7), (13, 31), (70, 100), (1, 30), (30, 1)])
def test_the_view_is_written_as_the_decoder_reads_it(rows, cols):
    """`write_view` (the device) and the host's finishing read the view's factors out of
    Z = [ReLU(M), 1] P (`view_hidden`) as `LowRankDecoder.factors` does: from one row of
    Z's half (5 * r <= K = 48), from several (13 * r, 31 * r > K) and past K (70, 100 wrap
    around); matrices rescaled to their std, vectors squashed."""
    config = ghn.GHNConfig(d_model=16, num_layers=1, num_heads=2, rank=4, max_dim=48)
    hyper = ghn.GHN(config.replace(past_max_dim="wrap"), rngs=nnx.Rngs(0))
    decoder = hyper.decoder
    decoder.b2[...] = jax.random.normal(jax.random.key(1), decoder.b2.shape)
    e_GxD = jax.random.normal(jax.random.key(2), (3, 16))
    graphdef, state = nnx.split(decoder)
    hidden = jax.jit(lambda s, e: predict_lib.view_hidden(nnx.merge(graphdef, s), e, jnp.arange(3)))
    h_Gx2rxk = [np.asarray(h) for h in hidden(state, e_GxD)]
    ghn_graphdef, ghn_state = nnx.split(hyper)
    basis = predict_lib._Basis(
        hyper, ghn_graphdef, jax.tree.leaves(ghn_state), jax.tree.leaves(state)
    )
    w_GxRxC = np.asarray(decoder.full(e_GxD, rows, cols), np.float64)
    std = 0.02
    want = w_GxRxC * std / np.sqrt(np.mean(np.square(w_GxRxC), axis=(1, 2)) + EPS)[:, None, None]
    # Round-off of two float32 decodings after the embeddings: the MLP (d -> 4d -> 8d), Z
    # (r + 1 terms), the normalization's sums (rows or cols, then r x r) and A @ B (r);
    # the references in float64 from the decoder's float32 factors.
    d, r = config.d_model, config.rank
    n = 13 * d + (r + 1) + max(rows, cols) + r * r + r
    for stored_io in (False, True):
        layout = _dense_layout((cols, rows) if stored_io else (rows, cols), stored_io)
        key = predict_lib.ViewWriteKey(layout, "float32", r, config.max_dim)
        write = jax.jit(functools.partial(predict_lib.write_view, key))
        p = basis.device(key.columns, transposed=False)
        member = predict_lib._Member(0, layout, "float32", scale=std)
        for g in range(3):
            w = want[g].T if stored_io else want[g]
            assert_close(write(h_Gx2rxk[g], p, np.float32(std)), w, reduction=n)
            assert_close(predict_lib._finish_on_host(member, h_Gx2rxk[g], basis), w, reduction=n)
    # A vector of size `cols` is row 0 or 1 of the decoded 2 x cols matrix, squashed: as
    # tanh' <= 1, its error is at most the amplitude times the raw row's round-off (the MLP,
    # Z and the row of A @ B), of terms the size of the decoded entries. A node's two
    # vectors share their factors (one memo over float64 H, as in `predict_staged`).
    w_Gx2xC = np.asarray(decoder.full(e_GxD, 2, cols), np.float64)
    vector = ParamInfo("", (cols,), "float32", 0, "", out_axes=(0,))
    h_Gx2rxk = [h.astype(np.float64) for h in h_Gx2rxk]
    memo = {}
    for g in range(3):
        for vrow in (0, 1):
            member = predict_lib._Member(0, vector, "float32", 0.25, 1.0, vrow)
            got = predict_lib._finish_on_host(member, h_Gx2rxk[g], basis, memo)
            squashed = 1.0 + 0.25 * np.tanh(w_Gx2xC[g, vrow])
            size = 0.25 * np.max(np.abs(w_Gx2xC[g]))
            assert_close(got, squashed, reduction=13 * d + (r + 1) + r, scale=size)


class _MixedDtypes(nnx.Module):
    """A float32 layer and a bfloat16 one: on CPU the host writes the first, a write
    program the second."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.a = nnx.Linear(12, 24, rngs=rngs)
        self.b = nnx.Linear(24, 10, param_dtype=jnp.bfloat16, rngs=rngs)

    def __call__(self, x):
        return self.b(jax.nn.relu(self.a(x)))


def test_parameters_keep_their_dtype_whoever_writes_them(hyper):
    model, x = _MixedDtypes(rngs=nnx.Rngs(0)), jnp.zeros((2, 12))
    params = hyper.predict(model, x)
    check_same_tree(params, model)
    assert params["b"]["kernel"][...].dtype == jnp.bfloat16
    as_float32 = _MixedDtypes(rngs=nnx.Rngs(0))
    as_float32.b = nnx.Linear(24, 10, rngs=nnx.Rngs(0))
    want = hyper.predict(as_float32, x)
    # The same decoding; bfloat16 keeps 8 bits of mantissa (relative spacing 2^-7).
    got_b, want_b = (np.asarray(p["b"]["kernel"][...], np.float32) for p in (params, want))
    np.testing.assert_allclose(got_b, want_b, rtol=2**-7, atol=2**-7 * np.abs(want_b).max())
    n = predict_reduction(hyper, model, x)
    assert_close(
        np.asarray(params["a"]["kernel"][...]), np.asarray(want["a"]["kernel"][...]), reduction=n
    )
