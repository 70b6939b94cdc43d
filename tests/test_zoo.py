"""Tests for ghn.zoo: presets, forward passes, init recipes, specs, samplers, datasets.

XLA compiles dominate on a 2-core CPU, so: one real forward pass per family, each
built and run in one compiled program; init statistics from a jit that returns only
the parameters under test (XLA prunes the rest of the init); RBG keys, whose random
bits compile faster than threefry's; every other shape check under `nnx.eval_shape`.
"""

import collections
import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerances import assert_close, transformer_reduction

from ghn import zoo
from ghn.zoo import CellNetSpec, GPT2Spec, ResNetSpec, ViTSpec
from ghn.zoo.cellnet import loose_ends
from ghn.zoo.samplers import vit_width_cap

REPO = Path(__file__).resolve().parents[1]

EXPECTED_PARAMS = {
    "vit-ti": 5_717_416,
    "vit-s": 22_050_664,
    "vit-b": 86_567_656,
    "vit-l": 304_326_632,
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
}

# Every op once; node i reads node (i - 1) // 2, so six nodes are loose ends.
ALL_OPS = tuple((op, (i - 1) // 2) for i, op in enumerate(zoo.OPS, start=1))


def flat_params(model):
    state = nnx.state(model, nnx.Param)
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


def run(spec, x=None):
    """`spec`'s forward pass on `x`, with N(0, 0.1) parameters drawn by NumPy.

    Random init would compile a program of its own; the init recipes have their
    own tests below and `test_build_and_apply_end_to_end` covers the two together.
    """
    x = spec.example_input() if x is None else x
    graphdef, state = nnx.split(nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: 0.1 * rng.standard_normal(a.shape, np.float32), state)
    y = np.asarray(jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x))
    assert np.all(np.isfinite(y)), spec.name
    return flat_params(nnx.merge(graphdef, state)), y


def init_params(spec, *names):
    """The initial values of the parameters `names` only."""

    @jax.jit
    def init(key):
        params = flat_params(spec.build(rngs=nnx.Rngs(key)))
        return {n: params[n] for n in names}

    return jax.tree.map(np.asarray, init(jax.random.key(0, impl="rbg")))


def abstract_forward(spec, **input_kwargs):
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    return nnx.eval_shape(lambda m, x: m(x), model, spec.input_spec(**input_kwargs))


def abstract_params(spec):
    return flat_params(nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0))))


@pytest.mark.parametrize("name", zoo.presets())
def test_preset_param_counts(name):
    spec = zoo.get(name)
    params = abstract_params(spec)
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in params.values())
    assert spec.counted_num_params() == EXPECTED_PARAMS[name]
    assert spec.closed_form_num_params() == EXPECTED_PARAMS[name]


def test_untied_gpt2_adds_lm_head():
    tied, untied = zoo.get("gpt2"), zoo.get("gpt2", tie_embeddings=False)
    assert untied.num_params() == tied.num_params() + 50257 * 768
    assert "lm_head/kernel" in abstract_params(untied)
    assert not any(k.startswith("lm_head") for k in abstract_params(tied))


def test_preset_overrides():
    spec = zoo.get("vit-b", image_size=32, patch_size=4, num_classes=10)
    assert (spec.image_size, spec.patch_size, spec.num_classes, spec.width) == (32, 4, 10, 768)
    assert spec.counted_num_params() == spec.closed_form_num_params()
    assert zoo.get("resnet18", layers=[1, 1]).layers == (1, 1)
    assert zoo.get("gpt2-medium", vocab_size=256).vocab_size == 256
    assert set(zoo.presets()) == set(EXPECTED_PARAMS)


def test_resnet50_structure():
    params = abstract_params(zoo.get("resnet50"))
    assert params["conv1/kernel"].shape == (7, 7, 3, 64)
    assert params["stages/0/0/downsample/conv/kernel"].shape == (1, 1, 64, 256)
    assert params["stages/1/0/conv2/kernel"].shape == (3, 3, 128, 128)
    assert params["fc/kernel"].shape == (2048, 1000)
    assert "stages/0/1/downsample/conv/kernel" not in params
    assert not any(k.endswith("conv1/bias") for k in params)


