"""ghn: parameter prediction with graph hypernetworks (LoGAH) in JAX/Flax NNX.

    hyper = ghn.load("vit-mnist")                 # or ghn.GHN(ghn.GHNConfig(), rngs=...)
    params = hyper.predict(model, example_input)  # nnx.State: nnx.state(model, nnx.Param)'s tree
    model = ghn.with_params(model, params)

Reading order (the data flow, one file per stage):
  1. zoo         ghn/zoo/{vit,gpt2,resnet,cellnet}.py, samplers.py: specs build NNX models;
                 parse.py: architecture names; pools.py: which ones a run trains on
  2. trace       ghn/graph/trace.py: model + example input -> `Graph` (graph.py: nodes,
                 edges, shortest paths, parameter layouts)
  3. batch       ghn/hypernet/batch.py: graphs padded into a `GraphBatch` of arrays
  4. encoder     ghn/hypernet/encoder.py: graph transformer -> one embedding per node
  5. decoder     ghn/hypernet/decoder.py: embedding -> low-rank factors of a parameter
  6. prediction  ghn/hypernet/predict.py: plan, decode, normalize (normalize.py) and
                 lay out every parameter; `GHN.predict`
  7. task loss   ghn/tasks.py: the target's forward on real data (ghn/data/) -> loss
  8. GHN update  ghn/train/step.py: meta_loss -> meta_grads -> apply_update (AdamW);
                 programs.py compiles them, trainer.py runs the loop
  Then: ghn/hub.py (trained GHNs on disk), ghn/evaluate.py (predicted vs random init).

Shape suffixes: an array's name ends in its shape, one letter per axis (`nodes_BxNxD`).
  B  batch (graphs of a GraphBatch, or examples)     N  nodes of a (padded) graph
  D  node-embedding / model width (the paper's d)    E  edges
  H  attention heads                                 A  width of one head (D / H)
  F  hidden width of an MLP                          L  sequence length (L1 = L + 1 tokens)
  V  softmax width: vocabulary or classes            Y, X, C  image rows, columns, channels
  G  parameters decoded together (one group)         K  the decoder's width (max_dim)
  O, I  rows (c_out * k_h) and columns (c_in * k_w) of a decoded matrix
  r  the decoder's rank; other lowercase letters are sizes named in the function.
  A digit is a literal size (`Gx2rxr`: 2r rows of r).
"""

from ghn import zoo
from ghn.graph import Graph, trace
from ghn.hub import available, checkpoints, load, save
from ghn.hypernet import GHN, GHNConfig, with_params

__version__ = "0.1.0"

__all__ = [
    "GHN",
    "GHNConfig",
    "Graph",
    "available",
    "checkpoints",
    "load",
    "save",
    "trace",
    "with_params",
    "zoo",
    "__version__",
]
