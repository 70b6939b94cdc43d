"""Meta-training runs in-process on tiny ViTs: records, compilation counting, NaN handling,
sharding, bf16/EMA, text and CNN tasks, and checkpoint errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train_common import (
    assert_close_grads,
    assert_first_update_close,
    env,
    meta_grad_reduction,
    tiny_config,
)
from tolerances import assert_close

from ghn.checkpoint import Checkpointer
from ghn.train import CheckpointError, NonFiniteError, Trainer, read_metrics, run
from ghn.train.distributed import make_mesh
from ghn.zoo.pools import pools_of


def params_of(trainer: Trainer, key: str = "params") -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(trainer.state[key])[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


@pytest.mark.parametrize("bucketed", [True, False])
def test_run_writes_records_and_compiles_each_architecture_once(tmp_path, bucketed):
    config = tiny_config({"num_steps": 4, "eval.enabled": True, "archs.bucketed": bucketed})
    summary = run(config, tmp_path)
    assert summary["step"] == 4 and summary["skipped"] == 0
    # One training architecture visited 8 times (meta-batch 2): one train program, the
    # bucket's (both architectures of a step in it) or the architecture's own.
    assert summary["traces"]["bucket_train" if bucketed else "train"] == 1
    assert summary["traces"].get("train" if bucketed else "bucket_train", 0) == 0
    assert summary["traces"]["update"] == 1
    # One held-out architecture: its own program, or its bucket's where it fits one.
    assert summary["traces"].get("eval", 0) + summary["traces"].get("bucket_eval", 0) == 1
    assert summary["arch_compilations"] == 2

    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["archs"]["meta_batch_size"] == 2
    versions = json.loads((tmp_path / "versions.json").read_text())
    for key in ("python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ghn"):
        assert versions[key], key
    assert versions["device_count"] == 8 and versions["process_count"] == 1

    records = read_metrics(tmp_path)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "accuracy", "grad_norm", "lr", "archs_per_s", "samples_per_s"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert train[-1]["compilations"] >= 2 and train[-1]["skipped"] == 0
    evals = [r for r in records if r["split"] == "eval" and r["arch"] != "mean"]
    assert len(evals) == 1 and evals[0]["set"] == "heldout" and 0 <= evals[0]["accuracy"] <= 1
    assert (tmp_path / "checkpoints" / "4").is_dir()


def test_nan_step_is_skipped_reported_and_leaves_the_state_alone(tmp_path):
    config = tiny_config({"num_steps": 3, "debug.nan_step": 1})
    config.checkpoint.every, config.checkpoint.max_to_keep = 1, 3
    summary = run(config, tmp_path)
    assert summary["skipped"] == 1
    records = read_metrics(tmp_path)
    events = [r for r in records if r.get("event") == "nonfinite"]
    assert len(events) == 1 and events[0]["step"] == 1 and events[0]["action"] == "skip"
    assert [r["skipped"] for r in records if "skipped" in r] == [0, 1, 1]
    # Step 1 (the second) was skipped: the states saved after steps 0 and 1 differ only
    # in the step and skipped counters and the RNG.
    after0, after1, after2 = (checkpoint_state(tmp_path, s) for s in (1, 2, 3))
    for key in ("params", "opt", "ema"):
        # The skipped step selects the old values (jnp.where): a copy, so bitwise.
        chex.assert_trees_all_equal(after0[key], after1[key])
    assert int(after1["skipped"]) == 1 and int(after1["step"]) == 2
    chex.assert_tree_all_finite(after2["params"])
    assert not np.array_equal(after2["params"]["decoder"]["w2"], after1["params"]["decoder"]["w2"])


def checkpoint_state(workdir, step: int):
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def test_nan_stops_the_run_when_asked_and_keeps_the_last_checkpoint(tmp_path):
    config = tiny_config({"num_steps": 6, "debug.nan_step": 3, "nonfinite": "stop"})
    config.checkpoint.every = 2
    with pytest.raises(NonFiniteError, match="step 3.*checkpoint \\(step 2\\) is intact"):
        run(config, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2]
    config.debug.nan_step = -1  # the saved state is good: the run resumes from it
    trainer = Trainer(config, tmp_path)
    try:
        assert trainer.step == 2
        chex.assert_tree_all_finite(trainer.state["params"])
    finally:
        trainer.close()


def test_incompatible_or_corrupt_checkpoints_are_clear_errors(tmp_path):
    run(tiny_config({"num_steps": 1}), tmp_path)
    other = tiny_config({"num_steps": 2, "ghn.num_layers": 2})
    with pytest.raises(CheckpointError, match="num_layers: checkpoint 1, config 2"):
        Trainer(other, tmp_path)
    no_ema = tiny_config({"num_steps": 2, "ema_decay": 0.0})
    with pytest.raises(CheckpointError, match="layout"):
        Trainer(no_ema, tmp_path)
    other_data = tiny_config({"num_steps": 2, "data.batch_size": 32})
    with pytest.raises(CheckpointError, match="other data"):
        Trainer(other_data, tmp_path)

    # A checkpoint recorded before `embedding_scale` existed was trained with "init".
    read_meta = Checkpointer.read_meta

    def recorded_before(self, step):
        meta = read_meta(self, step)
        ghn_config = {k: v for k, v in meta["ghn_config"].items() if k != "embedding_scale"}
        return {**meta, "ghn_config": ghn_config}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpointer, "read_meta", recorded_before)
        fan_in = "embedding_scale: checkpoint 'init', config 'fan_in'"
        with pytest.raises(CheckpointError, match=fan_in):
            Trainer(tiny_config({"num_steps": 2}), tmp_path)
        Trainer(tiny_config({"num_steps": 2, "ghn.embedding_scale": "init"}), tmp_path).close()

    for path in (tmp_path / "checkpoints" / "1" / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":  # the array data files
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(tiny_config({"num_steps": 2}), tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "1" / "meta")
    with pytest.raises(CheckpointError, match="unreadable"):
        Trainer(tiny_config({"num_steps": 2}), tmp_path)


def one_step(tmp_path, mesh_data: int, fsdp: bool = False, **changes):
    """(accumulated gradients, params after the update, trainer) of step 0."""
    config = tiny_config({"num_steps": 1, "mesh.data": mesh_data, "mesh.fsdp": fsdp, **changes})
    config.checkpoint.enabled = False
    trainer = Trainer(config, tmp_path)
    try:
        _, acc, _ = trainer.step_once(0)
        grads = {k: np.asarray(v) for k, v in flat(acc["grads"]).items()}
        return grads, params_of(trainer), trainer
    finally:
        trainer.close()


def flat(tree) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_sharded_step_equals_single_device_step(tmp_path):
    grads1, params1, _ = one_step(tmp_path / "one", 1)
    grads8, params8, trainer = one_step(tmp_path / "eight", 8, fsdp=True)
    assert trainer.programs.data_sharding.mesh.shape["data"] == 8
    # FSDP really shards: the decoder's largest kernels live in 8 pieces.
    big = [x for x in jax.tree.leaves(trainer.state["params"]) if x.size >= 1024]
    assert any(len({str(s.index) for s in x.addressable_shards}) == 8 for x in big)
    assert grads1.keys() == grads8.keys() == params1.keys() == params8.keys()
    # Batch reductions split 8 ways and FSDP-partitioned matmuls sum in another order:
    # float32 round-off only, along the whole meta-gradient (meta_grad_reduction).
    config = tiny_config({"num_steps": 1})
    n = meta_grad_reduction(config)
    assert_close_grads(grads8, grads1, reduction=n)
    # Adam's first step (num_steps=1: at the peak rate) is a function of sign(g), except
    # where g is round-off-sized: first_update_bounds derives how far that lets it move.
    assert_first_update_close(params8, params1, grads8, grads1, config, reduction=n)


def test_mesh_rejects_more_devices_than_exist():
    with pytest.raises(ValueError, match="devices"):
        make_mesh(16)


def test_a_broader_pool_adds_no_training_programs(tmp_path):
    # Six ViTs of one bucket (depth 1-2, width 16-32), two per step: the bucket's program
    # for two architectures is the only training program, whatever the pool holds.
    changes = {
        "num_steps": 6,
        "archs.pool_size": 6,
        "archs.ranges.depth": (1, 2),
        "archs.bucketed": True,
        "checkpoint.enabled": False,
    }
    config = tiny_config(changes)
    pool = set(pools_of(config).train)
    assert len(pool) >= 4, pool  # several distinct architectures really are visited
    summary = run(config, tmp_path)
    assert summary["traces"].get("train", 0) == 0
    assert summary["traces"]["bucket_train"] == 1
    assert summary["arch_compilations"] == 1


def test_bucketed_step_has_the_per_architecture_losses(tmp_path):
    changes = {"num_steps": 1, "archs.pool_size": 3, "archs.ranges.depth": (1, 2)}
    changes["checkpoint.enabled"] = False
    out = {}
    for bucketed in (True, False):
        trainer = Trainer(
            tiny_config({**changes, "archs.bucketed": bucketed}), tmp_path / str(bucketed)
        )
        try:
            _, acc, _ = trainer.step_once(0)
            out[bucketed] = {
                k: float(np.asarray(acc[k].addressable_data(0))) for k in acc if k != "grads"
            }
        finally:
            trainer.close()
    n = meta_grad_reduction(tiny_config(changes))
    for k, want in out[False].items():
        assert_close(np.asarray(out[True][k]), np.asarray(want), reduction=n, err_msg=k)


@pytest.mark.slow
def test_bucketed_meta_gradient_is_the_per_architecture_one_in_float64():
    # float32 cannot decide this: round-off flips the GHN decoder's ReLUs that sit at
    # ~0, and the two programs' meta-gradients differ by 1e-5..1e-4 of their norm
    # (tests/float64_gap.py). In float64 only the float32 islands both programs share
    # remain (flax's embedding lookups: ~1e-7 of those tables' gradient norm); a
    # wrong mask, layout or scale moves the loss and gradients by >= 1e-3.
    proc = subprocess.run(
        [sys.executable, "float64_gap.py", "64"],
        cwd=Path(__file__).parent,
        env=env(1),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    gap = json.loads(proc.stdout.strip().splitlines()[-1])
    assert gap["dtype"] == "float64"
    assert gap["loss_rel"] < 1e-12, gap
    assert gap["grads_rel_without_embeddings"] < 1e-6, gap
    assert gap["embedding_grads_rel"] < 1e-5, gap


def test_stream_trains_fresh_architectures_with_one_program_per_bucket(tmp_path):
    changes = {
        "num_steps": 6,
        "archs.stream": True,
        "archs.buckets": 2,
        "archs.ranges.depth": (1, 2),
        "checkpoint.enabled": False,
        "eval.enabled": True,
    }
    config = tiny_config(changes)
    trainer = Trainer(config, tmp_path)
    try:
        assert len(trainer.groups) == 2
        held = set(trainer.pools.heldout)
        assert held
        summary = trainer.train()
        seen = trainer._seen
        # Held-out architectures of the stream's space are evaluated through a bucket's
        # program; it gives the per-architecture evaluation's sums.
        (spec,) = held
        assert trainer._eval_plan(spec) is not None
        batch = trainer._eval_batches[0]
        params = trainer.state["params"]
        got = trainer.programs.evaluate_bucket(trainer._eval_plan(spec), spec, params, batch)
        want = trainer.programs.evaluate(spec, params, batch)
    finally:
        trainer.close()
    assert len(seen) >= 4 and not seen & held  # fresh draws, never a held-out one
    # One program per bucket a step used (a step's architectures share a bucket).
    assert 1 <= summary["traces"]["bucket_train"] <= 2
    assert summary["traces"].get("train", 0) == 0
    assert summary["traces"]["bucket_eval"] == 1
    records = read_metrics(tmp_path)
    assert any(r["split"] == "eval" and r["arch"] == spec.name for r in records)
    assert [r for r in records if r["split"] == "train"][-1]["distinct_archs"] == len(seen)
    n = meta_grad_reduction(config)  # forward chain of the widest ViT, plus the GHN's
    for k in ("loss_sum", "count"):
        assert_close(np.asarray(got[k]), np.asarray(want[k]), reduction=n, err_msg=k)
    # Correct predictions: round-off may flip the argmax of a near-tied sample.
    assert abs(float(got["metric_sum"]) - float(want["metric_sum"])) <= 1.0


def test_stream_needs_a_listable_sampler(tmp_path):
    config = tiny_config({"archs.stream": True, "archs.sampler": "cnns-1k"})
    config.archs.ranges = type(config.archs.ranges)()
    with pytest.raises(ValueError, match="archs.stream"):
        Trainer(config, tmp_path)


def test_a_windowed_pool_visits_per_architecture_programs_a_window_at_a_time(tmp_path):
    changes = {"num_steps": 2, "archs.pool_size": 3, "archs.bucketed": False}
    config = tiny_config({**changes, "archs.window": 2, "archs.window_epochs": 2})
    config.checkpoint.enabled = False
    trainer = Trainer(config, tmp_path)
    try:
        pool = trainer.pools.train
        seen = [s for _ in range(4) for s in trainer.sampler.next()]  # 8 positions
        assert set(seen[:4]) == set(pool[:2]) and set(seen[4:6]) == {pool[2]}
        assert set(seen[6:]) == set(pool[:2])  # the next cycle
    finally:
        trainer.close()
    grouped = tiny_config({**changes, "archs.bucketed": True, "archs.buckets": 2})
    grouped.archs.window = 2
    with pytest.raises(ValueError, match="archs.window"):
        Trainer(grouped, tmp_path / "grouped")
