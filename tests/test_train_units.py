"""Meta-training parts that need no compiled architecture: configs, sampler, schedule, shardings."""

import json
import math
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_train_common import CONFIGS, ROOT, env, load_config, tiny_config
from test_train_tasks import TINY_GHN, programs_for
from tolerances import assert_close

from ghn import zoo
from ghn.hypernet import GHN
from ghn.tasks import Task, check_archs, load_datasets
from ghn.train import ArchSampler, base_config, make_schedule, pools_of, step, validate
from ghn.train.archs import GroupedSampler, StreamSampler, fingerprint
from ghn.train.config import dataset_kwargs
from ghn.train.distributed import fsdp_sharding, initialize_distributed, make_mesh

CONFIG_NAMES = ["vit_mnist", "gpt2_text", "cnn_mnist", "vit_cifar10", "vit_cifar100"]
CONFIG_NAMES += ["gpt2_wikitext103"]


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_configs_are_complete_and_documented(name):
    config = load_config(name)
    validate(config)
    assert set(config.keys()) == set(base_config().keys())
    doc = (CONFIGS / f"{name}.py").read_text()
    assert f"python train.py --config configs/{name}.py" in doc
    assert "Hardware" in doc and "Time" in doc


@pytest.mark.parametrize("name", ["vit_mnist", "gpt2_text", "cnn_mnist"])
def test_offline_configs_fit_their_data(name):
    config = load_config(name)
    task, train, _ = load_datasets(config.data.name, **dataset_kwargs(config))
    pools = pools_of(config)
    check_archs(task, train, [*pools.train, *pools.heldout, *pools.larger])
    assert len(pools.train) == config.archs.pool_size
    assert not set(pools.heldout) & set(pools.train)
    biggest = max(s.closed_form_num_params() for s in pools.train)
    for spec in pools.larger:
        assert spec.closed_form_num_params() > biggest


def test_typo_in_an_override_is_an_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            f"--config={CONFIGS / 'vit_mnist.py'}",
            f"--workdir={tmp_path}",
            "--config.optim.lrr=0.1",
        ],
        env=env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "lrr" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_bad_values_are_clear_errors():
    config = tiny_config({"nonfinite": "ignore"})
    with pytest.raises(ValueError, match="nonfinite"):
        validate(config)
    config = tiny_config({"ghn.d_model": 30})
    with pytest.raises(ValueError, match="d_model"):
        validate(config)
    config = tiny_config({"archs.window": 4, "archs.stream": True})
    with pytest.raises(ValueError, match="archs.window"):
        validate(config)


def test_sampler_is_deterministic_and_resumes_exactly():
    pool = zoo.sample("vits-1k", 5, seed=0, depth=(2, 4), width=(32, 64))
    a = ArchSampler(pool, 3, seed=7)
    stream = [a.next() for _ in range(6)]  # 18 draws: spans 4 epochs of 5
    flat = [s for batch in stream for s in batch]
    for epoch in range(3):
        assert set(flat[5 * epoch : 5 * epoch + 5]) == set(pool)  # each epoch is a permutation
    b = ArchSampler(pool, 3, seed=7)
    for _ in range(2):
        b.next()
    c = ArchSampler(pool, 3, seed=7)
    c.restore(json.loads(json.dumps(b.state())))
    assert [c.next() for _ in range(4)] == stream[2:]


def test_windowed_sampler_visits_one_window_at_a_time_and_resumes_exactly():
    pool = zoo.sample("vits-1k", 7, seed=0, depth=(2, 4), width=(32, 64))
    a = ArchSampler(pool, 2, seed=3, window=3, window_epochs=2)
    flat = [s for _ in range(15) for s in a.next()]  # 30 positions: a cycle of 14, and more
    windows = [pool[0:3], pool[3:6], pool[6:7]]
    visits = [flat[0:6], flat[6:12], flat[12:14], flat[14:20], flat[20:26], flat[26:28]]
    for visit, window in zip(visits, windows * 2, strict=True):
        size = len(window)
        for e in range(2):  # each epoch of a visit is a permutation of its window
            assert sorted(s.name for s in visit[e * size : (e + 1) * size]) == sorted(
                s.name for s in window
            )
    assert visits[0] != visits[3]  # the second cycle draws new orders
    b = ArchSampler(pool, 2, seed=3, window=3, window_epochs=2)
    for _ in range(4):
        b.next()
    c = ArchSampler(pool, 2, seed=3, window=3, window_epochs=2)
    c.restore(json.loads(json.dumps(b.state())))
    assert [s for _ in range(11) for s in c.next()] == flat[8:30]
    with pytest.raises(ValueError, match="other settings"):
        ArchSampler(pool, 2, seed=3, window=2, window_epochs=2).restore(b.state())


