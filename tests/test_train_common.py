"""Shared set-up of the meta-training tests: the default config, shrunk (no tests here)."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_collections
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# One compilation cache for every test and subprocess of a session (also across
# xdist workers): runs of the same tiny architectures compile once.
CACHE = Path(os.environ.get("GHN_TEST_COMPILATION_CACHE", "/tmp/ghn-test-xla-cache"))


def load_config(name: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def set_key(config: ml_collections.ConfigDict, key: str, value) -> None:
    """config["a.b.c"] = value."""
    *parents, last = key.split(".")
    for part in parents:
        config = config[part]
    config[last] = value


def tiny_config(changes: dict | None = None) -> ml_collections.ConfigDict:
    """configs/vit_mnist.py shrunk: a 1-layer d=32 GHN, 1-block ViTs of width 16-32.

    `changes` maps dotted keys ("eval.enabled") to values.
    """
    c = load_config("vit_mnist")
    c.num_steps = 4
    c.log_every = 1
    c.progress_bar = False
    c.tensorboard = False
    c.ghn.update(dict(d_model=32, num_layers=1, num_heads=2, rank=8, max_dim=256))
    c.archs.pool_size = 1  # one compiled architecture; tests that need more say so
    c.archs.meta_batch_size = 2
    c.archs.ranges.update(
        dict(depth=(1, 1), width=(16, 32), max_heads=2, min_head_dim=8, patch_size=7)
    )
    c.data.batch_size = 16
    c.optim.warmup_steps = 2
    c.eval.enabled = False
    c.eval.every = 0
    c.eval.num_heldout = 1
    c.eval.max_batches = 1
    c.eval.larger = ml_collections.ConfigDict()
    c.checkpoint.every = 0
    c.checkpoint.async_save = False
    # FSDP everywhere: every test exercises sharded GHN parameters on 8 devices, and
    # they all share one compiled program per architecture.
    c.mesh.fsdp = True
    c.mesh.fsdp_min_size = 1024
    c.ema_decay = 0.9  # and an EMA
    c.compilation_cache_dir = str(CACHE)
    for key, value in (changes or {}).items():
        set_key(c, key, value)
    return c


def write_config_file(path: Path, changes: dict | None = None) -> Path:
    """A config file for `train.py` subprocesses: `tiny_config(changes)`."""
    path.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(ROOT / "tests")!r})
            from test_train_common import tiny_config

            def get_config():
                return tiny_config({changes!r})
            """
        )
    )
    return path


def env(devices: int = 8) -> dict[str, str]:
    e = dict(os.environ)
    e["JAX_PLATFORMS"] = "cpu"
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


def train_command(config_file: Path, workdir: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        f"--config={config_file}",
        f"--workdir={workdir}",
        *flags,
    ]


def run_train(config_file: Path, workdir: Path, *flags: str, timeout=300, check=True):
    proc = subprocess.run(
        train_command(config_file, workdir, *flags),
        env=env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def assert_close_grads(a: dict, b: dict) -> None:
    """Equal up to float32 round-off, measured against the whole gradient's scale.

    Per leaf relative errors mean little: e.g. the decoder's b2 gradient is a sum of
    terms that nearly cancel (the predicted weights are renormalized), so it is
    round-off-sized and differs by 100% between summation orders.
    """
    diff = np.sqrt(sum(np.sum((a[k] - b[k]) ** 2.0) for k in a))
    norm = np.sqrt(sum(np.sum(b[k] ** 2.0) for k in b))
    assert diff <= 1e-5 * norm, (diff, norm)
    scale = max(float(np.abs(b[k]).max()) for k in b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5 * scale, err_msg=k)
