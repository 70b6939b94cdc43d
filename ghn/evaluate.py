"""Init quality: predicted against random parameters, with no training and after fine-tuning.

    from ghn import evaluate
    setup = evaluate.Setup.from_ghn_info(info)            # the data the GHN was trained on
    result = evaluate.compare(hyper, spec, setup, evaluate.Recipe(steps=200))
    evaluate.plot(result, "vit.png")

Every initialization of a target is fine-tuned with the same recipe, the same
data order and the same seeds, so curves differ only by where they start.
Evaluation points are 0, N/20, 2N/20, ..., N (N/10 and N among them;
`Recipe.num_points` sets the 20). The
speed-up is how many steps random init needs to reach the evaluation loss the
predicted init (or a baseline, e.g. `compare(..., baselines=["mimetic"])`) has
at N/10, divided by N/10 ("not reached" when it never does within N steps).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ghn import calibrate, zoo
from ghn.baselines import baseline_init, check_baseline
from ghn.errors import ConfigError, GHNError
from ghn.hub import train_config_of
from ghn.hypernet.predict import prepare
from ghn.params import count_params
from ghn.tasks import Task, eval_batches, load_datasets, task_fields, task_of, train_iterator
from ghn.zoo import ArchSpec, widen
from ghn.zoo.pools import Pools, candidates_of, pools_of


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How every initialization is fine-tuned: AdamW, warm-up then cosine, clipping."""

    steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_steps: int = 10
    grad_clip: float = 1.0
    batch_size: int = 64
    seed: int = 0
    eval_batch_size: int = 250
    eval_batches: int = 4  # 0: the whole validation split
    num_points: int = 20  # evaluations after step 0: at N/num_points, 2N/num_points, ..., N

    def __post_init__(self):
        if self.steps < 0 or self.num_points < 1 or self.batch_size < 1:
            raise ConfigError(
                f"Recipe needs steps >= 0, num_points >= 1 and batch_size >= 1, got {self}"
            )


@dataclasses.dataclass
class Setup:
    """The data: a task, its training split and validation split."""

    task: Task
    train: Any
    validation: Any

    @classmethod
    def from_name(
        cls,
        name: str,
        *,
        seq_len: int = 0,
        train_split: str = "train",
        eval_split: str = "validation",
        **kwargs: Any,
    ) -> Setup:
        """A registered dataset (`ghn.data.list_datasets()`); `kwargs` as in
        `ghn.tasks.dataset_kwargs` (tokenizer, data_dir, ...)."""
        task, train, validation = load_datasets(
            name, train_split=train_split, eval_split=eval_split, seq_len=seq_len, **kwargs
        )
        return cls(task, train, validation)

    @classmethod
    def from_datasets(cls, train, validation, *, seq_len: int = 0) -> Setup:
        """Your own data: two `ghn.data` datasets (e.g. `ghn.data.ImageDataset(...)` or
        `ghn.data.split_images(...)`); text needs `seq_len`."""
        if train.kind != validation.kind:
            raise ConfigError(f"train is {train.kind} data but validation is {validation.kind}")
        return cls(task_of(train, seq_len), train, validation)

    @classmethod
    def from_ghn_info(
        cls, info: dict[str, Any], data: str | None = None, *, seq_len: int = 0, **kwargs: Any
    ) -> Setup:
        """The dataset a GHN was trained on, from `ghn.hub.info` / `load(with_info=True)`,
        or the registered dataset `data` read as the GHN read its own: text in windows of
        its training `seq_len` (unless given) with its tokenizer, so its targets keep
        their shapes on data it never saw (e.g. `digits28` for a GHN of MNIST-5k,
        `python_source` for one of `pydoc_text`)."""
        train_config = train_config_of(info)
        if not train_config:
            if data:
                return cls.from_name(data, seq_len=seq_len, **kwargs)
            raise ConfigError(
                "this GHN records no training config; name the dataset instead (eval.py: --data)"
            )
        d = train_config["data"]
        extra = {k: d[k] for k in ("data_dir", "tokenizer_dir") if d.get(k)}
        if data:
            extra.pop("data_dir", None)  # where its own data lived
        return cls.from_name(
            data or d["name"],
            seq_len=seq_len or d.get("seq_len", 0),
            tokenizer=d.get("tokenizer", "byte"),
            **{**extra, **kwargs},
        )

    def fit(self, spec: ArchSpec) -> ArchSpec:
        """`spec` with the fields the data fixes set: classes, image size and channels,
        vocabulary, and a text model's context length (= the sequence length, as in
        meta-training, so no position embedding goes unused)."""
        fields = task_fields(self.task, self.train)
        changes = {k: v for k, v in fields.items() if k in spec.field_names()}
        if self.task.kind == "text" and "context_length" in spec.field_names():
            changes["context_length"] = self.task.seq_len
        changes = {k: v for k, v in changes.items() if getattr(spec, k) != v}
        return spec.replace(**changes) if changes else spec

    def input_spec(self, spec: ArchSpec) -> jax.ShapeDtypeStruct:
        return self.task.input_spec(spec)

    def train_iterator(self, recipe: Recipe):
        """The same batches, in the same order, for every init fine-tuned with `recipe`."""
        return train_iterator(self.train, self.task, batch_size=recipe.batch_size, seed=recipe.seed)

    def eval_batches(self, recipe: Recipe) -> list[dict[str, np.ndarray]]:
        """The validation batches every evaluation point uses (the last one padded)."""
        return eval_batches(
            self.validation,
            self.task,
            batch_size=recipe.eval_batch_size,
            max_batches=recipe.eval_batches,
        )