def test_sampler_rejects_a_state_from_another_pool():
    pool = zoo.sample("vits-1k", 4, seed=0)
    state = ArchSampler(pool, 2, seed=0).state()
    other = ArchSampler(pool[:3], 2, seed=0)
    with pytest.raises(ValueError, match="pool"):
        other.restore(state)
    assert fingerprint(pool) != fingerprint(pool[:3])


def test_pools_from_an_architecture_dataset(tmp_path):
    path = tmp_path / "archs.json"
    zoo.write_dataset(path, "vits-1k", 20, seed=1, heldout=0.2, image_size=28, in_channels=1)
    config = tiny_config({"archs.dataset": str(path), "eval.num_heldout": 2})
    pools = pools_of(config)
    doc = zoo.load_dataset(path)
    assert list(pools.train) == doc["train"]
    assert list(pools.heldout) == doc["heldout"][:2]


def test_larger_must_be_larger():
    config = tiny_config()
    config.eval.larger.width = 16
    with pytest.raises(ValueError, match="larger"):
        pools_of(config)


def test_schedule_warms_up_then_decays():
    schedule = make_schedule(lr=1.0, warmup_steps=10, end_lr_ratio=0.1, num_steps=110)
    lrs = np.asarray([schedule(k) for k in range(110)])
    # float32 closed forms against float64 ones: a few elementwise roundings (and one cos)
    # at the scale of the peak rate 1.0, no sums: reduction 1.
    assert_close(lrs[:10], np.arange(1, 11) / 10, reduction=1, scale=1.0)
    assert np.all(np.diff(lrs[9:]) <= 1e-7)
    assert_close(lrs[59], 0.1 + 0.9 * 0.5, reduction=1, scale=1.0)  # half-way: cos = 0
    assert_close(lrs[-1], 0.1, reduction=1, scale=1.0)


def test_fsdp_shards_large_parameters_only():
    mesh = make_mesh()
    assert mesh.shape["data"] == 8
    assert fsdp_sharding(mesh, (512, 2048), 2**16).spec == jax.sharding.PartitionSpec(None, "data")
    assert fsdp_sharding(mesh, (64, 64), 2**16).spec == jax.sharding.PartitionSpec(None, None)
    assert fsdp_sharding(mesh, (1021, 77), 1).spec == jax.sharding.PartitionSpec(None, None)