def test_vit_forward_and_structure():
    spec = ViTSpec(
        depth=2,
        width=32,
        num_heads=2,
        image_size=8,
        patch_size=4,
        num_classes=10,
        head_zeroinit=False,
    )
    params, y = run(spec)
    assert y.shape == (2, 10) and not np.allclose(y[0], y[1])
    assert params["cls_token"].shape == (1, 1, 32)
    assert params["pos_embed"].shape == (1, 5, 32)
    assert params["blocks/1/attn/qkv/kernel"].shape == (32, 96)
    assert params["blocks/1/mlp/fc2/kernel"].shape == (128, 32)
    mean = spec.replace(pool="mean")
    assert abstract_forward(mean).shape == (2, 10)
    mean_params = abstract_params(mean)
    assert "cls_token" not in mean_params
    assert mean_params["pos_embed"].shape == (1, 4, 32)


def test_vit_rejects_wrong_image_size():
    spec = ViTSpec(depth=1, width=32, num_heads=2, image_size=8, patch_size=4)
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"\(batch, 8, 8, 3\)"):
        nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32))


def test_gpt2_forward_and_causality():
    spec = GPT2Spec(depth=2, width=32, num_heads=4, vocab_size=64, context_length=16)
    tokens = spec.example_input(batch_size=2, seq_len=12)
    assert tokens.dtype == jnp.int32 and tokens.shape == (2, 12)
    changed = tokens.at[:, 8:].set((tokens[:, 8:] + 1) % 64)
    params, y = run(spec, jnp.concatenate([tokens, changed]))
    assert y.shape == (4, 12, 64)
    # Changing tokens 8.. must leave the logits of positions 0..7 unchanged, up to
    # round-off: the rows of the two halves sit at other places in the same GEMMs.
    # Reductions: wte + wpe, the blocks, and the tied lm_head's contraction over width.
    n = 2 + transformer_reduction(depth=2, width=32, mlp_width=128, head_dim=8, tokens=12) + 32
    assert_close(y[2:, :8], y[:2, :8], reduction=n)
    assert not np.allclose(y[:2, 8:], y[2:, 8:])
    assert "lm_head/kernel" not in params and params["wpe/embedding"].shape == (16, 32)
    untied = spec.replace(tie_embeddings=False)
    assert abstract_forward(untied).shape == (2, 16, 64)
    assert abstract_params(untied)["lm_head/kernel"].shape == (32, 64)


def test_gpt2_input_defaults_and_long_sequence_error():
    spec = GPT2Spec(depth=1, width=32, num_heads=4, vocab_size=64, context_length=16)
    assert spec.input_spec() == jax.ShapeDtypeStruct((2, 16), jnp.int32)
    assert zoo.get("gpt2").input_spec(3).shape == (3, 32)
    x = zoo.get("gpt2").example_input(seed=1)
    assert x.shape == (2, 32) and int(x.max()) < 50257 and int(x.min()) >= 0
    with pytest.raises(ValueError, match="exceeds GPT2 context_length 16"):
        abstract_forward(spec, seq_len=17)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_resnet_small_input_forward(block):
    spec = ResNetSpec(
        block=block, layers=(1, 1), width=8, image_size=16, num_classes=10, small_input=True
    )
    if block == "basic":
        params, y = run(spec)
        assert params["conv1/kernel"].shape == (3, 3, 3, 8)
        assert params["stages/1/0/downsample/conv/kernel"].shape == (1, 1, 8, 16)
    else:
        y = abstract_forward(spec)
        assert abstract_params(spec)["stages/0/0/conv3/kernel"].shape == (1, 1, 8, 32)
    assert y.shape == (2, 10)
    assert spec.counted_num_params() == spec.closed_form_num_params()


def test_resnet_imagenet_stem_shapes():
    spec = ResNetSpec(layers=(1, 1), width=8, image_size=64, num_classes=5)
    assert abstract_forward(spec).shape == (2, 5)
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    stem = nnx.eval_shape(lambda m, x: m.bn1(m.conv1(x)), model, spec.input_spec())
    assert stem.shape == (2, 32, 32, 8)


