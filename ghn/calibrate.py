"""Tempering a predicted model's output so its first loss is never worse than chance
(`temper`) or than the random init the user already has (`safeguard`).

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

The bar a user cares about is the initialization they already have, not the
uniform guess: GPT-2's random init (tied embeddings at std 0.02) predicts the
current byte slightly and starts ~0.15 nats below ln 256. `safeguard` holds a
prediction to that bar: untouched when its loss on the batches is at most the
reference init's; else tempered; and when even the tempered loss is above the
reference's, blended toward the reference, theta = b * tempered + (1 - b) *
reference with b on a grid in [0, 1] (b = 0 is the reference itself, so the
loss on those batches never exceeds the reference's).

The rescaled parameters are found on the model's graph: an output layer with
its own weights (an untied head: kernel and bias) is scaled directly; a head
that reuses another layer's weights (GPT-2's tied embedding) is reached
through the normalization layer that feeds it, whose scale and bias are
scaled instead (LN(x) = g * x_hat + b, so logits = E @ (alpha * LN(x))).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ghn.errors import ConfigError
from ghn.graph import Graph, trace
from ghn.graph.graph import norm_like
from ghn.params import COMBINE, in_repeated_block, with_random_blocks
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


@functools.cache
def _forward(task: Task):
    # One jitted function per task, so `keep_blocks`, `safeguard` and `temper` share its
    # compiled programs (one per parameter tree and batch shape).
    return nnx.jit(lambda m, b: task.logits_and_labels(m, b))


def _logits_and_labels(model, task: Task, batches, forward=None) -> tuple[np.ndarray, np.ndarray]:
    forward = forward or _forward(task)
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


def _default_input(task: Task, batches: list):
    if not batches:
        raise ConfigError("tempering needs at least one batch")
    b = batches[0]
    if task.kind == "text":
        return jax.ShapeDtypeStruct(b["tokens"][:, :-1].shape, jnp.int32)
    return jax.ShapeDtypeStruct(b["image"].shape, jnp.float32)


def _task(task) -> Task:
    if isinstance(task, str):
        if task not in ("image", "text"):
            raise ConfigError(f"task must be 'image' or 'text', got {task!r}")
        return Task(task)
    return task


def params_of(model: nnx.Module) -> nnx.State:
    """A snapshot of `model`'s parameters. `nnx.state` returns the model's own Variables,
    which a later `nnx.update` of the model overwrites; this holds the values."""
    return jax.tree.map(lambda v: v, nnx.state(model, nnx.Param))


def _scale_outputs(model: nnx.Module, example_input, alpha: float) -> None:
    graph = trace(model, example_input)
    paths = set(output_scale_paths(graph))
    # `graph.params` lists the parameters in `nnx.state` flattening order.
    leaves, treedef = jax.tree_util.tree_flatten(nnx.state(model, nnx.Param))
    leaves = [
        v * jnp.asarray(alpha, v.dtype) if path in paths else v
        for path, v in zip(graph.params, leaves, strict=True)
    ]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))


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
    batches, task = list(batches), _task(task)
    if example_input is None:
        example_input = _default_input(task, batches)
    logits_NxC, labels_N = _logits_and_labels(model, task, batches)
    if when == "worse_than_uniform":
        if mean_loss(logits_NxC, labels_N) <= uniform_loss(logits_NxC.shape[-1]):
            return 1.0
    alpha = fit_scale(logits_NxC, labels_N)
    _scale_outputs(model, example_input, alpha)
    return alpha


# The blend weights `safeguard` tries (b = 0: the reference init itself).
BLEND_GRID = tuple(np.linspace(0.0, 1.0, 9))


def safeguard(
    model: nnx.Module,
    reference: nnx.Module,
    task,
    batches: Iterable[dict],
    *,
    example_input=None,
    reference_loss: float | None = None,
) -> tuple[float, float]:
    """Holds `model` (a prediction) to `reference`'s loss on `batches`, in place.

    `reference` is the initialization the user would otherwise start from (the
    architecture's random init), with the same parameter tree. Returns (alpha, b):
    alpha the output layer's temperature factor (1: untouched), b the weight of the
    tempered prediction in the blend with the reference (1: no blend). See the module
    docstring; the loss on `batches` after this is at most the reference's.
    `reference_loss`: `reference`'s loss on `batches` where the caller measured it.
    """
    batches, task = list(batches), _task(task)
    if example_input is None:
        example_input = _default_input(task, batches)
    forward = _forward(task)  # one program for every model of this tree and shapes
    logits_NxC, labels_N = _logits_and_labels(model, task, batches, forward)
    bar = reference_loss
    if bar is None:
        bar = mean_loss(*_logits_and_labels(reference, task, batches, forward))
    if mean_loss(logits_NxC, labels_N) <= bar:
        return 1.0, 1.0
    alpha = fit_scale(logits_NxC, labels_N)
    _scale_outputs(model, example_input, alpha)
    tempered_loss = mean_loss(logits_NxC, labels_N, alpha)
    if tempered_loss <= bar:
        return alpha, 1.0
    tempered = params_of(model)
    ref = params_of(reference)

    def blend(b):
        return jax.tree.map(lambda p, r: (b * p + (1.0 - b) * r).astype(p.dtype), tempered, ref)

    # The grid's ends are the two models already measured: b = 0 the reference itself,
    # b = 1 the tempered prediction.
    known = {0.0: bar, 1.0: tempered_loss}
    losses = []
    for b in map(float, BLEND_GRID):
        if b in known:
            losses.append(known[b])
            continue
        nnx.update(model, blend(b))
        losses.append(mean_loss(*_logits_and_labels(model, task, batches, forward)))
    b = float(BLEND_GRID[int(np.argmin(losses))])
    nnx.update(model, blend(b))
    return alpha, b


# Predicted blocks are kept when they earn at least this share of the prediction's gain
# over the reference init on the batches (`keep_blocks`).
BLOCKS_SHARE = 0.5
# How much of the reference init `prepare` adds to every predicted matrix, predicted +
# mix * reference (`ghn.params.add_random`). By default the full reference: with it a
# prediction that starts ahead but fine-tunes slower falls behind within the probe's
# steps, so the probe hands back the reference (RESULTS.md, "The random init off for the
# GHN's own families": a custom ViT-like model led by 0.11 after N/10 steps without it
# and ended 0.11 behind). MIX_IN_FAMILY for a prediction of an architecture family the
# GHN trained on, at a trained width: it fine-tunes as well or better with nothing
# added, and starts far lower. A widened prediction (`ghn.zoo.widen`) keeps MIX: its
# copied units get identical gradients and stay copies unless something tells them apart.
MIX = 1.0
MIX_IN_FAMILY = 0.0
COMBINE_DEFAULT = "add"
BLOCKS = ("auto", "predicted", "random")
TEMPER_MODES = ("auto", "always", "never")


def keep_blocks(
    model: nnx.Module, reference: nnx.Module, task, batches: Iterable[dict]
) -> tuple[bool, dict[str, float]]:
    """Whether `model`'s predicted blocks earn their place against `reference`'s.

    Compares on `batches` the loss of the whole prediction (L_pred), of the
    prediction with `reference`'s blocks (L_blocks: `ghn.params.with_random_blocks`)
    and of `reference` (L_ref). The blocks are kept when the prediction beats the
    reference and they carry at least `BLOCKS_SHARE` of that gain:
    L_blocks - L_pred >= BLOCKS_SHARE * (L_ref - L_pred). Measured on the shipped
    GHNs (RESULTS.md, "What in a prediction helps fine-tuning"): where the blocks
    carry little of the gain (GPT-2s: 4%) or the prediction is worse than the
    random init (wider than training), fine-tuning from the predicted blocks ends
    far behind fine-tuning from random ones under the same predicted stem and head;
    where they carry the gain (held-out ViTs), replacing them loses it. Returns
    (keep, {"pred": L_pred, "blocks": L_blocks, "ref": L_ref}); `model` is not changed.
    A model without repeated blocks keeps what it has: (True, {}).
    """
    pred = params_of(model)
    if not any(in_repeated_block(p) for p, _ in jax.tree_util.tree_leaves_with_path(pred)):
        return True, {}  # no repeated blocks: nothing to keep or replace
    batches, task = list(batches), _task(task)
    forward = _forward(task)
    ref = params_of(reference)
    losses = {"pred": mean_loss(*_logits_and_labels(model, task, batches, forward))}
    losses["ref"] = mean_loss(*_logits_and_labels(reference, task, batches, forward))
    nnx.update(model, with_random_blocks(pred, ref))
    losses["blocks"] = mean_loss(*_logits_and_labels(model, task, batches, forward))
    nnx.update(model, pred)
    gain = losses["ref"] - losses["pred"]
    keep = gain > 0.0 and losses["blocks"] - losses["pred"] >= BLOCKS_SHARE * gain
    return keep, losses


def check_preparation(
    blocks: str, mix: float, temper_mode: str, combine: str = COMBINE_DEFAULT
) -> None:
    """The error for an unknown `prepare` setting (checked before any work)."""
    if blocks not in BLOCKS:
        raise ConfigError(f"blocks must be one of {BLOCKS}, got {blocks!r}")
    if temper_mode not in TEMPER_MODES:
        raise ConfigError(f"temper_mode must be one of {TEMPER_MODES}, got {temper_mode!r}")
    if combine not in COMBINE:
        raise ConfigError(f"combine must be one of {tuple(COMBINE)}, got {combine!r}")
    if combine == "blend" and not 0.0 <= mix <= 1.0:
        raise ConfigError(f"mix must be in [0, 1] to blend, got {mix}")
    if not mix >= 0.0:
        raise ConfigError(f"mix must be >= 0, got {mix}")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What `prepare` did: blocks kept, mix weight and rule, output factor, blend weight,
    and what the fine-tuning probe chose ("prediction" or "random") on which losses."""

    blocks: str  # "predicted" or "random"
    mix: float
    combine: str = COMBINE_DEFAULT
    alpha: float = 1.0
    blend: float = 1.0
    losses: dict[str, float] = dataclasses.field(default_factory=dict)
    choice: str = "prediction"
    probe: dict[str, float] = dataclasses.field(default_factory=dict)


# A fine-tuning probe (`prepare`): fine-tunes a copy of the model from the given
# parameters for a few steps of the user's recipe and returns its loss on training
# batches it did not train on, one per batch (or one number) (`ghn.evaluate.make_probe`).
Probe = Callable[[nnx.State], "float | Sequence[float]"]


def probe_choice(prediction, random) -> tuple[str, dict[str, float]]:
    """ "prediction" when its probe losses are below the random init's by more than the
    standard error of the per-batch differences (paired: both scored on the same
    batches), else "random"; and {"prediction", "random": the mean losses, "stderr"}.

    A lead within the noise of the probe is no evidence for the prediction, and the
    random init is the user's baseline: ties, unclear wins and a NaN prediction go to
    it. Measured (RESULTS.md, "A fine-tuning probe"): a prediction whose lead after the
    probe is small tends to lose it by the end of fine-tuning. With one number per
    init the standard error is 0: strictly lower wins."""
    p = np.atleast_1d(np.asarray(prediction, np.float64))
    r = np.atleast_1d(np.asarray(random, np.float64))
    if p.shape != r.shape:
        raise ConfigError(f"the probe scored {p.size} and {r.size} batches for the two inits")
    d = r - p  # > 0: the prediction is ahead on that batch
    stderr = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
    scores = {"prediction": float(p.mean()), "random": float(r.mean()), "stderr": stderr}
    return ("prediction" if d.mean() > stderr else "random"), scores


def prepare(
    model: nnx.Module,
    reference: nnx.Module,
    task,
    batches: Iterable[dict],
    *,
    blocks: str = "auto",
    mix: float = MIX,
    temper_mode: str = "auto",
    combine: str = COMBINE_DEFAULT,
    example_input=None,
    probe: Probe | None = None,
) -> Prepared:
    """Turns a prediction in `model` into the init to fine-tune from, in place.

    `reference` is the random init the user would otherwise start from (same
    parameter tree); `batches` a few training batches. In order:
    1. blocks: "auto" keeps the predicted blocks only when `keep_blocks` says they
       earn their place, else takes `reference`'s; "predicted" / "random" force it;
    2. mix (default `MIX` = 1): every predicted matrix is combined with the
       reference's (vectors stay predicted). combine="add" (the default): predicted +
       mix * reference (`ghn.params.add_random`): with mix = 1 the random init keeps its
       full scale in every direction and the prediction's directions sit on top;
       combine="blend": sqrt(1 - mix^2) * predicted + mix * reference
       (`ghn.params.mix_with_random`), the variance-keeping blend. Pass
       `MIX_IN_FAMILY` (0) for a prediction of a family the GHN trained on, not
       widened (`ghn.evaluate.Policy` does): measured (RESULTS.md), the shipped GHNs'
       predictions of their own families fine-tune as well or better without it;
    3. temper_mode: "auto" holds the result to `reference`'s loss (`safeguard`),
       "always" tempers its output layer (`temper`), "never" leaves it;
    4. probe (optional, e.g. `ghn.evaluate.make_probe`): the prepared prediction and
       `reference` are each fine-tuned for the probe's few steps and scored on training
       batches neither trained on; unless the prediction scores lower by more than
       the noise of that comparison (`probe_choice`), `model` gets `reference`'s
       parameters (choice "random").
       Steps 1-3 judge the init at step 0, which cannot tell a prediction that
       fine-tunes slowly: measured (RESULTS.md, "A fine-tuning probe"), on GPT-2s
       wider than training the prepared prediction starts 2 nats below random init
       and is overtaken by it within the first tenth of fine-tuning, for good, while
       on held-out targets it stays ahead throughout.
    """
    check_preparation(blocks, mix, temper_mode, combine)
    batches, task = list(batches), _task(task)
    losses: dict[str, float] = {}
    keep = blocks == "predicted"
    if blocks == "auto":
        keep, losses = keep_blocks(model, reference, task, batches)
    ref = params_of(reference)
    state = params_of(model)
    if mix:
        state = COMBINE[combine](state, ref, mix)
    nnx.update(model, state if keep else with_random_blocks(state, ref))
    alpha, b = 1.0, 1.0
    if temper_mode == "auto":
        alpha, b = safeguard(
            model,
            reference,
            task,
            batches,
            example_input=example_input,
            reference_loss=losses.get("ref"),
        )
    elif temper_mode == "always":
        alpha = temper(model, task, batches, example_input=example_input)
    choice, scores = "prediction", {}
    if probe is not None and b > 0.0:  # b = 0: the model already is the reference
        choice, scores = probe_choice(probe(params_of(model)), probe(ref))
        if choice == "random":
            nnx.update(model, ref)
    kept = "predicted" if keep else "random"
    return Prepared(kept, mix, combine, alpha, b, losses, choice, scores)


def uniform_loss(num_classes: int) -> float:
    """The loss of alpha = 0: ln C."""
    return math.log(num_classes)