def test_distributed_is_a_no_op_for_one_process(monkeypatch):
    for var in ("SLURM_NTASKS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert initialize_distributed() is False
    assert initialize_distributed(num_processes=1) is False
    with pytest.raises(ValueError, match="all of"):
        initialize_distributed(coordinator_address="localhost:1234", num_processes=2)


def test_masked_task_sums():
    class Fixed:
        def __call__(self, x):
            return jnp.tile(jnp.asarray([[0.0, 10.0]]), (x.shape[0], 1))

    batch = {
        "image": jnp.zeros((4, 2, 2, 1)),
        "label": jnp.asarray([1, 1, 0, 0]),
        "mask": jnp.asarray([True, True, True, False]),
    }
    sums = Task("image").sums(Fixed(), batch)
    assert float(sums["count"]) == 3 and float(sums["metric_sum"]) == 2
    # float32 logsumexp over 2 classes, then a sum over the 4 examples, of terms up to 10.
    # (atol ~1e-5 still sees the 3 * 4.5e-5 of the log1p terms.)
    want = 10 + 3 * math.log1p(math.exp(-10))
    assert_close(float(sums["loss_sum"]), want, reduction=2 + 4, scale=10.0)


def test_apply_update_is_adamw_and_skips_non_finite_steps():
    params = {"w": jnp.asarray([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.asarray([0.1, -0.1])}
    grads = {"w": jnp.asarray([[0.3, -0.2], [0.1, 0.4]]), "b": jnp.asarray([1.0, 2.0])}
    hp = dict(lr=0.1, warmup_steps=0, end_lr_ratio=1.0, num_steps=10)
    tx = step.make_optimizer(grad_clip=1.0, b1=0.9, b2=0.999, weight_decay=0.01)
    state = {
        "params": params,
        "opt": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "skipped": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(0)),
    }
    acc = {"grads": grads, **{k: jnp.float32(1.0) for k in ("loss", "task_loss", "metric", "reg")}}
    h = step.schedule_hparams(**hp)
    new, metrics = step.apply_update(state, acc, False, h, tx=tx, ema_decay=0.0)
    # The same step with optax's own AdamW (constant rate 0.1 here).
    reference = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(0.1, b1=0.9, b2=0.999, weight_decay=0.01)
    )
    updates, _ = reference.update(grads, reference.init(params), params)
    want = optax.apply_updates(params, updates)
    for k in params:
        # A handful of float32 operations per element on O(1) values.
        np.testing.assert_allclose(
            new["params"][k], want[k], rtol=0, atol=8 * np.finfo(np.float32).eps
        )
    assert bool(metrics["finite"]) and float(metrics["lr"]) == pytest.approx(0.1)

    poisoned, metrics = step.apply_update(new, acc, True, h, tx=tx, ema_decay=0.0)
    assert not bool(metrics["finite"])
    assert int(poisoned["step"]) == 2 and int(poisoned["skipped"]) == 1
    # A skipped step leaves parameters and optimizer state exactly as they were (jnp.where
    # selects the old arrays, no arithmetic).
    chex.assert_trees_all_equal(poisoned["params"], new["params"])
    chex.assert_trees_all_equal(poisoned["opt"], new["opt"])


def test_grouped_sampler_keeps_meta_batches_in_one_group_and_resumes():
    pool = zoo.sample("vits-1k", 12, seed=0, depth=(2, 4), width=(32, 64))
    groups = [pool[:3], pool[3:]]
    a = GroupedSampler(groups, 2, seed=5)
    batches = [a.next() for _ in range(40)]
    for batch in batches:
        assert set(batch) <= set(groups[0]) or set(batch) <= set(groups[1])
    share = np.mean([set(b) <= set(groups[0]) for b in batches])
    assert 0.05 < share < 0.6  # chosen by size: 3 of 12
    b = GroupedSampler(groups, 2, seed=5)
    for _ in range(7):
        b.next()
    c = GroupedSampler(groups, 2, seed=5)
    c.restore(json.loads(json.dumps(b.state())))
    assert [c.next() for _ in range(10)] == batches[7:17]
    with pytest.raises(ValueError, match="pool"):
        GroupedSampler([pool[:3], pool[3:11]], 2, seed=5).restore(b.state())


def test_stream_sampler_draws_fresh_architectures_and_resumes():
    ranges = dict(depth=(2, 6), width=(32, 128), width_multiple=8, max_heads=4)
    heldout = zoo.sample("vits-1k", 2, seed=99, **ranges)

    def draw(entropy):
        return zoo.sample("vits-1k", 1, seed=entropy, **ranges)[0]

    def group_of(spec):
        return spec.depth % 2

    a = StreamSampler(draw, 3, 4, exclude=heldout, group_of=group_of, fingerprint="f")
    batches = [a.next() for _ in range(30)]
    seen = [s for b in batches for s in b]
    assert len(set(seen)) > 60  # fresh draws, not a small pool
    assert not set(seen) & set(heldout)
    assert all(len({group_of(s) for s in b}) == 1 for b in batches)
    b = StreamSampler(draw, 3, 4, exclude=heldout, group_of=group_of, fingerprint="f")
    for _ in range(11):
        b.next()
    c = StreamSampler(draw, 3, 4, exclude=heldout, group_of=group_of, fingerprint="f")
    c.restore(json.loads(json.dumps(b.state())))
    assert [c.next() for _ in range(5)] == batches[11:16]
    with pytest.raises(ValueError, match="stream"):
        StreamSampler(draw, 3, 4, fingerprint="g").restore(b.state())


def test_init_state_holds_the_eagerly_built_ghn():
    # The host initializers draw GHN(config, rngs=nnx.Rngs(seed))'s values only eagerly,
    # so the init program takes them as an argument: bitwise, also FSDP-sharded.
    programs = programs_for(tiny_config())
    state = programs.init_state()
    eager = nnx.to_pure_dict(nnx.state(GHN(TINY_GHN, rngs=nnx.Rngs(0)), nnx.Param))
    chex.assert_trees_all_equal(state["params"], eager)
    chex.assert_trees_all_equal(state["ema"], eager)
    chex.assert_trees_all_equal(programs.init_state()["params"], eager)
    assert programs.stats.compilations["init"] == 1
