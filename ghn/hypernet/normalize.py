"""How raw decoder outputs become parameters: one table, per parameter role.

Matrices (dense and conv kernels, embeddings, ...) are rescaled to a target
standard deviation: the decoder picks the direction, the table picks the
scale, so a predicted init is never badly scaled whatever the GHN learned.
Vectors (biases, norm scales) are squashed around their usual value with tanh.

Fan-in comes from `ParamInfo`, i.e. from the axes the forward pass actually
contracts, never from an assumed storage layout.

Token embeddings get LeCun scale over their width by default
(`GHNConfig.embedding_scale="fan_in"`), not GPT-2's init std 0.02: a tied
embedding is also the output head, whose logits then have std up to
std * width * (final norm's scale). At 0.02 and the zoo's widths (16-128) that
caps them near 0.3-2.6, so a GHN can only spread its outputs by aligning every
token's row with a few directions (measured: effective rank 4 of 88) and stays
on the unigram plateau; at fan-in scale it leaves it within a few hundred
steps (RESULTS.md, "The tied embedding's scale").

Positional embeddings match the stream they are added to by default
(`GHNConfig.position_scale="stream"`): the token embedding's std when the model
has one, otherwise unit std, the per-coordinate scale the fan-in rules give
features computed from standardized inputs. At the random init's 0.02 a ViT's
positions are ~1% of its patch features (RMS 0.02 against 2.3 on MNIST-5k), so
a GHN cannot make position matter at step 0 (RESULTS.md, "Positional
embeddings at the stream's scale"; the GPT-2 configs keep "init", measured
better there for fine-tuning).
"""

from __future__ import annotations

import dataclasses
import math

from ghn.graph import Graph, ParamInfo


@dataclasses.dataclass(frozen=True)
class Rule:
    """`kind="rms"`: scale to std `gain / sqrt(fan_in)` (or fixed `std`, or `follow`).

    `kind="squash"`: `center + amplitude * tanh(raw)`.
    """

    kind: str
    gain: float = 1.0
    std: float | None = None
    # "rms" only: take the target std of the graph's parameter with this role when
    # it has one (e.g. a positional embedding follows the token embedding).
    follow: str | None = None
    center: float = 0.0
    amplitude: float = 0.0


RULES: dict[str, Rule] = {
    # LeCun fan-in scaling; GPT-2's extra 1/sqrt(2 * n_layer) on residual
    # output projections is applied on top (see `target_std`).
    "dense": Rule("rms", gain=1.0),
    # He fan-in scaling: conv layers are followed by ReLU-family activations.
    "conv": Rule("rms", gain=2.0),
    # A token embedding (tied: also the output head) at fan-in scale; see the docstring.
    "embedding": Rule("rms", gain=1.0),
    # A positional embedding at the scale of the stream it joins; see the docstring.
    "pos_embedding": Rule("rms", std=1.0, follow="embedding"),
    "cls_token": Rule("rms", std=0.02),
    "other": Rule("rms", std=0.02),
    "norm_scale": Rule("squash", center=1.0, amplitude=0.25),
    "scale": Rule("squash", center=1.0, amplitude=0.25),
    "norm_bias": Rule("squash", center=0.0, amplitude=0.1),
    "bias": Rule("squash", center=0.0, amplitude=0.1),
}

EPS = 1e-12

# `GHNConfig.embedding_scale`: the "embedding" rule. "init" is GPT-2's random init
# (std 0.02), which GHNs recorded before the option existed were trained with.
EMBEDDING_RULES: dict[str, Rule] = {"fan_in": RULES["embedding"], "init": Rule("rms", std=0.02)}


# `GHNConfig.position_scale`: the "pos_embedding" rule. "init" is the random init's
# std 0.02, which GHNs recorded before the option existed were trained with.
POSITION_RULES: dict[str, Rule] = {
    "stream": RULES["pos_embedding"],
    "init": Rule("rms", std=0.02),
}


def rules_for(embedding_scale: str = "fan_in", position_scale: str = "stream") -> dict[str, Rule]:
    """The normalization table with a GHN config's rules for token and positional embeddings."""
    return {
        **RULES,
        "embedding": EMBEDDING_RULES[embedding_scale],
        "pos_embedding": POSITION_RULES[position_scale],
    }


def residual_projections(graph: Graph) -> set[str]:
    """Dense kernels whose output goes (through at most its bias) into a residual sum."""
    succ: dict[int, list[int]] = {}
    for s, t in graph.edges:
        succ.setdefault(int(s), []).append(int(t))
    out = set()
    for path, info in graph.params.items():
        if info.role != "dense":
            continue
        frontier = succ.get(info.node, [])
        bias = [n for n in frontier if graph.node_ops[n] == "bias"]
        if len(frontier) == 1 and bias:
            frontier = succ.get(bias[0], [])
        if frontier and all(graph.node_ops[n] == "sum" for n in frontier):
            out.add(path)
    return out


def target_stds(graph: Graph, rules: dict[str, Rule] = RULES) -> dict[str, float]:
    """Target std for every parameter with an "rms" rule of `rules`."""
    residual = residual_projections(graph)
    n_layer = max(1, math.ceil(len(residual) / 2))
    by_role = {}
    for info in graph.params.values():
        by_role.setdefault(info.role, info)
    out = {}
    for path, info in graph.params.items():
        rule = rules[info.role]
        if rule.kind != "rms":
            continue
        if rule.follow in by_role:
            std = target_std(by_role[rule.follow], rules[rule.follow])
        else:
            std = target_std(info, rule)
        if path in residual:
            std /= math.sqrt(2 * n_layer)
        out[path] = std
    return out


def target_std(info: ParamInfo, rule: Rule) -> float:
    if rule.std is not None:
        return rule.std
    return math.sqrt(rule.gain / max(info.fan_in, 1))
