"""Meta-training a GHN: the loop, its evaluation, logging and checkpoints.

    trainer = Trainer(config, workdir)   # restores workdir/checkpoints if present
    summary = trainer.train()            # or: ghn.train.run(config, workdir)

Per step: the sampler gives m architectures; every one runs on the same data
batch; their weighted gradients accumulate in one buffer; one update applies
them. Metrics of step n are fetched after step n + 1 is dispatched, so the
host prepares the next step while the devices work.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from ghn.checkpoint import FORMAT, Checkpointer, CheckpointError, tree_digest
from ghn.errors import ConfigError
from ghn.hypernet import GHNConfig
from ghn.tasks import check_archs, eval_batches, load_datasets, train_iterator
from ghn.train import compile_cache
from ghn.train.archs import ArchSampler, GroupedSampler, StreamSampler, fingerprint
from ghn.train.config import dataset_kwargs, ghn_config, optimizer, validate
from ghn.train.distributed import all_processes_agree, barrier, local_array, make_mesh
from ghn.train.metrics import MetricWriter, versions, write_json
from ghn.train.programs import Programs
from ghn.zoo import bucketed as zb
from ghn.zoo.pools import candidates_of, pools_of
from ghn.zoo.samplers import sample
from ghn.zoo.spec import SpecError

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A step's loss or gradient was NaN/Inf and the config says to stop."""


class _Window:
    """Sums of per-step metrics between two log lines."""

    def __init__(self):
        self.start = time.perf_counter()
        self.steps = 0
        self.sums: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def add(self, metrics: dict[str, float]) -> None:
        self.steps += 1
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.last = metrics

    def mean(self, key: str) -> float:
        return self.sums.get(key, math.nan) / max(self.steps, 1)


