"""`GHN`: the graph encoder plus a parameter decoder, as one NNX module."""

from __future__ import annotations

import jax
from flax import nnx

from ghn._compat import host_counted
from ghn.hypernet.batch import GraphBatch
from ghn.hypernet.config import GHNConfig
from ghn.hypernet.decoder import make_decoder
from ghn.hypernet.encoder import Encoder
from ghn.hypernet.predict import predict
from ghn.params import count_params


class GHN(nnx.Module):
    """Graph hypernetwork: `encode(batch)` gives node embeddings, `decoder` turns
    an embedding into a (rows, cols) parameter matrix (`.full`) or, for the
    low-rank decoder, its factors (`.factors`).
    """

    def __init__(self, config: GHNConfig | None = None, *, rngs: nnx.Rngs):
        self.config = config or GHNConfig.named("tiny")
        self.encoder = Encoder(self.config, rngs=rngs)
        self.decoder = make_decoder(self.config, rngs=rngs)

    def encode(self, batch: GraphBatch) -> jax.Array:
        """Node embeddings `nodes_BxNxD`; padded nodes are zero."""
        return self.encoder(batch)

    def __call__(self, batch: GraphBatch) -> jax.Array:
        return self.encode(batch)

    def predict(self, model: nnx.Module, *example_inputs, sharding=None) -> nnx.State:
        """Predicts every parameter of `model`.

        Args:
          model: any NNX module; may be abstract (`nnx.eval_shape`), so no
            random copy of a large model is ever needed.
          *example_inputs: inputs (or `jax.ShapeDtypeStruct`s) `model` is called with.
          sharding: where to place the output: a `jax.sharding.Sharding` for
            every parameter, a pytree of shardings matching the state, a
            `Mesh` or "auto" (each parameter's largest divisible axis split
            over the devices).

        Returns:
          An `nnx.State` with exactly the tree, shapes and dtypes of
          `nnx.state(model, nnx.Param)`. Differentiable w.r.t. this GHN.
        """
        return predict(self, model, *example_inputs, sharding=sharding)


def abstract_ghn(config: GHNConfig | None = None) -> GHN:
    """`GHN(config)` under `nnx.eval_shape`: its parameters are `jax.ShapeDtypeStruct`s.

    The draws' values are discarded, so the Rngs counts on the host without
    checking its keys against flax's: tracing LoGAH-Tiny takes ~0.1 s instead of
    ~0.7 s, and compiles nothing (see `ghn._compat.host_counted`).
    """
    return nnx.eval_shape(lambda: GHN(config, rngs=host_counted(nnx.Rngs(0), check_keys=False)))


def num_params(config: GHNConfig) -> int:
    """Number of parameters of `GHN(config)`, computed without allocating them."""
    return count_params(abstract_ghn(config))