def test_cellnet_all_ops_forward():
    spec = CellNetSpec(
        normal=ALL_OPS,
        reduce=(("conv3x3", 0), ("se", 1)),
        num_cells=2,
        reductions=(1,),
        width=8,
        norm="bn",
        merge="concat",
        image_size=8,
        num_classes=10,
    )
    assert loose_ends(ALL_OPS) == (6, 7, 8, 9, 10, 11)
    params, y = run(spec)
    assert y.shape == (2, 10)
    assert params["cells/0/ops/4/depthwise/kernel"].shape == (5, 5, 1, 8)
    assert params["cells/0/ops/9/squeeze/kernel"].shape == (1, 1, 8, 4)
    assert params["cells/0/merge/conv/kernel"].shape == (1, 1, 6 * 8, 8)
    assert params["cells/1/pre/conv/kernel"].shape == (1, 1, 8, 16)
    assert params["head/kernel"].shape == (16, 10)
    assert spec.counted_num_params() == spec.closed_form_num_params()


def test_build_and_apply_end_to_end():
    spec = GPT2Spec(depth=1, width=32, num_heads=4, vocab_size=64, context_length=16)
    tokens = spec.example_input()

    @jax.jit
    def logits(key, tokens):
        return spec.build(rngs=nnx.Rngs(key))(tokens)

    y = np.asarray(logits(jax.random.key(0, impl="rbg"), tokens))
    assert y.shape == (2, 16, 64) and np.all(np.isfinite(y))
    # ln_f gives unit-variance features and tied wte rows have std 0.02, so logits are
    # ~0.02 * sqrt(width) (a bit more: a token's own row aligns with its feature).
    assert 0.5 < y.std() / (0.02 * math.sqrt(32)) < 2 and np.abs(y).max() < 1


@pytest.mark.parametrize("norm", ["bn", "ln", "none"])
@pytest.mark.parametrize("merge", ["sum", "concat"])
def test_cellnet_norms_and_merges(norm, merge):
    spec = CellNetSpec(
        normal=ALL_OPS, num_cells=3, reductions=(1, 2), width=8, norm=norm, merge=merge
    )
    assert abstract_forward(spec).shape == (2, 10)
    params = abstract_params(spec)
    assert ("stem/norm/scale" in params) == (norm != "none")
    assert ("stem/conv/bias" in params) == (norm == "none")
    assert ("cells/0/merge/conv/kernel" in params) == (merge == "concat")
    assert ("cells/1/pre/conv/kernel" in params) and ("cells/0/pre/conv/kernel" not in params)
    assert params["head/kernel"].shape == (32, 10)
    assert spec.counted_num_params() == spec.closed_form_num_params()


def test_gpt2_init_statistics():
    depth = 4
    spec = GPT2Spec(
        depth=depth, width=256, num_heads=8, vocab_size=512, context_length=64, tie_embeddings=False
    )
    names = ["wte/embedding", "wpe/embedding", "lm_head/kernel", "ln_f/scale", "ln_f/bias"]
    for i in range(depth):
        names += [
            f"blocks/{i}/{n}"
            for n in (
                "attn/c_proj/kernel",
                "mlp/c_proj/kernel",
                "attn/c_attn/kernel",
                "mlp/c_fc/kernel",
                "attn/c_attn/bias",
                "attn/c_proj/bias",
                "mlp/c_fc/bias",
                "ln_1/bias",
                "ln_2/scale",
            )
        ]
    params = init_params(spec, *names)
    # Statistical, not round-off: the std of n iid normal draws has a relative standard
    # error of 1/sqrt(2n), ~0.003 for these (64 x 256 for wpe up to 1024 x 256), so
    # rel=0.05 is >= 9 standard errors; the mean's error is 0.02/sqrt(n) <= 1.6e-4.
    resid_std = 0.02 / math.sqrt(2 * depth)
    for i in range(depth):
        for name in (f"blocks/{i}/attn/c_proj/kernel", f"blocks/{i}/mlp/c_proj/kernel"):
            assert params[name].std() == pytest.approx(resid_std, rel=0.05), name
        for name in (f"blocks/{i}/attn/c_attn/kernel", f"blocks/{i}/mlp/c_fc/kernel"):
            assert params[name].std() == pytest.approx(0.02, rel=0.05), name
        for name in ("attn/c_attn/bias", "attn/c_proj/bias", "mlp/c_fc/bias", "ln_1/bias"):
            assert np.all(params[f"blocks/{i}/{name}"] == 0), name
        assert np.all(params[f"blocks/{i}/ln_2/scale"] == 1)
    for name in ("wte/embedding", "wpe/embedding", "lm_head/kernel"):
        assert params[name].std() == pytest.approx(0.02, rel=0.05), name
        assert abs(params[name].mean()) < 0.002, name
    assert np.all(params["ln_f/scale"] == 1) and np.all(params["ln_f/bias"] == 0)


