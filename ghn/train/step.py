"""The meta-training step as pure functions: what `Programs` compiles.

One step, for a meta-batch of m architectures on one data batch:

    for each architecture a:                        (meta_grads: meta_loss, or
                                                     bucketed_meta_loss for a bucket)
        params_a = GHN(graph_a)                                 predict every weight
        loss_a   = task_loss(target_a(params_a), batch)         + wd * sum ||W||
        grads   += (1/m) * d loss_a / d GHN                     (accumulate)
    GHN <- AdamW(clip(grads)), schedule(step), EMA;             (apply_update)
    a non-finite loss or gradient leaves the state unchanged.

`Programs` (programs.py) only compiles, shards and caches these.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ghn.hypernet import bucketed as hb
from ghn.hypernet.predict import Plan, predict_leaves
from ghn.tasks import Task
from ghn.zoo import bucketed as zb


def schedule_hparams(
    *, lr: float, warmup_steps: int, end_lr_ratio: float, num_steps: int
) -> dict[str, float]:
    """The numbers `learning_rate` reads; runtime inputs of the update program."""
    return {
        "lr": float(lr),
        "warmup": float(min(warmup_steps, num_steps)),
        "num_steps": float(num_steps),
        "end": float(lr * end_lr_ratio),
    }


def learning_rate(count, h) -> jax.Array:
    """Linear warm-up to `lr`, then cosine to `end` at `num_steps`.

    Indexed by the number of updates applied so far; update k uses the rate of
    step k + 1, so the first update already moves (warm-up from lr / warmup).
    """
    step = jnp.asarray(count, jnp.float32) + 1.0
    warmup = jnp.asarray(h["warmup"], jnp.float32)
    warm = h["lr"] * step / jnp.maximum(warmup, 1.0)
    span = jnp.maximum(h["num_steps"] - warmup, 1.0)
    progress = jnp.clip((step - warmup) / span, 0.0, 1.0)
    cosine = h["end"] + (h["lr"] - h["end"]) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(step <= warmup, warm, cosine)


def make_schedule(**hparams: Any) -> Callable[[jax.Array], jax.Array]:
    """`learning_rate` as a function of the update count (`schedule_hparams`' arguments)."""
    h = schedule_hparams(**hparams)
    return lambda count: learning_rate(count, h)


def make_optimizer(
    *, grad_clip: float, b1: float, b2: float, weight_decay: float
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW's direction: Adam plus decoupled weight decay.

    `apply_update` multiplies by -learning_rate itself, with the schedule's
    numbers as runtime inputs, so one compiled update serves any schedule or
    run length (and is AdamW exactly).
    """
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts += [optax.scale_by_adam(b1=b1, b2=b2), optax.add_decayed_weights(weight_decay)]
    return optax.chain(*parts)


@dataclasses.dataclass(frozen=True, eq=False)
class Target:
    """A target architecture as the step sees it (static under `jit`).

    `plan` says how the GHN decodes its parameters (flat-state order),
    `treedef` rebuilds the parameter state from them, and `graphdef` plus
    `rest` (abstract non-parameter state, e.g. BatchNorm statistics) the model.
    """

    plan: Plan
    treedef: Any
    graphdef: Any
    rest: Any


def target_sums(target: Target, task: Task, leaves, batch, bf16: bool = False):
    """The task's masked loss/metric sums of the target holding parameters `leaves`."""
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    if bf16:
        # The decoder ran in float32; only the target's forward is bfloat16.
        leaves = [x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x for x in leaves]
    params = jax.tree_util.tree_unflatten(target.treedef, leaves)
    # BatchNorm statistics: the forward runs in training mode, reading batch
    # statistics, so these placeholders only absorb the running-average update.
    rest = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), target.rest)
    model = nnx.merge(target.graphdef, params, rest)
    return task.sums(model, batch, dtype)


def predict(ghn_graphdef, ghn_params, graph, target: Target) -> list[jax.Array]:
    """The target's parameters (flat-state order) predicted by the GHN from its graph."""
    return predict_leaves(nnx.merge(ghn_graphdef, ghn_params), graph, target.plan)


def meta_loss(
    ghn_params,
    graph,
    batch,
    *,
    ghn_graphdef,
    target: Target,
    task: Task,
    pred_weight_decay: float,
    bf16: bool = False,
):
    """Task loss of the predicted parameters + `pred_weight_decay` * sum of their L2 norms."""
    leaves = predict(ghn_graphdef, ghn_params, graph, target)
    # safe_norm: a zero parameter has gradient 0, not NaN.
    reg = sum(optax.safe_norm(x.astype(jnp.float32), 0.0) for x in leaves)
    sums = target_sums(target, task, leaves, batch, bf16)
    task_loss = sums["loss_sum"] / sums["count"]
    aux = {"task_loss": task_loss, "metric": sums["metric_sum"] / sums["count"], "reg": reg}
    return task_loss + pred_weight_decay * reg, aux


def padded_sums(plan: hb.BucketPlan, task: Task, params, target, batch, dtype) -> dict:
    """The task's loss/metric sums of a bucket's padded parameters (`target`: the
    architecture's `ghn.zoo.bucketed.arch_arrays`)."""

    def model(x):
        return zb.forward(plan.bucket, params, target, x, dtype=dtype)

    return task.sums(model, batch, dtype)