def training_pools(info: dict[str, Any]) -> Pools:
    """The training, held-out and larger architectures of a GHN's own training run."""
    tc = train_config_of(info)
    if not tc:
        raise ConfigError(
            "this GHN records no training config, so it has no held-out or larger "
            "architectures; name the architectures instead (e.g. --archs vit-ti:depth=4)"
        )
    return pools_of(tc)


def resolve_archs(text: str, info: dict[str, Any], setup: Setup) -> list[ArchSpec]:
    """The targets `text` names (`ghn.zoo.parse_archs` syntax, plus `heldout` and
    `larger`: those of the GHN's own training run), fitted to the data."""
    pools: list[Pools] = []

    def group(name: str):
        def specs():
            if not pools:
                try:
                    pools.append(training_pools(info))
                except ConfigError as e:
                    raise ConfigError(f"{name!r}: {e}") from e
            return getattr(pools[0], name)

        return specs

    specs = zoo.parse_archs(text, {"heldout": group("heldout"), "larger": group("larger")})
    return [setup.fit(s) for s in specs]


@dataclasses.dataclass
class Curve:
    """One initialization's fine-tuning run."""

    init: str
    eval_steps: list[int]
    eval_loss: list[float]
    eval_metric: list[float]
    train_loss: list[float]  # one per step
    seconds: float = 0.0

    def at(self, step: int) -> dict[str, float]:
        i = self.eval_steps.index(step)
        return {"loss": self.eval_loss[i], "metric": self.eval_metric[i]}


def eval_points(steps: int, num_points: int = 20) -> list[int]:
    """0, N/num_points, ..., N: always holding 0, N/10 and N."""
    pts = {0, steps, tenth(steps)}
    pts.update(round(steps * i / num_points) for i in range(num_points + 1))
    return sorted(pts)


def tenth(steps: int) -> int:
    return max(round(steps / 10), 1) if steps else 0


def _schedule(recipe: Recipe) -> Callable:
    warmup = min(recipe.warmup_steps, recipe.steps)
    if warmup == 0:
        return optax.cosine_decay_schedule(recipe.lr, max(recipe.steps, 1))
    return optax.warmup_cosine_decay_schedule(
        0.0, recipe.lr, warmup, max(recipe.steps, warmup + 1), end_value=0.0
    )


@functools.lru_cache(maxsize=8)
def _programs(graphdef, task: Task, recipe: Recipe) -> tuple[Any, Callable, Callable]:
    """`recipe`'s optimizer and the jitted train and eval steps for one model structure.

    Cached, so every init of a target, and the probe of each, share one compilation
    (a GraphDef compares by structure, whatever the parameter values)."""
    tx = optax.chain(
        optax.clip_by_global_norm(recipe.grad_clip) if recipe.grad_clip > 0 else optax.identity(),
        optax.adamw(_schedule(recipe), weight_decay=recipe.weight_decay),
    )

    @jax.jit
    def train_step(params, rest, opt_state, batch):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest, copy=True)  # BatchStats set at this trace level
            m.train()
            sums = task.sums(m, batch)
            return sums["loss_sum"] / sums["count"], nnx.split(m, nnx.Param, ...)[2]

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_rest, opt_state, loss

    @functools.partial(jax.jit, static_argnums=3)
    def eval_step(params, rest, batch, batch_stats: bool):
        m = nnx.merge(graphdef, params, rest)
        m.train() if batch_stats else m.eval()
        return task.sums(m, batch)

    return tx, train_step, eval_step


