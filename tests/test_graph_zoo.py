"""Tracing the zoo: exact node counts, wiring the reference gets wrong, abstract models."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx
from test_graph import assert_one_node_per_param, node_of, preds

import ghn
from ghn import zoo

REPO = Path(__file__).resolve().parents[1]


def abstract(spec):
    return nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))


def traced(spec):
    model = abstract(spec)
    return model, ghn.trace(model, spec.input_spec(batch_size=1))


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_graph(depth, pool):
    spec = zoo.ViTSpec(depth=depth, width=32, num_heads=2, patch_size=4, image_size=16, pool=pool)
    model, g = traced(spec)
    assert_one_node_per_param(g, model)
    # Per block: 2 LN, qkv W+b, attention, proj W+b, 2 sums, fc1 W+b, fc2 W+b.
    # Stem and head: input, patch conv W+b, class token (or global average),
    # positional embedding, final LN, head W+b.
    assert g.num_nodes == 13 * depth + 8
    if pool == "cls":
        cls = node_of(g, "cls_token")
        assert g.node_ops[cls] == "cls_token"
        assert g.params["cls_token"].role == "cls_token"
        assert preds(g, node_of(g, "pos_embed")) == [cls]
    else:
        assert "cls_token" not in g.node_ops and g.op_counts()["glob_avg"] == 1
    assert g.op_counts()["attn"] == depth
    head_input = preds(g, node_of(g, "head/kernel"))
    if pool == "mean":
        assert g.node_ops[head_input[0]] == "glob_avg"
        head_input = preds(g, head_input[0])
    assert head_input == [node_of(g, "norm/scale")]


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_graph(tied):
    spec = zoo.GPT2Spec(
        depth=2, width=32, num_heads=4, vocab_size=64, context_length=16, tie_embeddings=tied
    )
    model, g = traced(spec)
    assert_one_node_per_param(g, model)
    # Per block 13 nodes as in ViT; plus input, wte, wpe, ln_f and the head.
    assert g.num_nodes == 13 * 2 + 5
    ln_f = node_of(g, "ln_f/scale")
    head = g.num_nodes - 1
    # The output head is wired after the final norm (the reference hangs an
    # untied lm_head off the input node).
    assert preds(g, head) == [ln_f] and g.outputs == [head]
    if tied:
        # One parameter used in two places: owned by the embedding, shared by the head.
        assert g.node_params[head] == [] and g.node_shared[head] == ["wte/embedding"]
        assert g.shared_params == {"wte/embedding": [node_of(g, "wte/embedding"), head]}
        assert g.node_ops[head] == "dense"
        assert tuple(g.node_shapes[head]) == (64, 32, 1, 1)
    else:
        assert g.node_params[head] == ["lm_head/kernel"] and g.shared_params == {}
    assert g.node_ops[node_of(g, "wpe/embedding")] == "pos_enc"
    assert g.params["blocks/0/attn/c_attn/kernel"].fan_in == 32
    assert g.params["blocks/0/mlp/c_proj/kernel"].fan_in == 128


@pytest.mark.parametrize(
    "spec",
    [
        zoo.ResNetSpec(block="basic", layers=(1, 1), width=8, small_input=True, image_size=16),
        zoo.ResNetSpec(block="bottleneck", layers=(1, 2), width=8, small_input=True, image_size=16),
    ],
    ids=["basic", "bottleneck"],
)
def test_resnet_graph(spec):
    model, g = traced(spec)
    assert_one_node_per_param(g, model)
    counts = g.op_counts()
    assert counts["conv"] == counts["bn"]
    assert counts["sum"] == sum(spec.layers)
    assert counts["glob_avg"] == 1 and "attn" not in counts


def test_cellnet_graph_covers_every_op():
    spec = zoo.CellNetSpec(
        normal=(
            ("conv1x1", 0),
            ("conv3x3", 0),
            ("sep_conv5x5", 1),
            ("dil_conv3x3", 0),
            ("se", 2),
            ("max_pool3x3", 1),
            ("avg_pool3x3", 0),
            ("identity", 3),
        ),
        reduce=(("conv5x5", 0), ("sep_conv3x3", 0), ("dil_conv5x5", 1)),
        num_cells=3,
        reductions=(1,),
        width=8,
        norm="bn",
        merge="concat",
        image_size=16,
    )
    model, g = traced(spec)
    assert_one_node_per_param(g, model)
    ops = set(g.node_ops)
    assert {"conv", "dw_conv", "bn", "mul", "glob_avg", "max_pool", "avg_pool", "concat"} <= ops
    for norm, op in (("ln", "ln"), ("none", None)):
        model, g = traced(spec.replace(norm=norm, merge="sum"))
        assert_one_node_per_param(g, model)
        assert "sum" in g.node_ops and "bn" not in g.node_ops
        assert (op in g.node_ops) if op else not ({"ln", "bn"} & set(g.node_ops))


def test_presets_trace_abstractly():
    for name, blocks, per_block, extra in (("vit-b", 12, 13, 8), ("gpt2-medium", 24, 13, 5)):
        spec = zoo.get(name)
        model, g = traced(spec)
        assert g.num_nodes == per_block * blocks + extra
        assert g.num_params == spec.num_params()
        assert all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(nnx.state(model)))


def test_sampled_architectures_trace():
    for name, kw in (
        ("vits-1k", dict(image_size=16)),
        ("gpts-1k", dict(vocab_size=64)),
        ("cnns-1k", dict(image_size=16, width=(8, 16))),
    ):
        for spec in zoo.sample(name, 3, seed=0, **kw):
            model, g = traced(spec)
            assert_one_node_per_param(g, model)


GPT2_XL_CHILD = """
import json, resource
from flax import nnx
import ghn
spec = ghn.zoo.get("gpt2-xl")
model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
g = ghn.trace(model, spec.input_spec(batch_size=1))
try:  # this process image's own peak: ru_maxrss carries the forking parent's over exec
    peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
