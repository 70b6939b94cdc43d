"""Crash safety for real: train.py subprocesses stopped by SIGTERM and by kill -9, restarted."""

import os
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train_common import ROOT, env, run_train, train_command, write_config_file

STEPS = 8


def saved_steps(workdir) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def checkpoint_leaves(workdir, step: int) -> dict[str, np.ndarray]:
    state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def wait_for(predicate, proc, timeout=240.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def start(config_file, workdir):
    return subprocess.Popen(
        train_command(config_file, workdir),
        env=env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_sigterm_and_kill_9_then_resume_equal_an_uninterrupted_run(tmp_path):
    # The stream (a fresh architecture at every position) over two buckets: the
    # sampler's position and the bucket programs are what a resume must get right.
    changes = {"num_steps": STEPS, "archs.stream": True, "archs.buckets": 2}
    changes.update({"archs.ranges.depth": (1, 2), "checkpoint.every": 2})
    changes["checkpoint.async_save"] = True
    straight = write_config_file(tmp_path / "straight.py", changes)
    run_train(straight, tmp_path / "a")
    assert saved_steps(tmp_path / "a")[-1] == STEPS

    # Same run, slowed down so that signals land between checkpoints.
    slow = write_config_file(tmp_path / "slow.py", {**changes, "debug.sleep_per_step": 0.3})
    b = tmp_path / "b"

    proc = start(slow, b)
    wait_for(lambda: saved_steps(b) == [2], proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, proc.stderr.read()
    stopped_at = saved_steps(b)[-1]
    assert 2 < stopped_at < STEPS  # saved on the way out, between periodic checkpoints

    proc = start(slow, b)
    # Past the first periodic checkpoint after the restart, then mid-step: kill -9.
    next_ckpt = stopped_at + 2 - stopped_at % 2
    wait_for(lambda: next_ckpt in saved_steps(b), proc)
    time.sleep(0.4)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert saved_steps(b)[-1] < STEPS, "the run finished before it could be killed"

    proc = run_train(slow, b)
    assert saved_steps(b)[-1] == STEPS
    final_a, final_b = checkpoint_leaves(tmp_path / "a", STEPS), checkpoint_leaves(b, STEPS)
    assert final_a.keys() == final_b.keys()
    for k in final_a:
        # Same programs (from the compilation cache), same data and architecture order,
        # on the same machine: bitwise, float round-off included.
        np.testing.assert_array_equal(final_b[k], final_a[k], err_msg=k)