def has_batch_stats(model: nnx.Module) -> bool:
    """Whether `model` has BatchNorm statistics: such models are read with batch
    statistics (`finetune`, `make_probe`)."""
    return bool(jax.tree.leaves(nnx.state(model, nnx.BatchStat)))


def _mean(eval_step, params, rest, batches, batch_stats: bool) -> tuple[float, float]:
    """Mean loss and mean metric over `batches` (sums over every example, then divided)."""
    tot = {"loss_sum": 0.0, "metric_sum": 0.0, "count": 0.0}
    for batch in batches:
        out = eval_step(params, rest, batch, batch_stats)
        for k in tot:
            tot[k] += float(out[k])
    return tot["loss_sum"] / tot["count"], tot["metric_sum"] / tot["count"]


def finetune(
    model: nnx.Module,
    setup: Setup,
    recipe: Recipe,
    *,
    init: str,
    progress: bool = False,
    eval_data: list[dict[str, np.ndarray]] | None = None,
) -> Curve:
    """Fine-tunes `model` in place for `recipe.steps` steps; evaluates at `eval_points`.

    Models with BatchNorm (CNNs) are read with batch statistics at every evaluation
    point, as during meta-training: a predicted init has no running averages, and
    with momentum 0.99 they lag fine-tuning by ~100 steps whatever the init, so at
    N/10 they measured mostly their defaults (measured on `cnn-mnist`'s held-out cell
    networks: validation loss 3.7-28 at step 3 in evaluation mode, below 1.8 with
    batch statistics). Both inits are read the same way.
    """
    task = setup.task
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    has_bn = has_batch_stats(model)
    tx, train_step, eval_step = _programs(graphdef, task, recipe)
    opt_state = tx.init(params)

    eval_data = eval_data if eval_data is not None else setup.eval_batches(recipe)

    def evaluate(params, rest) -> tuple[float, float]:
        loss, metric = _mean(eval_step, params, rest, eval_data, has_bn)
        return loss, task.summarize(loss, metric)[task.metric]

    points = eval_points(recipe.steps, recipe.num_points)
    curve = Curve(init, [], [], [], [])
    it = setup.train_iterator(recipe)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=recipe.steps, desc=init, leave=False, disable=None)
    start = time.perf_counter()
    for step in range(recipe.steps + 1):
        if step in points:
            loss, metric = evaluate(params, rest)
            curve.eval_steps.append(step)
            curve.eval_loss.append(loss)
            curve.eval_metric.append(metric)
        if step == recipe.steps:
            break
        batch = next(it)
        params, rest, opt_state, loss = train_step(params, rest, opt_state, batch)
        curve.train_loss.append(float(loss))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{curve.train_loss[-1]:.3f}")
    if bar is not None:
        bar.close()
    curve.seconds = time.perf_counter() - start
    nnx.update(model, params, rest)
    return curve


# Training batches after the probe's steps on which its candidates are scored.
PROBE_BATCHES = 8


def make_probe(
    model: nnx.Module,
    setup: Setup,
    recipe: Recipe,
    steps: int,
    *,
    score_batches: int = PROBE_BATCHES,
) -> calibrate.Probe:
    """A fine-tuning probe for `ghn.calibrate.prepare`, on training data only.

    `probe(params)` fine-tunes `model`'s structure (its other state, e.g. BatchNorm
    statistics, as `model` holds it now) from `params` for the first `steps` steps of
    `recipe`, with its batches, order and learning-rate schedule (so the probe is the
    start of the run it decides), and returns the loss on each of the `score_batches`
    training batches that follow. Every candidate is scored on the same batches, so
    their difference is not blurred by which batches were drawn, and its noise is the
    spread of the per-batch differences (`ghn.calibrate.probe_choice`); the
    validation split is never read.
    """
    if not 1 <= steps <= max(recipe.steps, 1) or score_batches < 1:
        raise ConfigError(
            f"a probe needs 1 <= steps <= the recipe's {recipe.steps} and score_batches >= 1, "
            f"got steps={steps}, score_batches={score_batches}"
        )
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    rest = jax.tree.map(jnp.copy, rest)
    tx, train_step, eval_step = _programs(graphdef, setup.task, recipe)
    # BatchNorm: after a probe's few steps the running averages (momentum 0.99) are
    # still mostly the layer's defaults, whatever the init, so both candidates are
    # scored with batch statistics, as `finetune` reads a model with BatchNorm.
    batch_stats = has_batch_stats(model)

    def probe(params) -> list[float]:
        it = setup.train_iterator(recipe)
        p, r, opt_state = params, rest, tx.init(params)
        for _ in range(steps):
            p, r, opt_state, _ = train_step(p, r, opt_state, next(it))
        scores = [_mean(eval_step, p, r, [next(it)], batch_stats) for _ in range(score_batches)]
        return [loss for loss, _ in scores]

    return probe