def test_vit_init_statistics():
    spec = ViTSpec(depth=1, width=128, num_heads=4, image_size=32, patch_size=4, num_classes=10)
    names = ["pos_embed", "cls_token", "head/kernel", "head/bias", "patch_embed/kernel"]
    names += ["norm/bias"] + [
        f"blocks/0/{n}"
        for n in (
            "attn/qkv/kernel",
            "attn/qkv/bias",
            "mlp/fc1/kernel",
            "mlp/fc1/bias",
            "mlp/fc2/bias",
            "ln1/scale",
        )
    ]
    params = init_params(spec, *names)
    # Statistical: the std of n iid draws has a relative standard error of 1/sqrt(2n)
    # (normal; ~0.45/sqrt(n) for uniform). Every rel= below is >= 4.5 of them for its n:
    # pos_embed 65 x 128 (6.4), qkv 128 x 384 (15), fc1 128 x 512 (11), biases 512 and
    # 128 (9.6, 4.8), patch 48 x 128 (11), head 128 x 10 (7.6).
    assert params["pos_embed"].std() == pytest.approx(0.02, rel=0.05)
    assert np.all(params["cls_token"] == 0)
    assert np.all(params["head/kernel"] == 0) and np.all(params["head/bias"] == 0)
    # Fused qkv drawn as three xavier (d, d) kernels, not one (d, 3d) kernel.
    limit = math.sqrt(6 / (128 + 128))
    qkv = params["blocks/0/attn/qkv/kernel"]
    assert np.abs(qkv).max() <= limit
    assert qkv.std() == pytest.approx(limit / math.sqrt(3), rel=0.03)
    fc1 = params["blocks/0/mlp/fc1/kernel"]
    assert fc1.std() == pytest.approx(math.sqrt(2 / (128 + 512)), rel=0.03)
    for name in ("mlp/fc1/bias", "mlp/fc2/bias"):
        bias = params[f"blocks/0/{name}"]
        assert 0 < np.abs(bias).max() < 1e-5 and bias.std() == pytest.approx(1e-6, rel=0.3)
    assert np.all(params["blocks/0/attn/qkv/bias"] == 0)
    patch = params["patch_embed/kernel"]
    assert patch.std() == pytest.approx(1 / math.sqrt(4 * 4 * 3), rel=0.1)
    assert np.all(params["blocks/0/ln1/scale"] == 1) and np.all(params["norm/bias"] == 0)
    head = init_params(spec.replace(head_zeroinit=False), "head/kernel")["head/kernel"]
    assert head.std() == pytest.approx(1 / math.sqrt(128), rel=0.15)


def test_resnet_init_statistics():
    spec = ResNetSpec(layers=(1, 1), width=32, image_size=8, num_classes=10, small_input=True)
    names = ["stages/0/0/conv1/kernel", "stages/1/0/downsample/conv/kernel", "conv1/kernel"]
    names += ["bn1/scale", "stages/1/0/bn2/bias", "fc/kernel", "fc/bias"]
    params = init_params(spec, *names)
    # Statistical, as in test_vit_init_statistics: each rel= is >= 5 relative standard
    # errors of a sample std (1/sqrt(2n)): conv n=9216 (6.8), down 2048 (5.1), stem 864
    # (6.2), fc 640 uniform (0.45/sqrt(n): 8.5).
    conv = params["stages/0/0/conv1/kernel"]  # 3x3, 32 -> 32
    assert conv.std() == pytest.approx(math.sqrt(2 / (9 * 32)), rel=0.05)
    assert np.abs(conv).max() / conv.std() > 3  # untruncated normal
    down = params["stages/1/0/downsample/conv/kernel"]  # 1x1, 32 -> 64: fan_out 64
    assert down.std() == pytest.approx(math.sqrt(2 / 64), rel=0.08)
    stem = params["conv1/kernel"]  # 3x3, 3 -> 32: fan_out 288, fan_in 27
    assert stem.std() == pytest.approx(math.sqrt(2 / 288), rel=0.15)
    assert np.all(params["bn1/scale"] == 1) and np.all(params["stages/1/0/bn2/bias"] == 0)
    bound = 1 / math.sqrt(64)
    for name in ("fc/kernel", "fc/bias"):
        assert 0 < np.abs(params[name]).max() <= bound, name
    assert params["fc/kernel"].std() == pytest.approx(bound / math.sqrt(3), rel=0.15)