class Trainer:
    """Sets up a run from a config (resuming from `workdir` when it holds a checkpoint)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path):
        validate(config)
        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.is_main = jax.process_index() == 0
        self.cache_dir = compile_cache.enable(config.compilation_cache_dir)
        self.mesh = make_mesh(config.mesh.data)
        self._check_batch_sizes()

        self.task, self.train_ds, self.eval_ds = load_datasets(
            config.data.name, **dataset_kwargs(config)
        )
        self.pools = pools_of(config)
        # What training can visit: the pool, or every architecture the stream can draw.
        self.candidates = self._candidates()
        check_archs(
            self.task,
            self.train_ds,
            [*self.candidates, *self.pools.heldout, *self.pools.larger],
        )
        self.ghn_config = ghn_config(config)
        tx, schedule = optimizer(config)
        self.programs = Programs(
            ghn_config=self.ghn_config,
            task=self.task,
            mesh=self.mesh,
            tx=tx,
            schedule=schedule,
            seed=config.seed,
            ema_decay=config.ema_decay,
            bf16=config.bf16,
            pred_weight_decay=config.optim.pred_weight_decay,
            fsdp=config.mesh.fsdp,
            fsdp_min_size=config.mesh.fsdp_min_size,
            nan_step=config.debug.nan_step,
            max_programs=config.program_cache_size,
        )
        self.train_it = train_iterator(
            self.train_ds,
            self.task,
            batch_size=config.data.batch_size,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        self.writer = MetricWriter(
            self.workdir, enabled=self.is_main, tensorboard=config.tensorboard
        )
        self.ckpt = None
        if config.checkpoint.enabled:
            self.ckpt = Checkpointer(
                self.workdir / "checkpoints",
                max_to_keep=config.checkpoint.max_to_keep,
                async_save=config.checkpoint.async_save,
            )
        # Fail now, not hours in: the evaluation architectures and the largest
        # training one must fit the GHN (e.g. its max_dim).
        largest = max(self.candidates, key=lambda s: s.num_params())
        for spec in [largest, *self.pools.heldout, *self.pools.larger]:
            self.programs.arch(spec)
        self.groups, self.plans = self._bucket_plans() if config.archs.bucketed else ([], {})
        self.sampler = self._sampler()
        self._seen: set = set()
        self._eval_plans: dict = {}
        self.state = self._restore_or_init()
        # Only once the workdir's checkpoint (if any) accepted this config.
        if self.is_main:
            write_json(self.workdir / "config.json", config.to_dict())
            write_json(self.workdir / "versions.json", versions())
        self.skipped = int(local_array(self.state["skipped"]))
        self._eval_batches: list | None = None
        self._signal: int | None = None
        self.last_eval: dict[str, Any] | None = None

    def _check_batch_sizes(self) -> None:
        n, p = self.mesh.size, jax.process_count()
        for key in ("data.batch_size", "eval.batch_size"):
            section, name = key.split(".")
            b = self.config[section][name]
            if b % n or b % p:
                raise ConfigError(
                    f"{key}={b} must be divisible by the {n} devices on the mesh "
                    f"and the {p} processes"
                )

    def _expected_meta(self) -> dict[str, Any]:
        return {
            "ghn_config": self.ghn_config.to_dict(),
            "state_tree": tree_digest(self.programs.abstract_state),
            "state_summary": sorted(self.programs.abstract_state),
        }

    def _restore_or_init(self):
        step = self.ckpt.latest_step() if self.ckpt else None
        if step is None:
            return self.programs.init_state()
        meta = self.ckpt.read_meta(step)
        if isinstance(meta.get("ghn_config"), dict):
            # As a GHN of that config reads it: fields added since get the value the
            # checkpoint was trained with (`GHNConfig.from_json`), not today's default.
            meta = {**meta, "ghn_config": GHNConfig.from_json(meta["ghn_config"]).to_dict()}
        self.ckpt.check_compatible(step, meta, self._expected_meta())
        try:
            self.train_it.restore(meta["data_iterator"])
            self.sampler.restore(meta["archs"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint {self.ckpt.directory / str(step)} was written with other data or "
                f"architecture settings: {e}. Resume with the original config, or start in a "
                "fresh workdir."
            ) from e
        state = self.ckpt.restore(step, self.programs.abstract_state, self.programs.state_shardings)
        self._say(f"resumed from {self.ckpt.directory / str(step)} (step {step})")
        return state

    def _say(self, message: str) -> None:
        """A line on the terminal (process 0), kept clear of the progress bar."""
        log.info(message)
        if self.is_main:
            from tqdm import tqdm

            tqdm.write(message)

    def _meta(self, step: int) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "step": step,
            "data_iterator": self.train_it.state(),
            "archs": self.sampler.state(),
            **self._expected_meta(),
        }

    def save(self, step: int, *, wait: bool = False) -> None:
        if self.ckpt is not None:
            self.ckpt.save(step, self.state, self._meta(step), wait=wait)

    @property
    def step(self) -> int:
        return int(local_array(self.state["step"]))

    def _fetch(self, step: int, metrics, specs) -> dict[str, float]:
        m = {k: float(local_array(v)) for k, v in metrics.items()}
        if not m.pop("finite"):
            self.skipped += 1
            names = [s.name for s in specs]
            self.writer.write(
                {
                    "step": step,
                    "split": "train",
                    "event": "nonfinite",
                    "loss": m["loss"],
                    "grad_norm": m["grad_norm"],
                    "archs": names,
                    "action": self.config.nonfinite,
                }
            )
            msg = (
                f"step {step}: non-finite loss {m['loss']} or gradient norm {m['grad_norm']} "
                f"(architectures {names})"
            )
            if self.config.nonfinite == "stop":
                last = self.ckpt.latest_step() if self.ckpt else None
                raise NonFiniteError(
                    f"{msg}; stopping. The last good checkpoint (step {last}) is intact."
                )
            log.warning("%s; update skipped (%d skipped so far)", msg, self.skipped)
            return {}
        return m

    def _log(self, step: int, window: _Window) -> dict[str, Any]:
        elapsed = time.perf_counter() - window.start
        steps = max(window.steps, 1)
        cfg = self.config
        stats = self.programs.stats
        record = {
            "step": step,
            "split": "train",
            # `loss` is the task loss; `objective` adds the predicted-parameter decay.
            **self.task.summarize(window.mean("task_loss"), window.mean("metric")),
            "objective": window.mean("loss"),
            "pred_norm": window.mean("pred_norm"),
            "grad_norm": window.mean("grad_norm"),
            "param_norm": window.last.get("param_norm", math.nan),
            "lr": window.last.get("lr", math.nan),
            "steps_per_s": steps / elapsed,
            "archs_per_s": steps * cfg.archs.meta_batch_size / elapsed,
            "samples_per_s": steps * cfg.data.batch_size / elapsed,
            "distinct_archs": len(self._seen),  # seen by this process
            "compilations": stats.total(),
            "arch_compilations": stats.arch_compilations(),
            "persistent_cache_hits": stats.persistent_hits,
            "evicted_programs": self.programs.evictions,
            "compile_s": stats.compile_s,
            "skipped": self.skipped,
        }
        self.writer.write(record)
        return record

    def evaluate(self, step: int) -> dict[str, Any]:
        """Loss and accuracy/perplexity of predicted parameters on the evaluation split."""
        cfg = self.config
        if self._eval_batches is None:
            local = eval_batches(
                self.eval_ds,
                self.task,
                batch_size=cfg.eval.batch_size,
                max_batches=cfg.eval.max_batches,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
            self._eval_batches = [self.programs.global_batch(b) for b in local]
        use_ema = cfg.eval.use_ema and "ema" in self.state
        params = self.state["ema"] if use_ema else self.state["params"]
        archs = [("heldout", s) for s in self.pools.heldout]
        archs += [("larger", s) for s in self.pools.larger]
        results = []
        for tag, spec in archs:
            totals = {"loss_sum": 0.0, "metric_sum": 0.0, "count": 0.0}
            plan = self._eval_plan(spec)
            for batch in self._eval_batches:
                if plan is None:
                    sums = self.programs.evaluate(spec, params, batch)
                else:
                    sums = self.programs.evaluate_bucket(plan, spec, params, batch)
                for k in totals:
                    totals[k] += float(local_array(sums[k]))
            n = max(totals["count"], 1.0)
            record = {
                "step": step,
                "split": "eval",
                "set": tag,
                "arch": spec.name,
                "num_params": self.programs.arch(spec).num_params,
                "ema": use_ema,
                **self.task.summarize(totals["loss_sum"] / n, totals["metric_sum"] / n),
            }
            self.writer.write(record)
            results.append(record)
        summary: dict[str, Any] = {"step": step, "archs": results}
        if results:
            keys = [k for k in ("loss", "accuracy", "perplexity") if k in results[0]]
            mean = {k: float(np.mean([r[k] for r in results])) for k in keys}
            self.writer.write({"step": step, "split": "eval", "arch": "mean", **mean})
            summary["mean"] = mean
        self.last_eval = summary
        return summary

    def _eval_plan(self, spec):
        """The training bucket plan that can evaluate `spec` (held-out architectures of a
        broad pool or the stream usually fit one), else None: its own program."""
        if spec not in self._eval_plans:
            self._eval_plans[spec] = None
            for plan in dict.fromkeys(self.plans.values()):
                if zb.supports(spec) and zb.fits(plan.bucket, spec):
                    try:
                        self.programs.bucket_arch_inputs(plan, spec)
                    except ConfigError:  # more graph nodes or wider slots than the plan
                        continue
                    self._eval_plans[spec] = plan
                    break
        return self._eval_plans[spec]

    NOT_SAVED = "checkpointing is disabled (checkpoint.enabled=False): nothing saved"

    @contextlib.contextmanager
    def _signals(self):
        """SIGTERM/SIGINT ask the loop to save and stop at the next step boundary."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            self._signal = signum
            plan = "saving a checkpoint" if self.ckpt is not None else self.NOT_SAVED
            log.warning("got %s: %s, then stopping", signal.Signals(signum).name, plan)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _candidates(self) -> tuple:
        if not self.config.archs.stream:
            return self.pools.train
        try:
            return candidates_of(self.config)
        except SpecError as e:
            raise ConfigError(f"archs.stream=True: {e}; use a pool (archs.stream=False)") from e

    def _bucket_plans(self) -> tuple[list, dict]:
        """(groups of training architectures, architecture -> its group's bucket plan).

        The bucketed families' candidates are cut into `archs.buckets` buckets per
        bucket key (`ghn.zoo.bucketed.partition`); the number of programs depends on
        these, not on the pool size. Other families keep per-architecture programs.
        """
        bucketable = [s for s in self.candidates if zb.supports(s)]
        groups = zb.partition(bucketable, self.config.archs.buckets)
        plans = {}
        for group in groups:
            plan = self.programs.bucket_plan(group)
            plans.update(dict.fromkeys(group, plan))
        return groups, plans

    def _sampler(self):
        archs, m, seed = self.config.archs, self.config.archs.meta_batch_size, self.config.seed
        index = {spec: g for g, group in enumerate(self.groups) for spec in group}
        if archs.stream:
            ranges = archs.ranges.to_dict()

            def draw(entropy):
                return sample(archs.sampler, 1, seed=entropy, **ranges)[0]

            return StreamSampler(
                draw,
                m,
                seed,
                exclude=self.pools.heldout,
                group_of=index.get,
                fingerprint=fingerprint(self.candidates + self.pools.heldout),
            )
        if len(self.groups) > 1 and all(s in index for s in self.pools.train):
            if archs.window:
                raise ConfigError(
                    "archs.window is for pools of per-architecture programs; this pool's "
                    f"{len(self.groups)} shape buckets already share programs: set archs.window=0"
                )
            pool = set(self.pools.train)
            return GroupedSampler([[s for s in g if s in pool] for g in self.groups], m, seed)
        window = dict(window=archs.window, window_epochs=archs.window_epochs)
        return ArchSampler(self.pools.train, m, seed, **window)

    def step_once(self, step: int):
        """One meta-training step: the next architectures on the next data batch, their
        gradients accumulated, one update. Returns (specs, accumulated gradients and
        losses, the update's metrics); metrics stay on the devices until fetched.

        Architectures of one bucket run together in that bucket's program; the others
        in their own per-architecture programs.
        """
        specs = self.sampler.next()
        self._seen.update(specs)
        batch = self.programs.global_batch(next(self.train_it))
        m = len(specs)
        acc = self.programs.zeros()
        by_plan: dict = {}
        for spec in specs:
            plan = self.plans.get(spec)
            if plan is None:
                weight = self.programs.weight(m)
                acc = self.programs.accumulate(spec, self.state["params"], acc, batch, weight)
            else:
                by_plan.setdefault(plan, []).append(spec)
        for plan, group in by_plan.items():
            weight = self.programs.weight(m, len(group))
            acc = self.programs.accumulate_bucket(
                plan, group, self.state["params"], acc, batch, weight
            )
        self.state, metrics = self.programs.update(self.state, acc, step)
        return specs, acc, metrics

    def train(self) -> dict[str, Any]:
        """Runs to `config.num_steps` (or a signal); returns a summary of the run."""
        cfg = self.config
        step = start = self.step
        pbar = None
        if self.is_main and cfg.progress_bar:
            from tqdm import tqdm

            pbar = tqdm(total=cfg.num_steps, initial=start, desc="meta-train", unit="step")
        window = _Window()
        pending = None
        last_log: dict[str, Any] = {}
        evaluated_at = None
        # The step whose checkpoint exists already (a resumed run's start), so a
        # stop right after a save does not write the same step twice.
        saved_at = start if self.ckpt is not None and self.ckpt.latest_step() == start else None
        stopped_by = None

        def drain():
            nonlocal pending
            if pending is not None:
                metrics = self._fetch(*pending)
                if metrics:
                    window.add(metrics)
                pending = None

        # Processes start at their own pace (imports, data, init); meet before the first
        # collective.
        barrier("train-start")
        with self._signals():
            try:
                while step < cfg.num_steps:
                    if all_processes_agree(self._signal is not None):
                        stopped_by = signal.Signals(self._signal or signal.SIGTERM).name
                        break
                    specs, _, metrics = self.step_once(step)
                    if cfg.debug.sleep_per_step:
                        time.sleep(cfg.debug.sleep_per_step)
                    drain()
                    pending = (step, metrics, specs)
                    step += 1
                    last_step = step == cfg.num_steps
                    if pbar is not None:
                        pbar.update(1)
                    if step % cfg.log_every == 0 or last_step:
                        drain()
                        last_log = self._log(step, window)
                        window = _Window()
                        if pbar is not None:
                            pbar.set_postfix(loss=f"{last_log['loss']:.4f}")
                    if cfg.eval.enabled and (
                        (cfg.eval.every and step % cfg.eval.every == 0) or last_step
                    ):
                        drain()
                        self.evaluate(step)
                        evaluated_at = step
                    if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                        drain()
                        self.save(step)
                        saved_at = step
                drain()
                if saved_at != step and (step > start or stopped_by):
                    self.save(step, wait=True)
                    saved_at = step
            finally:
                if pbar is not None:
                    pbar.close()
                if self.ckpt is not None:
                    self.ckpt.wait()
        if stopped_by:
            saved = "checkpoint saved" if self.ckpt is not None else self.NOT_SAVED
            self._say(f"stopped by {stopped_by} at step {step}; {saved}")
        return {
            "step": step,
            "start_step": start,
            "stopped_by": stopped_by,
            "last_log": last_log,
            "last_eval": self.last_eval if evaluated_at is not None else None,
            "compilations": self.programs.stats.total(),
            "arch_compilations": self.programs.stats.arch_compilations(),
            "traces": dict(self.programs.stats.traces),
            "persistent_cache_hits": self.programs.stats.persistent_hits,
            "skipped": self.skipped,
        }

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()
        self.writer.close()


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Meta-trains (or resumes) the run of `config` in `workdir`; returns its summary."""
    trainer = Trainer(config, workdir)
    try:
        return trainer.train()
    finally:
        trainer.close()
