"""Shared set-up of the meta-training tests: the default config, shrunk (no tests here)."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_collections
import numpy as np
from tolerances import assert_close, ghn_reduction, roundoff_atol, transformer_reduction

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
    c.archs.buckets = 1  # one bucketed training program; tests that need more say so
    c.archs.stream = False  # a pool; tests of the stream say so
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


def meta_grad_reduction(config: ml_collections.ConfigDict) -> int:
    """Reduction length behind one meta-gradient element of a ViT-on-MNIST `config`.

    Forward: the GHN predicts the widest ViT of the ranges (tolerances.ghn_reduction),
    which runs on the batch: patch embedding (p * p), blocks, head (width), softmax
    over the classes. Backward: the same chain transposed, plus the sums of weight
    gradients over batch x tokens for each architecture of the meta-batch, over the
    GHN's nodes and over a decoded matrix's rows or cols.
    """
    import jax
    from flax import nnx

    import ghn
    from ghn import zoo
    from ghn.hypernet import GHNConfig, make_batch

    assert config.data.name == "mnist5k", config.data.name  # 28 x 28 x 1, 10 classes
    r = config.archs.ranges
    width, depth = max(r.width), max(r.depth)
    spec = zoo.ViTSpec(  # one head: the longest q.k contraction
        depth=depth,
        width=width,
        num_heads=1,
        patch_size=r.patch_size,
        image_size=28,
        in_channels=1,
        num_classes=10,
    )
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    graph = ghn.trace(model, jax.ShapeDtypeStruct((1, 28, 28, 1), np.float32))
    gcfg = GHNConfig.from_json(config.ghn.to_dict())
    max_dim = max(
        max(c_out * kh, c_in * kw)
        for c_out, c_in, kh, kw in (i.canonical_shape for i in graph.params.values())
    )
    nodes = make_batch([graph], gcfg).num_nodes
    predict = ghn_reduction(gcfg, num_nodes=nodes, max_dim=max_dim)
    tokens = (28 // r.patch_size) ** 2 + 1
    vit = r.patch_size**2 + width + 10
    vit += transformer_reduction(
        depth=depth, width=width, mlp_width=4 * width, head_dim=width, tokens=tokens
    )
    sums = config.archs.meta_batch_size * config.data.batch_size * tokens + nodes + max_dim
    return 2 * (predict + vit) + sums


def assert_close_grads(a: dict, b: dict, *, reduction: int) -> None:
    """Equal up to float32 round-off (tolerances.py), measured against the whole gradient's scale.

    Per leaf relative errors mean little: e.g. the decoder's b2 gradient is a sum of
    terms that nearly cancel (the predicted weights are renormalized), so it is
    round-off-sized and differs by 100% between summation orders. `reduction`:
    `meta_grad_reduction(config)`.
    """
    diff = np.sqrt(sum(np.sum((a[k] - b[k]) ** 2.0) for k in a))
    norm = np.sqrt(sum(np.sum(b[k] ** 2.0) for k in b))
    assert diff <= roundoff_atol(reduction, norm), (diff, norm, reduction)
    scale = max(float(np.abs(b[k]).max()) for k in b)
    for k in a:
        assert_close(a[k], b[k], reduction=reduction, scale=scale, err_msg=k)


ADAM_EPS = 1e-8  # optax.scale_by_adam's default eps (ghn/train/step.py keeps it)


def first_update_bounds(grads_a: dict, grads_b: dict, params: dict, config, *, reduction: int):
    """Per element, how far the first AdamW updates of two runs may end apart.

    Both runs start from the same state; their gradients agree up to round-off
    (`assert_close_grads(grads_a, grads_b, reduction=reduction)`). The update is
    p - lr * (u + wd * p) with u = g' / (|g'| + eps) and g' = kappa * g (global-norm
    clipping, kappa = min(1, clip / ||g||); Adam's first step has m = g', v = g'^2).
    |u| <= 1, so the runs differ by at most 2 lr; a round-off dg' in g' moves u by at
    most eps * dg' / (|g'| - dg' + eps)^2, with dg' = kappa * grad_atol + |g'| * (the
    relative round-off of ||g||, hence of kappa). Where g is exactly zero in both runs
    (rows of tables no node uses) u = 0 in both. The subtraction rounds at p's scale.
    `lr` is the peak rate, which bounds the first step's.
    """
    o = config.optim
    lr = o.lr
    norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads_b.values()))
    kappa = min(1.0, o.grad_clip / norm) if o.grad_clip > 0 else 1.0
    scale = max(float(np.abs(g).max()) for g in grads_b.values())
    grad_atol = roundoff_atol(reduction, scale)  # per element, as in assert_close_grads
    rel = roundoff_atol(reduction, 1.0)
    out = {}
    for k, p in params.items():
        g = kappa * np.abs(np.asarray(grads_b[k], np.float64))
        dg = kappa * grad_atol + g * rel
        adam = lr * ADAM_EPS * dg / (np.maximum(g - dg, 0.0) + ADAM_EPS) ** 2
        adam = np.where((grads_a[k] == 0) & (grads_b[k] == 0), 0.0, np.minimum(adam, 2 * lr))
        out[k] = adam + roundoff_atol(1, float(np.abs(p).max()) + lr)
    return out


def assert_first_update_close(
    a: dict, b: dict, grads_a: dict, grads_b: dict, config, *, reduction: int
) -> None:
    """Parameters after the first update of two runs, within `first_update_bounds`."""
    bounds = first_update_bounds(grads_a, grads_b, b, config, reduction=reduction)
    for k, bound in bounds.items():
        err = np.abs(np.asarray(a[k], np.float64) - b[k])
        bad = err > bound
        assert not bad.any(), (k, err[bad][:5], bound[bad][:5], np.asarray(grads_b[k])[bad][:5])