SMALL_SPECS = [
    ViTSpec(depth=3, width=64, num_heads=4, image_size=28, in_channels=1, patch_size=4),
    ViTSpec(pool="mean", head_zeroinit=False),
    GPT2Spec(depth=3, width=72, num_heads=8, vocab_size=256, tie_embeddings=False),
    ResNetSpec(block="bottleneck", layers=(3, 4, 6, 3), small_input=True),
    CellNetSpec(normal=ALL_OPS, norm="ln", merge="concat"),
]


@pytest.mark.parametrize("spec", SMALL_SPECS, ids=lambda s: s.name)
def test_spec_json_round_trip_and_hash(spec):
    d = spec.to_json()
    assert d["family"] == spec.family
    text = json.dumps(d)
    back = zoo.spec_from_json(json.loads(text))
    assert back == spec and hash(back) == hash(spec) and type(back) is type(spec)
    assert type(spec).from_json(d) == spec
    assert zoo.ArchSpec.from_json(d) == spec
    assert len({spec, back, spec.replace()}) == 1
    field = "vocab_size" if spec.family == "gpt2" else "num_classes"
    assert spec.replace(**{field: 7}) != spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(spec, field, 3)


def test_spec_names():
    assert ViTSpec(depth=6, width=256, num_heads=8, patch_size=4).name == "vit-d6-w256-h8-p4"
    assert zoo.get("gpt2", tie_embeddings=False).name == "gpt2-d12-w768-h12-untied"
    assert zoo.get("resnet50").name == "resnet-bottleneck-3.4.6.3-w64"
    a, b = CellNetSpec(), CellNetSpec(merge="concat")
    assert a.name.startswith("cellnet-c5-w32-n4r3-bn-sum-") and a.name != b.name
    assert a.name == CellNetSpec().name


def test_spec_errors():
    with pytest.raises(ValueError, match="unknown preset 'vit-xl'.*vit-b"):
        zoo.get("vit-xl")
    with pytest.raises(ValueError, match=r"unknown ViTSpec field\(s\) \['widht'\].*'width'"):
        zoo.get("vit-b", widht=128)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        zoo.get("vit-b", num_heads=5)
    with pytest.raises(ValueError, match="patch_size"):
        zoo.get("vit-b", patch_size=15)
    with pytest.raises(ValueError, match="node 2 reads node 2"):
        CellNetSpec(normal=(("conv3x3", 0), ("se", 2)))
    with pytest.raises(ValueError, match="'conv7x7'"):
        CellNetSpec(normal=(("conv7x7", 0),))
    with pytest.raises(ValueError, match="ViTSpec.depth must be int, got '12'"):
        zoo.spec_from_json({**ViTSpec().to_json(), "depth": "12"})
    with pytest.raises(ValueError, match="GPT2Spec.width must be int, got True"):
        GPT2Spec(width=True)
    assert GPT2Spec(depth=np.int64(3)).depth.__class__ is int
    with pytest.raises(ValueError, match="unknown architecture family 'mlp'"):
        zoo.spec_from_json({"family": "mlp"})
    with pytest.raises(ValueError, match="expected 'vit'"):
        ViTSpec.from_json(GPT2Spec().to_json())
    with pytest.raises(ValueError, match="unknown GPT2Spec field"):
        zoo.spec_from_json({"family": "gpt2", "n_layer": 3})