def speedup(predicted: Curve, random: Curve) -> float | None:
    """Steps random init needs to reach predicted's eval loss at N/10, over N/10; None: never."""
    n10 = tenth(predicted.eval_steps[-1])
    target = predicted.at(n10)["loss"]
    steps, losses = random.eval_steps, random.eval_loss
    for i, (s, loss) in enumerate(zip(steps, losses, strict=True)):
        if loss <= target:
            if i == 0:
                return 0.0
            # Linear interpolation between the evaluation points around the crossing.
            s0, l0 = steps[i - 1], losses[i - 1]
            reached = s0 + (s - s0) * (l0 - target) / max(l0 - loss, 1e-12)
            return reached / n10
    return None


@dataclasses.dataclass
class Result:
    """All initializations of one target architecture."""

    spec: ArchSpec
    num_params: int
    metric: str
    curves: dict[str, Curve]
    predicted_params: Any = None  # nnx.State of the prepared prediction (before fine-tuning)
    # Per predicted init: what `ghn.calibrate.prepare` did to it (blocks, mix and how it
    # combined, output factor, blend weight).
    prepared: dict[str, calibrate.Prepared] = dataclasses.field(default_factory=dict)
    # The narrower spec predicted and widened (`predict_model`), when the target was too wide.
    widened_from: ArchSpec | None = None

    def rows(self) -> list[dict[str, Any]]:
        """One table row per initialization: metrics at 0, N/10 and N, and the speed-up."""
        steps = self.curves["random"].eval_steps[-1]
        out = []
        for init, curve in self.curves.items():
            row: dict[str, Any] = {
                "arch": self.spec.name,
                "num_params": self.num_params,
                "init": init,
                "steps": steps,
            }
            for label, s in (("0", 0), ("n10", tenth(steps)), ("n", steps)):
                at = curve.at(s)
                row[f"loss_{label}"] = at["loss"]
                row[f"{self.metric}_{label}"] = at["metric"]
            row["speedup"] = None if init == "random" else speedup(curve, self.curves["random"])
            row["reached"] = init == "random" or row["speedup"] is not None
            if init in self.prepared and self.widened_from is not None:
                row["widened_from"] = self.widened_from.name
            if init in self.prepared:
                p = self.prepared[init]
                row["blocks"], row["mix"], row["output_scale"] = p.blocks, p.mix, p.alpha
                row["combine"] = p.combine
                if p.losses:  # what `keep_blocks` measured on the training batches
                    row["blocks_losses"] = {k: round(v, 4) for k, v in p.losses.items()}
                if p.blend < 1.0:
                    row["blend"] = p.blend
                if p.probe:
                    row["choice"] = p.choice
                    row["probe_losses"] = {k: round(v, 4) for k, v in p.probe.items()}
            out.append(row)
        return out


def _trained_specs(info: dict[str, Any]) -> tuple[ArchSpec, ...] | None:
    """Every architecture a GHN's training could visit (its pool, or every one its stream
    could draw); None when it records no training config."""
    tc = train_config_of(info)
    return tuple(candidates_of(tc)) if tc else None


def trained_widths(info: dict[str, Any]) -> frozenset[tuple[int, int]] | None:
    """The (width, heads) pairs of the ViTs and GPT-2s a GHN trained on, from
    `load(..., with_info=True)`; None when it records no training config."""
    specs = _trained_specs(info)
    if specs is None:
        return None
    return frozenset((s.width, s.num_heads) for s in specs if isinstance(s, widen.FAMILIES))


def trained_families(info: dict[str, Any]) -> frozenset[type] | None:
    """The architecture families (spec types, e.g. `ghn.zoo.ViTSpec`) a GHN trained on, from
    `load(..., with_info=True)`; None when it records no training config."""
    specs = _trained_specs(info)
    return None if specs is None else frozenset(type(s) for s in specs)


def predict_model(
    hyper,
    spec: ArchSpec,
    setup: Setup,
    seed: int = 0,
    *,
    widths: Collection[tuple[int, int]] | None = None,
) -> tuple[nnx.Module, Any]:
    """A concrete `spec` model holding `hyper`'s prediction, and the predicted state.

    With `widths` (`trained_widths(info)`), a ViT or GPT-2 wider than every width the
    GHN trained on is predicted at the widest trained width it is an integer widening
    of and widened to `spec`, computing the same function (`ghn.zoo.widen`): the
    decoder has no trained parameters for wider indices. `widened_from(spec, widths)`
    names that narrower spec.
    """
    model = spec.build(rngs=nnx.Rngs(seed))
    source = widened_from(spec, widths)
    if source is None:
        predicted = hyper.predict(model, setup.input_spec(spec))
    else:
        narrow = nnx.eval_shape(lambda: source.build(rngs=nnx.Rngs(seed)))
        predicted = widen.widen(hyper.predict(narrow, setup.input_spec(source)), source, spec)
    nnx.update(model, predicted)
    return model, predicted


