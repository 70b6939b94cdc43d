"""Other tasks and options through the compiled programs: text (bfloat16), BatchNorm CNNs, EMA."""

import jax
import jax.numpy as jnp
import numpy as np
from test_train_common import load_config
from tolerances import assert_close

from ghn import zoo
from ghn.hypernet import GHNConfig
from ghn.tasks import eval_batches, load_datasets
from ghn.train import Programs, make_mesh
from ghn.train.config import dataset_kwargs, optimizer
from ghn.train.distributed import local_array
from ghn.zoo.pools import pools_of

TINY_GHN = GHNConfig(d_model=32, num_layers=1, num_heads=2, rank=8, max_dim=256)


def programs_for(config, **kw) -> Programs:
    task, _, _ = load_datasets(config.data.name, **dataset_kwargs(config))
    config.num_steps = 10
    tx, schedule = optimizer(config)
    # Settings of test_train_common.tiny_config, so the init and update programs are shared.
    kw = dict(fsdp=True, fsdp_min_size=1024, ema_decay=0.9, pred_weight_decay=3e-5) | kw
    return Programs(
        ghn_config=TINY_GHN,
        task=task,
        mesh=make_mesh(),
        tx=tx,
        schedule=schedule,
        seed=0,
        **kw,
    )


def evaluate_first_batch(config, programs, spec) -> dict[str, float]:
    _, _, evals = load_datasets(config.data.name, **dataset_kwargs(config))
    batch = programs.global_batch(
        eval_batches(evals, programs.task, batch_size=16, max_batches=1)[0]
    )
    state = programs.init_state()
    sums = programs.evaluate(spec, state["params"], batch)
    return {k: float(local_array(v)) for k, v in sums.items()}


def test_text_task_in_bfloat16():
    config = load_config("gpt2_text")
    config.data.seq_len = 16
    programs = programs_for(config, bf16=True)
    spec = zoo.GPT2Spec(depth=1, width=16, num_heads=2, vocab_size=256, context_length=16)
    sums = evaluate_first_batch(config, programs, spec)
    assert sums["count"] == 16 * 16
    loss = sums["loss_sum"] / sums["count"]
    assert np.isfinite(loss) and 2.0 < loss < 20.0  # bytes: ln 256 = 5.5 for a uniform model
    summary = programs.task.summarize(loss, sums["metric_sum"] / sums["count"])
    assert summary["perplexity"] == np.exp(loss)


def test_batchnorm_cell_network():
    config = load_config("cnn_mnist")
    config.archs.ranges.update(dict(num_cells=(3, 3), nodes=(2, 2), width=(8, 8)))
    spec = pools_of(config).train[0].replace(norm="bn")
    programs = programs_for(config)
    assert programs.arch(spec).target.rest  # BatchNorm statistics: non-parameter state
    sums = evaluate_first_batch(config, programs, spec)
    assert sums["count"] == 16 and np.isfinite(sums["loss_sum"])
    assert 0 <= sums["metric_sum"] <= 16


def test_ema_follows_the_parameters():
    config = load_config("vit_mnist")
    programs = programs_for(config)
    state = programs.init_state()
    before = jax.tree.map(np.asarray, state["params"])
    acc = programs.zeros()
    acc["grads"] = jax.tree.map(lambda g: g + 1.0, acc["grads"])
    state, metrics = programs.update(state, acc, 0)
    assert bool(local_array(metrics["finite"]))
    for b, p, e in zip(*(jax.tree.leaves(t) for t in (before, state["params"], state["ema"]))):
        expected = 0.9 * b + 0.1 * np.asarray(p)
        # d * e + (1 - d) * p, elementwise: a few roundings at the terms' scale, no sum.
        scale = 0.9 * np.abs(b).max() + 0.1 * np.abs(np.asarray(p)).max()
        assert_close(e, expected, reduction=1, scale=scale)
    assert jnp.any(state["params"]["decoder"]["w2"] != before["decoder"]["w2"])
