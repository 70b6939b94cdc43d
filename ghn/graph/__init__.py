"""Computational graphs of NNX models, traced from their jaxpr."""

from ghn.graph.graph import DEFAULT_SPD_CUTOFF, UNREACHABLE, Graph, ParamInfo
from ghn.graph.ops import OP_INDEX, OPS, OPS_VERSION, ROLES
from ghn.graph.trace import ExampleInputError, TraceError, UnsupportedOpError, trace

__all__ = [
    "DEFAULT_SPD_CUTOFF",
    "ExampleInputError",
    "Graph",
    "OPS",
    "OPS_VERSION",
    "OP_INDEX",
    "ParamInfo",
    "ROLES",
    "TraceError",
    "UNREACHABLE",
    "UnsupportedOpError",
    "trace",
]
