"""ghn: parameter prediction with graph hypernetworks (LoGAH) in JAX/Flax NNX."""

from ghn import zoo
from ghn.graph import Graph, trace
from ghn.hub import available, load, save
from ghn.hypernet import GHN, GHNConfig, with_params

__version__ = "0.1.0"

__all__ = [
    "GHN",
    "GHNConfig",
    "Graph",
    "available",
    "load",
    "save",
    "trace",
    "with_params",
    "zoo",
    "__version__",
]
