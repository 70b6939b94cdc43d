"""ghn: parameter prediction with graph hypernetworks (LoGAH) in JAX/Flax NNX."""

from ghn import zoo
from ghn.graph import Graph, trace

__version__ = "0.1.0"

__all__ = ["Graph", "trace", "zoo", "__version__"]