def widened_from(spec: ArchSpec, widths: Collection[tuple[int, int]] | None) -> ArchSpec | None:
    """The narrower spec `predict_model` predicts for `spec` and widens, or None."""
    return widen.narrower(spec, widths) if widths else None


# Training batches a prediction is prepared on (`ghn.calibrate.prepare`).
TEMPER_BATCHES = 4


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a prediction becomes the init fine-tuned from (`ghn.calibrate.prepare`)."""

    blocks: str = "auto"
    # The random init added to every predicted matrix: a weight, or "auto": none for a
    # target of a family the GHN trained on, predicted at its own width
    # (`calibrate.MIX_IN_FAMILY`), else the full random init (`calibrate.MIX`: other
    # architectures, where it lets the probe see a prediction that fine-tunes slowly, and
    # widened predictions, whose copied units it tells apart).
    mix: float | str = "auto"
    temper_mode: str = "auto"
    combine: str = calibrate.COMBINE_DEFAULT
    # Steps of the fine-tuning probe (`make_probe`): -1 the recipe's N/10, 0 none.
    probe_steps: int = -1

    def __post_init__(self):
        if isinstance(self.mix, str) and self.mix != "auto":
            raise ConfigError(f'mix must be a number or "auto", got {self.mix!r}')
        for in_family in (False, True):
            mix = self.mix_for(in_family)
            calibrate.check_preparation(self.blocks, mix, self.temper_mode, self.combine)
        if self.probe_steps < -1:
            raise ConfigError(f"probe_steps must be -1 (N/10), 0 (none) or more, got {self}")

    def mix_for(self, in_family: bool) -> float:
        """The mix weight for a prediction that is (not) of a family the GHN trained on,
        predicted at its own width (`in_family`)."""
        if self.mix == "auto":
            return calibrate.MIX_IN_FAMILY if in_family else calibrate.MIX
        return float(self.mix)

    def probe_length(self, recipe: Recipe) -> int:
        """The probe's steps under `recipe` (0: no probe), at most the recipe's N."""
        steps = tenth(recipe.steps) if self.probe_steps < 0 else self.probe_steps
        return min(steps, recipe.steps)


# The prediction as the GHN made it: no block choice, no mix, no tempering, no probe.
RAW = Policy(blocks="predicted", mix=0.0, temper_mode="never", probe_steps=0)


def prepare_prediction(
    model: nnx.Module,
    spec: ArchSpec,
    setup: Setup,
    recipe: Recipe,
    policy: Policy,
    *,
    widths: Collection[tuple[int, int]] | None = None,
    families: Collection[type] | None = None,
) -> calibrate.Prepared:
    """`ghn.calibrate.prepare` on the first training batches of `recipe`'s order, against
    the random init of `recipe.seed`, with the probe `policy` asks for (`make_probe`).
    `widths`: those `predict_model` was given; `families`: the spec types the GHN trained
    on (`trained_families`). Together they set `policy`'s "auto" mix (`Policy.mix_for`)."""
    in_family = type(spec) in (families or ()) and widened_from(spec, widths) is None
    it = setup.train_iterator(recipe)
    batches = [next(it) for _ in range(TEMPER_BATCHES)]
    reference = spec.build(rngs=nnx.Rngs(recipe.seed))
    steps = policy.probe_length(recipe)
    probe = make_probe(reference, setup, recipe, steps) if steps else None
    return calibrate.prepare(
        model,
        reference,
        setup.task,
        batches,
        blocks=policy.blocks,
        mix=policy.mix_for(in_family),
        temper_mode=policy.temper_mode,
        combine=policy.combine,
        example_input=setup.input_spec(spec),
        probe=probe,
    )


