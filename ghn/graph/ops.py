"""The fixed, versioned vocabulary of node operations and parameter roles.

Node ids index embedding tables of trained GHNs, so entries are only ever
appended; changing the meaning or order of an entry requires a new version.
"""

OPS_VERSION = 1

OPS: tuple[str, ...] = (
    "input",  # a model input
    "dense",  # matmul with a weight (Linear, LinearGeneral, einsum with a kernel, tied head)
    "conv",  # convolution
    "dw_conv",  # grouped / depthwise convolution
    "dil_conv",  # dilated convolution
    "embed",  # table lookup (token embedding)
    "pos_enc",  # a learned tensor added to activations (positional embedding)
    "cls_token",  # a learned tensor concatenated to activations (class / register tokens)
    "bias",  # a learned vector added to activations
    "ln",  # layer normalization (scale and bias in one node)
    "rms_norm",  # RMS normalization
    "bn",  # batch normalization
    "gn",  # group normalization
    "scale",  # a learned tensor multiplied into activations, not part of a normalization
    "attn",  # scaled dot-product attention, whatever kernel implements it
    "sum",  # residual or merge addition
    "mul",  # product of two activations (gating, squeeze-excite)
    "concat",  # concatenation of activations from different nodes
    "max_pool",  # windowed max pooling
    "avg_pool",  # windowed average pooling
    "glob_avg",  # global average over spatial or token axes
    "glob_max",  # global max over spatial or token axes
    "param",  # a parameter used in any other way, or not used by the forward pass
)

OP_INDEX: dict[str, int] = {op: i for i, op in enumerate(OPS)}

NORM_OPS = frozenset({"ln", "rms_norm", "bn", "gn"})
PARAM_FREE_OPS = frozenset(
    {"input", "attn", "sum", "mul", "concat", "max_pool", "avg_pool", "glob_avg", "glob_max"}
)

# Roles decide how predicted parameters are normalized (see ghn.hypernet).
ROLES: tuple[str, ...] = (
    "dense",
    "conv",
    "embedding",
    "pos_embedding",
    "cls_token",
    "bias",
    "norm_scale",
    "norm_bias",
    "scale",
    "other",
)
