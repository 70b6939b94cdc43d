"""On an accelerator: the bucketed training program and prediction give the CPU's values.

Skipped where JAX's default backend is the CPU (conftest). Run on a GPU machine with
`JAX_PLATFORMS=cuda,cpu python -m pytest -m gpu tests/test_gpu.py`. Matrix products run
at float32 precision here (`jax.default_matmul_precision`), so the float32 round-off
model of `tolerances` holds; the GPU's default (TF32 products, 10 mantissa bits) is a
speed setting users choose, not a correctness check.
"""

import jax
import numpy as np
import pytest
import test_bucketed_predict as tbp
from flax import nnx
from tolerances import assert_trees_close, predict_reduction

import ghn

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", sorted(tbp.FAMILIES))
def test_bucketed_meta_gradients_equal_per_architecture_on_accelerator(family):
    hyper = ghn.GHN(tbp.CONFIG, rngs=nnx.Rngs(0))
    assert jax.default_backend() != "cpu"
    with jax.default_matmul_precision("float32"):
        tbp.test_bucketed_meta_loss_and_gradients_equal_the_per_architecture_ones(hyper, family)


@pytest.mark.parametrize("spec", [tbp.FAMILIES["vit"][-1], tbp.FAMILIES["gpt2"][-1]], ids=str)
def test_prediction_on_accelerator_equals_cpu(spec):
    hyper = ghn.GHN(tbp.CONFIG, rngs=nnx.Rngs(0))
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    x = tbp.input_spec(spec)
    with jax.default_matmul_precision("float32"):
        got = hyper.predict(model, x)
        on = {d.platform for leaf in jax.tree.leaves(got) for d in leaf.devices()}
        assert "cpu" not in on, on
        cpu = jax.devices("cpu")[0]
        on_cpu = nnx.merge(nnx.graphdef(hyper), jax.device_put(nnx.state(hyper), cpu))
        with jax.default_device(cpu):
            want = on_cpu.predict(model, x)
        assert {d.platform for leaf in jax.tree.leaves(want) for d in leaf.devices()} == {"cpu"}
    got = jax.tree.map(np.asarray, got)
    want = jax.tree.map(np.asarray, want)
    assert_trees_close(got, want, reduction=predict_reduction(hyper, model, x))