def compare(
    hyper,
    spec: ArchSpec,
    setup: Setup,
    recipe: Recipe,
    *,
    policy: Policy = Policy(),
    variants: dict[str, Policy] | None = None,
    baseline_ghns: dict[str, Any] | None = None,
    baselines: Sequence[str] = (),
    widths: Collection[tuple[int, int]] | None = None,
    families: Collection[type] | None = None,
    progress: bool = False,
) -> Result:
    """Fine-tunes `spec` from `hyper`'s prediction and from the family's random init.

    All runs share the recipe, data order and seeds; the random init is
    `spec.build(rngs=nnx.Rngs(recipe.seed))`, and predicted inits start from the
    same model with every parameter replaced, then prepared by `policy`
    (`prepare_prediction`: blocks kept or taken from the random init, combined with
    it, held to its loss, then the fine-tuning probe: the default `Policy()`). A
    prediction for which the probe chose the random init is not fine-tuned again:
    its curve is the random init's run (same init, data order and seed). `variants` adds the same
    prediction prepared otherwise, by label (e.g. {"raw": RAW}, the prediction as
    the GHN made it). `baseline_ghns` adds other GHNs' predictions by label (e.g. a
    GHN with another decoder), prepared by `policy`. Each name in `baselines`
    (`ghn.baselines.BASELINES`, e.g. "mimetic") adds that closed-form init, built
    from the same random init with the same seed. `widths` (`trained_widths(info)`):
    a target wider than them is predicted narrower and widened (`predict_model`).
    `families` (`trained_families(info)`): with `widths`, what sets `policy`'s "auto" mix
    (`prepare_prediction`).
    """
    spec = setup.fit(spec)
    for name in baselines:
        check_baseline(name, spec)  # before any fine-tuning
    eval_data = setup.eval_batches(recipe)
    curves: dict[str, Curve | None] = {}
    prepared: dict[str, calibrate.Prepared] = {}
    model, predicted = predict_model(hyper, spec, setup, recipe.seed, widths=widths)
    narrow = widened_from(spec, widths)
    raw = jax.tree.map(jnp.copy, predicted)
    inits = [("predicted", hyper, policy), *((k, None, p) for k, p in (variants or {}).items())]
    inits += [(k, other, policy) for k, other in (baseline_ghns or {}).items()]
    kept = None
    for name, source, how in inits:
        if source is hyper:
            pass  # the model already holds the prediction
        elif source is None:
            model = spec.build(rngs=nnx.Rngs(recipe.seed))
            nnx.update(model, jax.tree.map(jnp.copy, raw))
        else:
            model, _ = predict_model(source, spec, setup, recipe.seed, widths=widths)
        prepared[name] = prepare_prediction(
            model, spec, setup, recipe, how, widths=widths, families=families
        )
        if kept is None:
            kept = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
        if prepared[name].choice == "random":
            curves[name] = None  # the random init itself: its run below is this one's
            continue
        curves[name] = finetune(
            model, setup, recipe, init=name, progress=progress, eval_data=eval_data
        )
    for name in baselines:
        model = spec.build(rngs=nnx.Rngs(recipe.seed))
        nnx.update(model, baseline_init(name, model, spec, seed=recipe.seed))
        curves[name] = finetune(
            model, setup, recipe, init=name, progress=progress, eval_data=eval_data
        )
    model = spec.build(rngs=nnx.Rngs(recipe.seed))
    num_params = count_params(model)
    curves["random"] = finetune(
        model, setup, recipe, init="random", progress=progress, eval_data=eval_data
    )
    for name, curve in curves.items():
        if curve is None:  # the same init, data order and seed: the same run
            curves[name] = dataclasses.replace(curves["random"], init=name)
    return Result(spec, num_params, setup.task.metric, curves, kept, prepared, narrow)


def check_fits(
    hyper,
    spec: ArchSpec,
    setup: Setup,
    label: str = "the",
    *,
    widths: Collection[tuple[int, int]] | None = None,
) -> None:
    """`ConfigError` naming the parameter when `spec` (fitted to `setup`) does not fit `hyper`
    (the narrower spec it is predicted at, with `widths`: `predict_model`).

    `prepare` holds the one check; calling it here costs a trace, which the
    prediction that follows reuses from its cache.
    """
    spec = widened_from(spec, widths) or spec
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    try:
        prepare(model, (setup.input_spec(spec),), hyper.config)
    except GHNError as e:  # too wide for the decoder, or untraceable
        raise ConfigError(f"{spec.name} does not fit {label} GHN: {e}") from e


