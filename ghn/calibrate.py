"""Tempering a predicted model's output so its first loss is never worse than chance.

A GHN's prediction for data it was not trained on (another dataset with the
same classes, another corpus), or for an architecture far from its training
distribution, can be confidently wrong: its logits have the scale the
normalization table gives them, whatever the features mean. Temperature
scaling (Guo et al., ICML 2017) fixes that with one number fitted on a few
training batches: the output layer is rescaled so that the logits become
alpha times the predicted ones, with alpha in [0, 1] minimizing the training
loss. alpha = 0 is the uniform prediction (loss ln C, which is where a
zero-initialized head starts), so the tempered loss on those batches is never
above it; alpha = 1 leaves a good prediction untouched. Tempering only ever
lowers confidence, so fine-tuning never starts sharper than the GHN made it.

The rescaled parameters are found on the model's graph: an output layer with
its own weights (an untied head: kernel and bias) is scaled directly; a head
that reuses another layer's weights (GPT-2's tied embedding) is reached
through the normalization layer that feeds it, whose scale and bias are
scaled instead (LN(x) = g * x_hat + b, so logits = E @ (alpha * LN(x))).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ghn.errors import ConfigError
from ghn.graph import Graph, trace
from ghn.graph.graph import norm_like
from ghn.tasks import Task


def output_scale_paths(graph: Graph) -> list[str]:
    """Parameter paths whose joint scaling by alpha scales every output by alpha."""

    def feeding(node: int) -> list[int]:
        return [int(s) for s, t in graph.edges if t == node]

    def refuse(node: int, why: str) -> ConfigError:
        return ConfigError(
            f"output layer {graph.node_names[node]!r} ({graph.node_ops[node]}) {why}: its "
            "logits cannot be rescaled without changing the rest of the model"
        )

    paths: list[str] = []
    for node in graph.outputs:
        # A bias node adds its vector to the layer before it: scale both.
        while graph.node_ops[node] == "bias":
            paths += graph.node_params[node]
            preds = feeding(node)
            if len(preds) != 1:
                raise refuse(node, "adds a bias to more than one input")
            node = preds[0]
        own = list(graph.node_params[node])
        if not graph.node_shared[node]:
            if not own or graph.node_ops[node] not in ("dense", "conv"):
                raise refuse(node, "is not a dense or conv layer with its own weights")
            paths += own
            continue
        preds = feeding(node)
        norm = preds[0] if len(preds) == 1 else -1
        if norm < 0 or not norm_like(graph.node_ops[norm]) or not graph.node_params[norm]:
            raise refuse(node, "reuses another layer's weights and is not fed by one norm layer")
        paths += own + graph.node_params[norm]
    return list(dict.fromkeys(paths))


def fit_scale(logits_NxC: np.ndarray, labels_N: np.ndarray, *, max_scale: float = 1.0) -> float:
    """alpha in [0, max_scale] minimizing the mean cross-entropy of alpha * logits.

    The loss is convex in alpha, so bisection on its derivative,
    E[softmax(alpha z) . z] - E[z_label], finds the minimum.
    """
    z = np.asarray(logits_NxC, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    z_label = np.take_along_axis(z, np.asarray(labels_N)[:, None], axis=-1)[:, 0].mean()

    def slope(a: float) -> float:
        p = np.exp(a * z - (a * z).max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        return float((p * z).sum(axis=-1).mean() - z_label)

    if slope(0.0) >= 0.0:
        return 0.0
    if slope(max_scale) <= 0.0:
        return float(max_scale)
    lo, hi = 0.0, float(max_scale)
    for _ in range(40):  # 2^-40 of max_scale: far below any effect on the loss
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) < 0.0 else (lo, mid)
    return 0.5 * (lo + hi)


def _logits_and_labels(model, task: Task, batches) -> tuple[np.ndarray, np.ndarray]:
    forward = nnx.jit(lambda m, b: task.logits_and_labels(m, b))
    zs, ys = [], []
    for batch in batches:
        z, y = forward(model, jax.tree.map(jnp.asarray, batch))
        zs.append(np.asarray(z).reshape(-1, z.shape[-1]))
        ys.append(np.asarray(y).reshape(-1))
    if not zs:
        raise ConfigError("tempering needs at least one batch")
    return np.concatenate(zs), np.concatenate(ys)


WHEN = ("always", "worse_than_uniform")


def mean_loss(logits_NxC: np.ndarray, labels_N: np.ndarray, alpha: float = 1.0) -> float:
    """The mean cross-entropy of alpha * logits (float64)."""
    z = alpha * np.asarray(logits_NxC, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-np.take_along_axis(log_p, np.asarray(labels_N)[:, None], axis=-1).mean())


def temper(
    model: nnx.Module, task, batches: Iterable[dict], *, example_input=None, when: str = "always"
) -> float:
    """Rescales `model`'s output layer in place (see the module docstring); returns alpha.

    Args:
      model: a concrete model holding predicted parameters.
      task: "image" (classification; batches hold "image" and "label") or "text"
        (next-token prediction; batches hold "tokens"), or a `ghn.tasks.Task`.
      batches: a few training batches (dicts with "image"/"label" or "tokens").
      example_input: what to trace the model with; default: the first batch's input.
      when: "always" fits alpha for every prediction; "worse_than_uniform" only for
        one whose loss on `batches` is above the uniform guess's, ln C (a prediction
        worse than knowing nothing), and leaves every other untouched (alpha = 1):
        in-distribution predictions keep the confidence that makes them fine-tune
        fast, confidently wrong ones start no worse than chance.
    """
    if when not in WHEN:
        raise ConfigError(f"when must be one of {WHEN}, got {when!r}")
    batches = list(batches)
    if isinstance(task, str):
        if task not in ("image", "text"):
            raise ConfigError(f"task must be 'image' or 'text', got {task!r}")
        task = Task(task)
    kind = task.kind
    if example_input is None:
        if not batches:
            raise ConfigError("tempering needs at least one batch")
        b = batches[0]
        example_input = (
            jax.ShapeDtypeStruct(b["tokens"][:, :-1].shape, jnp.int32)
            if kind == "text"
            else jax.ShapeDtypeStruct(b["image"].shape, jnp.float32)
        )
    graph = trace(model, example_input)
    paths = set(output_scale_paths(graph))
    logits_NxC, labels_N = _logits_and_labels(model, task, batches)
    if when == "worse_than_uniform":
        if mean_loss(logits_NxC, labels_N) <= uniform_loss(logits_NxC.shape[-1]):
            return 1.0
    alpha = fit_scale(logits_NxC, labels_N)
    # `graph.params` lists the parameters in `nnx.state` flattening order.
    leaves, treedef = jax.tree_util.tree_flatten(nnx.state(model, nnx.Param))
    leaves = [
        v * jnp.asarray(alpha, v.dtype) if path in paths else v
        for path, v in zip(graph.params, leaves, strict=True)
    ]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))
    return alpha


def uniform_loss(num_classes: int) -> float:
    """The loss of alpha = 0: ln C."""
    return math.log(num_classes)