except OSError:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"nodes": g.num_nodes, "params": g.num_params, "rss_mb": peak_kb / 1024}))
"""


@pytest.mark.slow
def test_gpt2_xl_traces_without_allocating_weights():
    out = subprocess.run(
        [sys.executable, "-c", GPT2_XL_CHILD],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["nodes"] == 13 * 48 + 5
    assert result["params"] == 1_557_611_200
    # Its weights alone are 6.2 GB in float32.
    assert result["rss_mb"] < 1500, result


def test_trace_command(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ghn",
            "trace",
            "vit-ti",
            "--set",
            "depth=2",
            "--draw",
            str(tmp_path / "g.png"),
            "--save",
            str(tmp_path / "g.npz"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert "nodes=34" in out.stdout and (tmp_path / "g.png").stat().st_size > 10_000
    assert ghn.Graph.load(tmp_path / "g.npz").num_nodes == 34


def graph_digest(graph) -> str:
    blob = json.dumps(
        [
            graph.node_ops,
            graph.edges.tolist(),
            graph.node_params,
            graph.node_shared,
            graph.node_shapes.tolist(),
            [
                [p.path, p.role, p.out_axes, p.in_axes, p.spatial_axes]
                for p in graph.params.values()
            ],
        ]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    "name,overrides,expected",
    [
        ("vit-ti", dict(depth=2), "c8e1367279f199a9"),
        ("gpt2", dict(depth=2), "eb14c26950823681"),
        ("resnet18", {}, "35bd18f405519acc"),
    ],
)
def test_graphs_are_pinned(name, overrides, expected):
    """Graphs must not change with the JAX/Flax version: a trained GHN depends on them.

    If this fails after a library upgrade, the tracer needs to absorb the new
    jaxpr form; if it fails after an intended change, bump GRAPH_FORMAT (ghn.graph.graph).
    """
    spec = zoo.get(name, **overrides)
    assert graph_digest(traced(spec)[1]) == expected