def run(
    hyper,
    specs: Sequence[ArchSpec],
    setup: Setup,
    recipe: Recipe,
    workdir: str | os.PathLike,
    *,
    ghn_name: str = "",
    ghn_source: str | None = None,
    policy: Policy = Policy(),
    variants: dict[str, Policy] | None = None,
    baseline_ghns: dict[str, Any] | None = None,
    baselines: Sequence[str] = (),
    widths: Collection[tuple[int, int]] | None = None,
    families: Collection[type] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`compare` for every spec, writing what eval.py promises to `workdir`.

    results.json / results.md (rewritten after every target, so an interrupted
    run keeps what it finished), curves/<arch>.png, curves.json, and
    predicted/<arch>/ (Orbax) with predicted/<arch>.json (the spec).
    """
    for spec in specs:  # every target, before the first fine-tuning
        for name in baselines:
            check_baseline(name, setup.fit(spec))
    workdir = Path(workdir)
    (workdir / "curves").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}
    record: dict[str, Any] = {}
    start = time.perf_counter()
    metric = setup.task.metric
    for i, spec in enumerate(specs):
        print(f"[{i + 1}/{len(specs)}] {spec.name}", flush=True)
        result = compare(
            hyper,
            spec,
            setup,
            recipe,
            policy=policy,
            variants=variants,
            baseline_ghns=baseline_ghns,
            baselines=baselines,
            widths=widths,
            families=families,
            progress=progress,
        )
        rows += result.rows()
        curves[spec.name] = {k: vars(c) for k, c in result.curves.items()}
        plot(result, workdir / "curves" / f"{spec.name}.png")
        out = save_params(result.predicted_params, workdir / "predicted" / spec.name)
        (out.parent / f"{spec.name}.json").write_text(json.dumps(spec.to_json(), indent=2) + "\n")
        for r in result.rows():
            print("   ", format_row(r, metric), flush=True)
        record = {
            "ghn": ghn_name,
            "ghn_source": ghn_source,
            "data": setup.train.name,
            "metric": metric,
            "recipe": dataclasses.asdict(recipe),
            "policy": dataclasses.asdict(policy),
            "widen": widths is not None,
            "variants": {k: dataclasses.asdict(v) for k, v in (variants or {}).items()},
            "seconds": round(time.perf_counter() - start, 1),
            "rows": rows,
        }
        (workdir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
        (workdir / "curves.json").write_text(json.dumps(curves) + "\n")
        table = markdown_table(rows, metric)
        (workdir / "results.md").write_text(
            f"GHN `{ghn_name}` on {setup.train.name}, N = {recipe.steps} fine-tuning steps "
            f"(lr {recipe.lr}, batch {recipe.batch_size}, seed {recipe.seed})."
            + policy_note(policy)
            + "\n\n"
            + table
        )
    if rows:
        print(markdown_table(rows, metric))
    print(f"wrote {workdir}/results.json, results.md, curves/, predicted/")
    return record


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (a shorter window at the start)."""
    x = np.asarray(values, np.float64)
    if window <= 1 or len(x) == 0:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    n = np.minimum(np.arange(1, len(x) + 1), window)
    return (c[1:] - c[np.arange(1, len(x) + 1) - n]) / n


COLORS = {
    "predicted": "tab:blue",
    "random": "tab:gray",
    "transpose": "tab:orange",
    "view": "tab:purple",
    "mimetic": "tab:red",
    "raw": "tab:brown",
}
for _i, _a in enumerate((0.25, 0.5, 0.75)):
    COLORS[f"predicted+noise{_a:g}"] = ("tab:cyan", "tab:green", "tab:olive")[_i]


def plot(result: Result, path: str | os.PathLike | None = None, *, axes=None):
    """Loss curves of every init: validation loss and smoothed training loss. PNG if `path`."""
    import matplotlib

    if path is not None and axes is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = None
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    ax_eval, ax_train = axes
    steps = result.curves["random"].eval_steps[-1]
    for init, c in result.curves.items():
        color = COLORS.get(init)
        ax_eval.plot(c.eval_steps, c.eval_loss, marker="o", ms=3, label=init, color=color)
        window = max(steps // 25, 1)
        ax_train.plot(
            np.arange(1, len(c.train_loss) + 1),
            smooth(c.train_loss, window),
            label=init,
            color=color,
        )
    ax_eval.axvline(tenth(steps), color="k", lw=0.6, ls=":")
    for ax, title in ((ax_eval, "validation loss"), (ax_train, "training loss (smoothed)")):
        ax.set_xlabel("fine-tuning step")
        ax.set_title(f"{result.spec.name}: {title}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
    if path is not None:
        (fig or ax_eval.figure).savefig(path, dpi=110)
        if fig is not None:
            plt.close(fig)
    return fig


def format_value(v: Any, digits: int = 3) -> str:
    if v is None:
        return "not reached"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def policy_note(policy: Policy) -> str:
    """What the tables' labels mean for predictions prepared by `policy`."""
    note = (
        " Predicted inits are prepared on 4 training batches (`ghn.calibrate.prepare`):"
        f' blocks {policy.blocks} (shown as "random blocks" where the random init\'s'
        " were taken)"
    )
    if policy.mix == "auto":
        note += (
            ", the random init added to every predicted matrix"
            f' (predicted + {calibrate.MIX:g} x random, shown as "+ random") unless the'
            " target is of a family the GHN trained on, at a trained width"
        )
    elif policy.mix and policy.combine == "add":
        note += (
            ", the random init added to every predicted matrix"
            f" (predicted + {policy.mix:g} x random)"
        )
    elif policy.mix:
        note += f", every predicted matrix blended with the random init at a = {policy.mix:g}"
    if policy.temper_mode == "auto":
        note += (
            ", then held to the random init's loss there: output layer tempered (x alpha),"
            " blended toward the random init if that is not enough (blend b)"
        )
    elif policy.temper_mode == "always":
        note += ", then the output layer tempered (x alpha)"
    if policy.probe_steps:
        steps = "N/10" if policy.probe_steps < 0 else str(policy.probe_steps)
        note += (
            f"; then a fine-tuning probe: the prediction and the random init each fine-tuned"
            f" for the first {steps} steps and scored on the next {PROBE_BATCHES} training"
            " batches, the random init taken unless the prediction scores lower by more"
            ' than the standard error of the per-batch differences ("probe: random init")'
        )
    return note + "."


def init_label(row: dict[str, Any]) -> str:
    """The init's name, with what preparing it did: random blocks, the random init added
    ("+ random", "+ a random") or blended in ("mix a"), the tempering factor when it was
    scaled down, the blend weight toward the random init; or that the fine-tuning probe
    chose the random init instead ("probe: random init")."""
    scale, label = row.get("output_scale"), row["init"]
    if row.get("choice") == "random":
        return label + ", probe: random init"
    if row.get("widened_from"):
        label += f" (widened from {row['widened_from']})"
    if row.get("blocks") == "random":
        label += ", random blocks"
    if row.get("mix"):
        # Rows written before "combine" existed blended.
        if row.get("combine", "blend") == "add":
            label += ", + random" if row["mix"] == 1.0 else f", + {row['mix']:g} random"
        else:
            label += f", mix {row['mix']:g}"
    if scale is not None and scale < 1.0:
        label += f" x{scale:.2f}"
    if "blend" in row:
        label += f" blend {row['blend']:.3g}"
    return label


def format_row(row: dict[str, Any], metric: str) -> str:
    """One line: an init's loss and metric at 0, N/10, N, and its speed-up."""
    parts = [f"{init_label(row):>12}"]
    for label, name in (("0", "0"), ("n10", "N/10"), ("n", "N")):
        parts.append(
            f"@{name} loss {row[f'loss_{label}']:.3f} {metric} {row[f'{metric}_{label}']:.3f}"
        )
    if row["init"] != "random":
        v = row["speedup"]
        parts.append("speed-up " + ("not reached" if v is None else f"{v:.1f}x"))
    return " | ".join(parts)


def markdown_table(rows: list[dict[str, Any]], metric: str) -> str:
    """The rows as a Markdown table: loss and metric at 0, N/10, N, and the speed-up."""
    cols = ["arch", "num_params", "init"]
    for label in ("0", "n10", "n"):
        cols += [f"loss_{label}", f"{metric}_{label}"]
    cols.append("speedup")
    names = {"n10": "N/10", "n": "N", "0": "0"}

    def header(c: str) -> str:
        for label in ("n10", "n", "0"):
            if c.endswith("_" + label):
                return f"{c[: -len(label) - 1]} @{names[label]}"
        return {"num_params": "params"}.get(c, c)

    lines = ["| " + " | ".join(header(c) for c in cols) + " |"]
    lines.append("|" + "|".join("---" if c in ("arch", "init") else "---:" for c in cols) + "|")
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if c == "num_params":
                cells.append(f"{v:,}")
            elif c == "init":
                cells.append(init_label(r))
            elif c == "speedup":
                cells.append(
                    ""
                    if r["init"] == "random"
                    else (format_value(v, 1) + ("x" if v is not None else ""))
                )
            else:
                cells.append(format_value(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_params(params, directory: str | os.PathLike) -> Path:
    """An `nnx.State` of parameters as an Orbax checkpoint of a plain nested dict.

    Restorable with Orbax and Flax alone (no `ghn`)::

        state = nnx.state(model, nnx.Param)
        restored = ocp.StandardCheckpointer().restore(path, nnx.to_pure_dict(state))
        nnx.replace_by_pure_dict(state, restored)
        nnx.update(model, state)
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory, pure, force=True)
    return directory