def bucketed_sums(ghn, inputs, batch, *, plan: hb.BucketPlan, task: Task, bf16: bool = False):
    """One architecture of a bucket (`inputs`, not stacked): its padded predicted
    parameters and the task's masked loss/metric sums with them."""
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    params = hb.predict_padded(ghn, plan, inputs)
    return params, padded_sums(plan, task, params, inputs.target, batch, dtype)


def bucketed_meta_loss(
    ghn_params,
    inputs_M,
    batch,
    *,
    ghn_graphdef,
    plan: hb.BucketPlan,
    task: Task,
    pred_weight_decay: float,
    bf16: bool = False,
):
    """`meta_loss` averaged over a meta-batch of architectures of one bucket.

    `inputs_M` is a stack of `ghn.hypernet.bucketed.ArchInputs` (leading axis M);
    each architecture's parameters are predicted and run at the bucket's padded
    shapes (padding holds exact zeros, so the regularizer and the loss are those of
    the real architecture), all in one program. Prediction has no depth-dependent
    control flow, so it is vmapped; the target forward is a `lax.map` over the
    architectures, so each runs only its own blocks (`ghn.zoo.bucketed._blocks`;
    under `vmap` every architecture would run the bucket's deepest). Measured on 2
    CPU cores, target forward + backward (m = 2 GPT-2s of width 128 in a 12-block
    bucket, per meta-batch): vmap 0.92-0.94 s whatever their depth; map 0.89 s (12
    blocks), 0.57 s (6), 0.41 s (3), 0.36 s (1). Vmapping the prediction instead of
    mapping it too: a small ViT bucket's step 0.080 s instead of 0.091 s, and its
    program compiles in 12 s instead of 17 s.
    """
    ghn = nnx.merge(ghn_graphdef, ghn_params)
    dtype = jnp.bfloat16 if bf16 else jnp.float32

    def reg_of(params):
        # One norm per real parameter, as `meta_loss`: a stacked leaf holds one per block.
        top = {k: v for k, v in params.items() if k != "blocks"}
        reg = sum(optax.safe_norm(x, 0.0) for x in jax.tree.leaves(top))
        return reg + sum(
            jnp.sum(optax.safe_norm(x.reshape(x.shape[0], -1), 0.0, axis=1))
            for x in jax.tree.leaves(params.get("blocks", {}))
        )

    def sums_of(params_and_target):
        return padded_sums(plan, task, *params_and_target, batch, dtype)

    params_M = jax.vmap(lambda inputs: hb.predict_padded(ghn, plan, inputs))(inputs_M)
    reg_M = jax.vmap(reg_of)(params_M)
    sums_M = jax.lax.map(sums_of, (params_M, inputs_M.target))
    task_M = sums_M["loss_sum"] / sums_M["count"]
    metric_M = sums_M["metric_sum"] / sums_M["count"]
    loss_M = task_M + pred_weight_decay * reg_M
    aux = {"task_loss": jnp.mean(task_M), "metric": jnp.mean(metric_M), "reg": jnp.mean(reg_M)}
    return jnp.mean(loss_M), aux


def meta_grads(ghn_params, graph, batch, *, loss_fn=meta_loss, **kwargs) -> dict[str, Any]:
    """The loss, its parts and the GHN's gradients (`loss_fn`: `meta_loss` for one
    architecture, `bucketed_meta_loss` for a bucket's meta-batch; its kwargs)."""
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        ghn_params, graph, batch, **kwargs
    )
    return {"grads": grads, "loss": loss, **aux}


def zeros_like_grads(abstract_params) -> dict[str, Any]:
    """An empty accumulator for `accumulate`."""
    grads = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract_params)
    return {
        "grads": grads,
        **{k: jnp.zeros((), jnp.float32) for k in ("loss", "task_loss", "metric", "reg")},
    }


def accumulate(acc, new, weight):
    """acc + weight * new, leaf by leaf (the meta-batch mean when weight = 1/m)."""
    return jax.tree.map(lambda a, n: a + weight * n.astype(a.dtype), acc, new)


def apply_update(
    state,
    acc,
    inject_nan,
    hparams,
    *,
    tx: optax.GradientTransformation,
    ema_decay: float,
):
    """One optimizer step from the accumulated gradients; a non-finite step changes nothing
    but the step and skipped counters. Returns the new state and the step's metrics."""
    grads, loss = acc["grads"], acc["loss"]
    # Tests corrupt a step on purpose (config.debug.nan_step).
    poison = jnp.where(inject_nan, jnp.nan, 1.0)
    grads = jax.tree.map(lambda g: g * poison.astype(g.dtype), grads)
    loss = loss * poison
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Skipped steps do not advance the schedule.
    lr = learning_rate(state["step"] - state["skipped"], hparams)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = jax.tree.map(lambda p, u: p - (lr * u).astype(p.dtype), state["params"], updates)

    def keep_if_finite(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    out = {
        "params": keep_if_finite(params, state["params"]),
        "opt": keep_if_finite(opt, state["opt"]),
        "step": state["step"] + 1,
        "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        "rng": jax.random.key_data(
            jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        ),
    }
    if "ema" in state:
        d = ema_decay
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], out["params"])
        out["ema"] = keep_if_finite(ema, state["ema"])
    metrics = {
        "loss": loss,
        "task_loss": acc["task_loss"],
        "metric": acc["metric"],
        "pred_norm": acc["reg"],
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(out["params"]),
        "lr": lr,
        "finite": finite,
    }
    return out, metrics
