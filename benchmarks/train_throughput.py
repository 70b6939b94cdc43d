"""Meta-training throughput and compilations, with the persistent compilation cache cold and warm.

N steps over a zoo of K architectures (configs/vit_mnist.py with a pool of K
ViTs, meta-batch m): every architecture is its own XLA program, compiled on
first use. The same run is done twice, each in a fresh process: first with an
empty persistent compilation cache ("cold"), then with the cache the first run
filled ("warm"). Prints JSON lines: the machine, one line per run, and what the
warm cache saved.

    python benchmarks/train_throughput.py [--archs 8] [--steps 24] [--meta-batch 1]

Steady state is measured over the steps after the first epoch over the pool
(by then every architecture is compiled): steps/s, samples/s, architectures/s.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

CHILD = r"""
import importlib.util, json, sys, tempfile, time
t0 = time.perf_counter()
from ghn.train import Trainer, read_metrics

archs, steps, m, cache = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
spec = importlib.util.spec_from_file_location("vit_mnist", sys.argv[5])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
config.archs.pool_size = archs
config.archs.meta_batch_size = m
config.num_steps = steps
# One log window per epoch over the pool: the first holds every compilation.
config.log_every = max(archs // m, 1)
config.eval.enabled = False
config.checkpoint.enabled = False
config.progress_bar = False
config.tensorboard = False
config.compilation_cache_dir = cache
workdir = tempfile.mkdtemp()
trainer = Trainer(config, workdir)
summary = trainer.train()
trainer.close()
wall = time.perf_counter() - t0
train = [r for r in read_metrics(workdir) if r["split"] == "train"]
steady = train[1:]
steady_s = sum(config.log_every / r["steps_per_s"] for r in steady)
steady_steps = config.log_every * len(steady)
stats = trainer.programs.stats
print(json.dumps({
    "wall_s": round(wall, 1),
    "compile_s": round(stats.compile_s, 1),
    "compile_s_by_program": {k: round(v, 1) for k, v in stats.compile_seconds.items()},
    "compilations": stats.total(),
    "arch_compilations": stats.arch_compilations(),
    "train_traces": summary["traces"].get("train", 0),
    "persistent_cache_hits": stats.persistent_hits,
    "steady_steps_per_s": round(steady_steps / steady_s, 2),
    "steady_archs_per_s": round(steady_steps * m / steady_s, 2),
    "steady_samples_per_s": round(steady_steps * config.data.batch_size / steady_s, 1),
    "batch_size": config.data.batch_size,
    "first_loss": train[0]["loss"],
    "last_loss": train[-1]["loss"],
}))
"""


def run_child(args, cache: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(args.archs),
            str(args.steps),
            str(args.meta_batch),
            cache,
            str(ROOT / "configs" / "vit_mnist.py"),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=int, default=8, help="K: architectures in the pool")
    parser.add_argument("--steps", type=int, default=None, help="N (default 3K)")
    parser.add_argument("--meta-batch", type=int, default=1, help="m: architectures per step")
    args = parser.parse_args()
    args.steps = args.steps or 3 * args.archs
    if args.steps * args.meta_batch < 2 * args.archs:
        raise SystemExit("need steps * meta-batch >= 2 * archs: one epoch to compile, one steady")

    from common import emit, machine

    emit({"bench": "train_throughput", "machine": machine()})
    setting = {"archs": args.archs, "steps": args.steps, "meta_batch": args.meta_batch}
    with tempfile.TemporaryDirectory() as cache:
        cold = run_child(args, cache)
        emit({"bench": "train_throughput", "cache": "cold", **setting, **cold})
        warm = run_child(args, cache)
        emit({"bench": "train_throughput", "cache": "warm", **setting, **warm})
    emit(
        {
            "bench": "train_throughput",
            "warm_cache_saved_compile_s": round(cold["compile_s"] - warm["compile_s"], 1),
            "warm_cache_saved_wall_s": round(cold["wall_s"] - warm["wall_s"], 1),
            "same_losses": cold["last_loss"] == warm["last_loss"],
        }
    )


if __name__ == "__main__":
    main()