def test_vits_sampler_ranges():
    specs = zoo.sample("vits-1k", 400, seed=0)
    assert len(set(specs)) == 400
    cfg = zoo.SAMPLERS["vits-1k"].resolve()
    by_depth = collections.defaultdict(list)
    for s in specs:
        assert 3 <= s.depth <= 9 and 128 <= s.width <= vit_width_cap(s.depth, cfg)
        assert s.width % 16 == 0 and s.width % s.num_heads == 0
        assert s.width // s.num_heads >= 16 and s.num_heads <= 16
        assert s.patch_size in (2, 4) and s.mlp_ratio == 4
        assert (s.image_size, s.in_channels, s.num_classes) == (32, 3, 10)
        by_depth[s.depth].append(s.width)
    assert set(by_depth) == set(range(3, 10))
    assert {s.patch_size for s in specs} == {2, 4}
    # Deeper nets are narrower.
    assert max(by_depth[9]) <= 320 < max(by_depth[3])
    assert np.mean(by_depth[9]) < np.mean(by_depth[3])


def test_gpts_sampler_ranges():
    specs = zoo.sample("gpts-1k", 300, seed=3, vocab_size=256, context_length=128)
    for s in specs:
        assert 3 <= s.depth <= 9 and 72 <= s.width <= 256 and s.width % 8 == 0
        assert s.num_heads == 8 and s.vocab_size == 256 and s.context_length == 128
    # The default ranges hold 7 depths x 24 widths: all are found before any repeat.
    assert len(set(specs)) == 168 and len(set(specs[:168])) == 168


def test_gpts_sampler_draws_head_counts_that_divide_the_width():
    heads = (1, 2, 4, 8, 12)
    specs = zoo.sample("gpts-1k", 400, seed=0, width=(16, 64), num_heads=heads, vocab_size=64)
    assert all(s.num_heads in heads and s.width % s.num_heads == 0 for s in specs)
    # 12 heads divide only widths 24 and 48 of 16-64 (multiples of 8); every count is drawn.
    assert {s.num_heads for s in specs} == set(heads)
    assert {s.width for s in specs if s.num_heads == 12} == {24, 48}
    # One head count (8, the default) draws nothing for the heads, so recorded runs keep
    # their architectures (these are the draws from before heads were a range).
    assert [s.name for s in zoo.sample("gpts-1k", 5, seed=0, vocab_size=256)] == [
        "gpt2-d8-w192-h8",
        "gpt2-d6-w120-h8",
        "gpt2-d5-w72-h8",
        "gpt2-d3-w72-h8",
        "gpt2-d4-w224-h8",
    ]
    with pytest.raises(ValueError, match="no width in"):
        zoo.sample("gpts-1k", 5, width=(16, 40), num_heads=48)


def test_cnns_sampler_ranges():
    specs = zoo.sample("cnns-1k", 200, seed=1, image_size=28, in_channels=1, width=(8, 16))
    assert len(set(specs)) == 200
    for s in specs:
        assert 3 <= s.num_cells <= 8 and len(s.reductions) == 2
        assert s.width in (8, 16) and (s.image_size, s.in_channels) == (28, 1)
        for genotype in (s.normal, s.reduce):
            assert 2 <= len(genotype) <= 5
            assert any(op not in ("max_pool3x3", "avg_pool3x3", "identity") for op, _ in genotype)
    assert {s.norm for s in specs} == {"bn", "ln", "none"}
    assert {s.merge for s in specs} == {"sum", "concat"}
    assert {op for s in specs for op, _ in s.normal} == set(zoo.OPS)
    assert abstract_forward(specs[0]).shape == (2, 10)


@pytest.mark.parametrize("name", list(zoo.SAMPLERS))
def test_samplers_deterministic(name):
    a = zoo.sample(name, 30, seed=0)
    assert a == zoo.sample(name, 30, seed=0)
    assert a != zoo.sample(name, 30, seed=1)
    assert zoo.sample(name, 10, seed=0) == a[:10]
    for s in a[:3]:
        assert s.counted_num_params() == s.closed_form_num_params()


