"""The graph hypernetwork: graph batching, encoder, decoders and the GHN module."""

from ghn.hypernet.batch import GraphBatch, make_batch
from ghn.hypernet.config import GHNConfig
from ghn.hypernet.model import GHN, abstract_ghn, num_params
from ghn.hypernet.normalize import RULES, residual_projections, target_stds
from ghn.hypernet.predict import Plan, make_plan, predict_leaves, prepare, with_params

__all__ = [
    "GHN",
    "GHNConfig",
    "GraphBatch",
    "Plan",
    "RULES",
    "abstract_ghn",
    "make_batch",
    "make_plan",
    "num_params",
    "predict_leaves",
    "prepare",
    "residual_projections",
    "target_stds",
    "with_params",
]
