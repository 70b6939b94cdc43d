"""Graph tracing: node granularity, ownership, wiring, SPD, errors, drawing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from custom_models import Llama, MLPMixer, SmallCNN
from flax import nnx

import ghn
from ghn.graph import OPS, ExampleInputError, Graph, UnsupportedOpError


def param_paths(model) -> set[str]:
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return {
        "/".join(
            str(getattr(k, "key", k)) for k in p if not isinstance(k, jax.tree_util.GetAttrKey)
        )
        for p, _ in leaves
    }


def assert_one_node_per_param(graph: Graph, model):
    owned = [p for ps in graph.node_params for p in ps]
    assert len(owned) == len(set(owned)), "a parameter is owned by two nodes"
    assert set(owned) == param_paths(model) == set(graph.params)
    for path, info in graph.params.items():
        assert path in graph.node_params[info.node]


def preds(graph: Graph, node: int) -> list[int]:
    return sorted(int(s) for s, t in graph.edges if t == node)


def node_of(graph: Graph, path: str) -> int:
    return graph.params[path].node


def test_llama_style_decoder():
    model = Llama(depth=2, rngs=nnx.Rngs(0))
    g = ghn.trace(model, jnp.zeros((2, 8), jnp.int32))
    assert_one_node_per_param(g, model)
    assert g.op_counts() == {
        "input": 1,
        "embed": 1,
        "rms_norm": 5,
        "dense": 15,
        "attn": 2,
        "sum": 4,
        "mul": 2,
    }
    # Attention is a node even when jax.nn.dot_product_attention implements it,
    # fed by the q, k and v projections.
    attn = g.node_ops.index("attn")
    qkv = {node_of(g, f"layers/0/attn/{n}_proj/kernel") for n in "qkv"}
    assert set(preds(g, attn)) == qkv
    assert preds(g, node_of(g, "layers/0/attn/o_proj/kernel")) == [attn]
    # SwiGLU: the gate and up projections meet in a product node.
    mul = g.node_ops.index("mul")
    assert set(preds(g, mul)) == {
        node_of(g, "layers/0/mlp/gate_proj/kernel"),
        node_of(g, "layers/0/mlp/up_proj/kernel"),
    }
    # The head is wired after the final norm.
    assert preds(g, node_of(g, "lm_head/kernel")) == [node_of(g, "norm/weight")]
    assert g.outputs == [node_of(g, "lm_head/kernel")]
    # The user's own RMSNorm class is recognized; its scale has the norm role.
    assert g.params["norm/weight"].role == "norm_scale"


def test_mlp_mixer():
    model = MLPMixer(depth=3, rngs=nnx.Rngs(0))
    g = ghn.trace(model, jnp.zeros((2, 16, 16, 1)))
    assert_one_node_per_param(g, model)
    assert g.num_nodes == 12 * 3 + 7
    # Token mixing contracts the token axis: fan-in is the number of tokens (16).
    info = g.params["blocks/0/token_fc1/kernel"]
    assert info.fan_in == 16 and info.canonical_shape == (32, 16, 1, 1)
    assert "glob_avg" in g.node_ops


def test_cnn_ops_and_layouts():
    model = SmallCNN(rngs=nnx.Rngs(0))
    g = ghn.trace(model, jnp.zeros((2, 16, 16, 3)))
    assert_one_node_per_param(g, model)
    ops = set(g.node_ops)
    for op in ("conv", "dw_conv", "dil_conv", "bn", "max_pool", "avg_pool", "glob_avg"):
        assert op in ops
    assert {"mul", "concat", "sum"} <= ops
    # BatchNorm scale and bias form one node.
    assert sorted(g.node_params[node_of(g, "bn/scale")]) == ["bn/bias", "bn/scale"]
    conv = g.params["conv/kernel"]  # HWIO
    assert (conv.out_axes, conv.in_axes, conv.spatial_axes) == ((3,), (2,), (0, 1))
    assert conv.fan_in == 27 and conv.canonical_shape == (16, 3, 3, 3)
    dw = g.params["dw/kernel"]
    assert dw.fan_in == 9 and g.node_ops[dw.node] == "dw_conv"


def test_layout_roundtrip():
    model = SmallCNN(rngs=nnx.Rngs(0))
    g = ghn.trace(model, jnp.zeros((2, 16, 16, 3)))
    state = nnx.state(model, nnx.Param)
    kernel = np.asarray(state["conv"]["kernel"][...])
    info = g.params["conv/kernel"]
    canon = info.to_canonical(kernel)
    assert canon.shape == (16, 3, 3, 3)
    # canonical[o, i, h, w] == kernel[h, w, i, o]; transposes copy values: bitwise.
    np.testing.assert_array_equal(canon[5, 2, 0, 1], kernel[0, 1, 2, 5])
    np.testing.assert_array_equal(info.from_canonical(canon), kernel)
    dense = g.params["head/kernel"]  # (in, out)
    w = np.arange(16 * 10.0).reshape(16, 10)
    np.testing.assert_array_equal(dense.to_canonical(w)[:, :, 0, 0], w.T)


class TwoLayer(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(4, 8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


def test_abstract_model_traces_identically():
    concrete = ghn.trace(Llama(rngs=nnx.Rngs(0)), jnp.zeros((2, 8), jnp.int32))
    abstract_model = nnx.eval_shape(lambda: Llama(rngs=nnx.Rngs(0)))
    abstract = ghn.trace(abstract_model, jax.ShapeDtypeStruct((2, 8), jnp.int32))
    assert abstract.node_ops == concrete.node_ops
    np.testing.assert_array_equal(abstract.edges, concrete.edges)


def test_spd_and_structural_encodings():
    g = ghn.trace(TwoLayer(nnx.Rngs(0)), jnp.zeros((1, 4)))
    # input -> fc1.k -> fc1.b -> fc2.k -> fc2.b
    assert g.node_ops == ["input", "dense", "bias", "dense", "bias"]
    np.testing.assert_array_equal(g.edges, [[0, 1], [1, 2], [2, 3], [3, 4]])
    assert g.spd_fwd[0, 4] == 4 and g.spd_fwd[4, 0] == -1
    assert g.spd_bwd[4, 0] == 4
    np.testing.assert_array_equal(g.input_distance, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(g.in_degree, [0, 1, 1, 1, 1])
    assert {tuple(e) for e in g.virtual_edges(2)} == {(0, 2), (1, 3), (2, 4)}
    assert len(g.virtual_edges(3)) == 5


def test_save_load_roundtrip(tmp_path):
    g = ghn.trace(SmallCNN(rngs=nnx.Rngs(0)), jnp.zeros((2, 16, 16, 3)))
    g.save(tmp_path / "g.npz")
    h = Graph.load(tmp_path / "g.npz")
    assert h.node_ops == g.node_ops and h.params == g.params
    np.testing.assert_array_equal(h.spd_fwd, g.spd_fwd)
    np.testing.assert_array_equal(h.node_shapes, g.node_shapes)


def test_saved_graph_of_an_older_format_is_refused(tmp_path):
    g = ghn.trace(SmallCNN(rngs=nnx.Rngs(0)), jnp.zeros((2, 16, 16, 3)))
    arrays = g.to_arrays()
    meta = json.loads(bytes(arrays["meta"]).decode())
    del meta["format"]  # as written before attention nodes had a shape
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with pytest.raises(ValueError, match="trace the model again"):
        Graph.from_arrays(arrays)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_attention_nodes_carry_heads_and_head_width(heads):
    # Same parameters, same edges: only the attention node tells the head counts apart.
    spec = ghn.zoo.ViTSpec(
        depth=2, width=32, num_heads=heads, patch_size=4, image_size=8, num_classes=3
    )
    g = ghn.trace(nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0))), spec.input_spec(3))
    attn = [tuple(int(v) for v in s) for o, s in zip(g.node_ops, g.node_shapes) if o == "attn"]
    assert attn == [(heads, 32 // heads, 1, 1)] * 2
    # A fused kernel (jax.nn.dot_product_attention) and a batch of 1 as well.
    llama = ghn.trace(Llama(depth=1, dim=32, heads=8, rngs=nnx.Rngs(0)), jnp.zeros((1, 8), int))
    assert [tuple(s) for o, s in zip(llama.node_ops, llama.node_shapes) if o == "attn"] == [
        (8, 4, 1, 1)
    ]


def test_op_vocabulary_is_stable():
    # Trained GHNs index embedding tables by these ids: entries may only be appended.
    assert OPS[:6] == ("input", "dense", "conv", "dw_conv", "dil_conv", "embed")
    assert ghn.graph.OPS_VERSION == 1 and len(set(OPS)) == len(OPS)


class Sorter(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(4, 4, rngs=rngs)
        self.inner = SortInner(rngs)

    def __call__(self, x):
        return self.inner(self.fc(x))


class SortInner(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return jnp.sort(self.fc(x), axis=-1)


class Scanned(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return jax.lax.scan(lambda c, _: (self.fc(c), None), x, None, length=3)[0]


def test_unsupported_primitive_names_op_and_module():
    with pytest.raises(UnsupportedOpError, match=r"'sort' in module 'inner' \(SortInner\)") as e:
        ghn.trace(Sorter(nnx.Rngs(0)), jnp.zeros((2, 4)))
    assert e.value.primitive == "sort" and e.value.module == "inner"
    with pytest.raises(UnsupportedOpError, match="'scan'"):
        ghn.trace(Scanned(nnx.Rngs(0)), jnp.zeros((2, 4)))


def test_wrong_example_input_is_a_clear_error():
    with pytest.raises(ExampleInputError, match=r"module 'stem' \(Conv\)"):
        ghn.trace(MLPMixer(rngs=nnx.Rngs(0)), jnp.zeros((2, 16, 16, 3)))
    with pytest.raises(ExampleInputError, match=r"float32\[2, 8\].*embed_tokens"):
        ghn.trace(Llama(rngs=nnx.Rngs(0)), jnp.zeros((2, 8), jnp.float32))
    with pytest.raises(TypeError, match="nnx.Module"):
        ghn.trace(lambda x: x, jnp.zeros(2))


def test_unused_parameter_still_gets_a_node():
    class WithSpare(TwoLayer):
        def __init__(self, rngs):
            super().__init__(rngs)
            self.spare = nnx.Param(jnp.zeros((3,)))

    model = WithSpare(nnx.Rngs(0))
    g = ghn.trace(model, jnp.zeros((1, 4)))
    assert_one_node_per_param(g, model)
    assert g.node_ops[node_of(g, "spare")] == "param"


def test_trace_restores_module_classes():
    def calls():
        return [c.__dict__.get("__call__") for c in (Sorter, SortInner, nnx.Linear)]

    before = calls()
    ghn.trace(TwoLayer(nnx.Rngs(0)), jnp.zeros((1, 4)))
    with pytest.raises(UnsupportedOpError):
        ghn.trace(Sorter(nnx.Rngs(0)), jnp.zeros((2, 4)))
    assert calls() == before and before[0] is not None and before[2] is not None


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_draw(tmp_path, suffix):
    g = ghn.trace(SmallCNN(rngs=nnx.Rngs(0)), jnp.zeros((2, 16, 16, 3)))
    out = g.draw(tmp_path / f"cnn{suffix}")
    assert out.stat().st_size > 5_000
    with pytest.raises(ValueError, match="png"):
        g.draw(tmp_path / "cnn.txt")
