"""Multi-process meta-training for real: 2 processes x 2 CPU devices on localhost (gloo)."""

import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils
from test_train_common import (
    ROOT,
    assert_close_grads,
    assert_first_update_close,
    env,
    first_update_bounds,
    meta_grad_reduction,
    tiny_config,
)
from tolerances import roundoff_atol

from ghn.train import Trainer

WORKER = textwrap.dedent(
    """
    import sys
    import jax

    pid, nproc, port, workdir, out = sys.argv[1:]
    sys.path.insert(0, {tests!r})
    from test_train_common import tiny_config
    from test_train_multihost import train_and_dump
    from ghn.train import initialize_distributed

    assert initialize_distributed(f"localhost:{{port}}", int(nproc), int(pid))
    assert jax.process_count() == int(nproc) and jax.device_count() == 4
    train_and_dump(tiny_config({{"num_steps": 3}}), workdir, out)
    """
).format(tests=str(ROOT / "tests"))


def train_and_dump(config, workdir, out) -> None:
    """Trains `config`; saves step 0's gradients, the GHN params after step 0 and the
    final ones to `out` (.npz)."""

    def flat(tree, prefix):
        # Gathers FSDP shards from every process.
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        full = multihost_utils.process_allgather([x for _, x in leaves], tiled=True)
        return {prefix + jax.tree_util.keystr(p): np.asarray(x) for (p, _), x in zip(leaves, full)}

    trainer = Trainer(config, workdir)
    try:
        # Step 0 by hand, to compare gradients too; train() then runs the other steps.
        _, acc, _ = trainer.step_once(0)
        grads = flat(acc["grads"], "grads")
        first = flat(trainer.state["params"], "first")
        trainer.train()
        np.savez(out, **grads, **first, **flat(trainer.state["params"], "params"))
    finally:
        trainer.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(script, pid, nproc, port, workdir, out, devices):
    return subprocess.Popen(
        [sys.executable, str(script), str(pid), str(nproc), str(port), str(workdir), str(out)],
        env=env(devices),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc, timeout=400):
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, output[-4000:]


@pytest.mark.slow
def test_two_processes_match_each_other_and_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = [
        launch(script, i, 2, port, tmp_path / "multi", tmp_path / f"p{i}.npz", 2) for i in (0, 1)
    ]
    # Meanwhile, the same run in this process (one process, 8 devices).
    train_and_dump(tiny_config({"num_steps": 3}), tmp_path / "single", tmp_path / "single.npz")
    for p in procs:
        finish(p)

    p0, p1, single = (np.load(tmp_path / f"{n}.npz") for n in ("p0", "p1", "single"))
    assert set(p0.files) == set(p1.files) == set(single.files)
    for k in p0.files:
        # One SPMD program, replicated: the same computation on the same inputs on the
        # same machine, so bitwise equal.
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
    # Same global batch and architectures; gloo's cross-process all-reduce sums in
    # another order than one process does: float32 round-off only (tolerances.py).
    config = tiny_config({"num_steps": 3})
    n = meta_grad_reduction(config)
    part = lambda d, prefix: {k[len(prefix) :]: d[k] for k in d.files if k.startswith(prefix)}
    g0, g1 = part(p0, "grads"), part(single, "grads")
    assert_close_grads(g0, g1, reduction=n)
    # The first AdamW update: equal up to round-off except where g is round-off-sized.
    assert_first_update_close(part(p0, "first"), part(single, "first"), g0, g1, config, reduction=n)

    # After 3 steps (lr 1e-3): a bound, and a divergence detector.
    final0, final1 = part(p0, "params"), part(single, "params")
    o = config.optim
    # (1) An AdamW step moves an element by lr * (|u| + wd |p|) at most, and for t steps
    # |u| = |m| / (sqrt(v) + eps) <= sqrt(sum_i a_i^2 / c_i) (Cauchy-Schwarz; a and c are
    # the bias-corrected EMA weights of m and v), ~1.0035 for t = 3: two runs end at most
    # 2 * lr * that per step apart.
    u_max = 1.0
    for t in range(1, 4):
        a = (1 - o.b1) * o.b1 ** np.arange(t)[::-1] / (1 - o.b1**t)
        c = (1 - o.b2) * o.b2 ** np.arange(t)[::-1] / (1 - o.b2**t)
        u_max = max(u_max, float(np.sqrt(np.sum(a**2 / c))))
    for k in final1:
        p_max = float(np.abs(final1[k]).max())
        step = o.lr * (u_max + o.weight_decay * p_max) + roundoff_atol(1, p_max)
        np.testing.assert_allclose(final0[k], final1[k], rtol=0, atol=3 * 2 * step, err_msg=k)
    # (2) Only elements whose gradient is round-off-sized may differ by more than
    # round-off (sign flips move them by ~lr); elsewhere the runs agree. At step 0 that
    # is the fraction `loose` whose first-update bound exceeds lr / 100, measured on
    # this run's own gradients; each of the 3 steps may add as many.
    bounds = first_update_bounds(g0, g1, final1, config, reduction=n)
    loose = np.concatenate([(b > o.lr / 100).ravel() for b in bounds.values()]).mean()
    off = np.concatenate([(np.abs(final0[k] - final1[k]) > o.lr / 100).ravel() for k in final1])
    assert off.mean() <= 3 * loose, (off.mean(), loose)
    # Both processes saved one checkpoint together.
    assert (tmp_path / "multi" / "checkpoints" / "3").is_dir()