def test_sampler_overrides_and_errors():
    specs = zoo.sample("vits-1k", 20, depth=4, patch_size=4, image_size=28, in_channels=1)
    assert all(s.depth == 4 and s.patch_size == 4 and s.image_size == 28 for s in specs)
    with pytest.raises(ValueError, match=r"unknown vits-1k argument\(s\) \['dpeth'\]"):
        zoo.sample("vits-1k", 5, dpeth=(3, 4))
    with pytest.raises(ValueError, match="unknown sampler"):
        zoo.sample("mlps-1k", 5)
    with pytest.raises(ValueError, match="does not divide image_size 30"):
        zoo.sample("vits-1k", 5, image_size=30)
    with pytest.raises(ValueError, match="low <= high"):
        zoo.sample("gpts-1k", 5, depth=(9, 3))


def test_dataset_round_trip(tmp_path):
    path = tmp_path / "sub" / "archs.json"
    written = zoo.write_dataset(path, "cnns-1k", 40, seed=2, heldout=0.25, image_size=28)
    loaded = zoo.load_dataset(path)
    assert loaded["train"] == written["train"] and loaded["heldout"] == written["heldout"]
    assert len(loaded["train"]) == 30 and len(loaded["heldout"]) == 10
    assert loaded["train"] + loaded["heldout"] == zoo.sample("cnns-1k", 40, seed=2, image_size=28)
    assert (loaded["sampler"], loaded["seed"], loaded["version"]) == ("cnns-1k", 2, 1)
    assert loaded["ranges"]["image_size"] == 28 and loaded["ranges"]["nodes"] == [2, 5]
    assert all(s.image_size == 28 for s in loaded["train"])


def test_dataset_heldout_is_disjoint_when_archs_repeat(tmp_path):
    written = zoo.write_dataset(tmp_path / "g.json", "gpts-1k", 400, vocab_size=256)
    held = set(written["heldout"])
    assert len(held) == len(written["heldout"]) == 17  # 10% of 168 distinct
    assert not held & set(written["train"])


def test_load_dataset_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad JSON"):
        zoo.load_dataset(bad)
    bad.write_text(json.dumps({"version": 99, "train": [], "heldout": []}))
    with pytest.raises(ValueError, match="format version 99"):
        zoo.load_dataset(bad)


def test_sample_command(tmp_path):
    out = tmp_path / "archs.json"
    cmd = [sys.executable, "-m", "ghn.zoo.make_dataset", "vits-1k", "--n", "50", "--seed", "1"]
    cmd += ["--out", str(out), "--heldout", "0.2", "--set", "image_size=28"]
    cmd += ["--set", "in_channels=1", "--set", "depth=[3,5]"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, check=True)
    assert "40 train, 10 heldout, 50 distinct" in result.stdout
    assert "Warning" not in result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    data = zoo.load_dataset(out)
    specs = zoo.sample("vits-1k", 50, seed=1, image_size=28, in_channels=1, depth=(3, 5))
    assert data["train"] + data["heldout"] == specs
    lo = min(s.closed_form_num_params() for s in specs)
    assert f"params {lo / 1e6:.3g}M-" in result.stdout


def test_sample_command_errors(tmp_path, capsys):
    cli = importlib.import_module("ghn.zoo.make_dataset")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["vits-1k", "--out", str(tmp_path / "a.json"), "--set", "bogus=1"])
    assert exit_info.value.code == 2
    assert "unknown vits-1k argument(s) ['bogus']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["vits-1k", "--out", str(tmp_path / "a.json"), "--set", "depth"])
    assert "--set expects KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "a.json").exists()


@pytest.mark.parametrize(
    "name, ranges",
    [
        ("vits-1k", dict(depth=(2, 4), width=(32, 96), width_multiple=16, max_heads=4)),
        ("gpts-1k", dict(depth=(1, 3), width=(16, 64))),
        ("gpts-1k", dict(depth=(1, 2), width=(16, 48), num_heads=(1, 2, 4, 8))),
    ],
)
def test_space_lists_exactly_what_the_sampler_draws(name, ranges):
    space = zoo.space(name, **ranges)
    assert len(space) == len(set(space))
    draws = zoo.sample(name, 4 * len(space) + 200, seed=3, **ranges)
    # Every draw is listed, and (with this many draws) everything listed is drawn.
    assert set(draws) == set(space)


def test_space_of_cell_networks_is_an_error():
    with pytest.raises(ValueError, match="too large to list"):
        zoo.space("cnns-1k")
