"""Meta-training throughput and compilations: bucketed vs per-architecture programs.

Runs `configs/vit_mnist.py` (or `--config gpt2_text`) with its sampler's ranges
broadened (`--ranges`; default: 1,938 ViTs of 1-10 blocks, or 1,488 GPT-2s), for
each requested pool size and/or the stream (a fresh architecture at every
position), on one or both training paths. Every run is a fresh process;
`--caches cold,warm` runs each setting with an empty persistent compilation
cache, then again with the cache the cold run
filled. Prints JSON lines: the machine, then one line per run:

  compilations / train_programs   XLA programs compiled (training programs only)
  compile_s                       seconds compiling (cold or from the cache)
  steady_*                        steps, architectures and samples per second over
                                  the log windows in which nothing compiled
  distinct_archs                  different architectures the run trained on
  archs_in_30_min                 architectures a 30-minute run would train on: steady
                                  archs/s over (1800 s - compile), a projection
  distinct_archs_in_30_min        how many of those are distinct (the run's own
                                  sampler, continued for that many draws)
  steps                           the last logged step (with --minutes: where it stopped)
  peak_rss_mb                     the run's peak resident memory

    python benchmarks/train_throughput.py --pools 8,100,1000,stream --paths bucketed,per_arch \
        --steps 200 [--config gpt2_text] [--caches cold,warm]

`--minutes 30 --steps 100000` measures a real 30-minute run instead of projecting
one: each run stops after that wall time from its process start (compiling
included), and `distinct_archs` is what it saw.

A per-architecture run over a big pool compiles one program per architecture
it meets (~19 s each on 2 CPU cores), so `--per-arch-steps` caps its steps.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

RANGES = {
    # 1,938 ViTs (1-10 blocks, width 16-144, 1-8 heads, patch 4 or 7); 144 x 7 fits K = 1024.
    "vit_mnist": dict(
        depth=(1, 10), width=(16, 144), width_multiple=4, max_heads=8, patch_size=(4, 7)
    ),
    # 1,488 GPT-2s (1-12 blocks, width 16-256, 1, 2, 4 or 8 heads).
    "gpt2_text": dict(depth=(1, 12), width=(16, 256), width_multiple=8, num_heads=(1, 2, 4, 8)),
}

CHILD = r"""
import importlib.util, json, resource, sys, tempfile, time
t0 = time.perf_counter()
from ghn.train import Trainer, read_metrics

a = json.loads(sys.argv[1])
spec = importlib.util.spec_from_file_location("config", a["config_file"])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
import ml_collections
ranges = {k: tuple(v) if isinstance(v, list) else v for k, v in a["ranges"].items()}
config.archs.ranges = ml_collections.ConfigDict({**config.archs.ranges.to_dict(), **ranges})
config.archs.stream = a["pool"] == "stream"
config.archs.pool_size = 100 if config.archs.stream else int(a["pool"])
config.archs.bucketed = a["path"] == "bucketed"
config.archs.meta_batch_size = a["meta_batch"]
config.archs.buckets = a["buckets"]
config.num_steps = a["steps"]
config.log_every = a["log_every"]
config.eval.enabled = False
config.eval.larger = ml_collections.ConfigDict()
config.checkpoint.enabled = False
config.progress_bar = False
config.tensorboard = False
config.compilation_cache_dir = a["cache"]
workdir = tempfile.mkdtemp()
trainer = Trainer(config, workdir)
setup_s = time.perf_counter() - t0
if a["minutes"]:
    # A wall-clock budget from process start: SIGTERM makes the trainer stop at the next
    # step boundary, so the run's own metrics say what it saw in that time.
    import os, signal, threading
    timer = threading.Timer(
        max(0.0, 60 * a["minutes"] - setup_s), os.kill, (os.getpid(), signal.SIGTERM)
    )
    timer.daemon = True
    timer.start()
summary = trainer.train()
trainer.close()
wall = time.perf_counter() - t0
train = [r for r in read_metrics(workdir) if r["split"] == "train"]
# Steady: windows in which nothing compiled (the counter did not move).
steady, before = [], 0
for r in train:
    if r["compilations"] == before:
        steady.append(r)
    before = r["compilations"]
steady_s = sum(config.log_every / r["steps_per_s"] for r in steady)
steady_steps = config.log_every * len(steady)
stats = trainer.programs.stats
m = config.archs.meta_batch_size
rate = steady_steps * m / steady_s if steady_s else 0.0
pool = len(trainer.candidates)
# A 30-minute run: the architectures it visits at the steady rate after compiling, and
# how many of them are distinct (the run's sampler, continued: drawing is cheap).
visits = int(max(0.0, 1800 - stats.compile_s) * rate)
seen, drawn = set(trainer._seen), config.num_steps * m
while drawn < visits:
    seen.update(trainer.sampler.next())
    drawn += m
print(json.dumps({
    "wall_s": round(wall, 1),
    "setup_s": round(setup_s, 1),
    "compile_s": round(stats.compile_s, 1),
    "compile_s_by_kind": {k: round(v, 1) for k, v in sorted(stats.compile_seconds.items())},
    "compilations": stats.total(),
    "train_programs": summary["traces"].get("train", 0) + summary["traces"].get("bucket_train", 0),
    "persistent_cache_hits": stats.persistent_hits,
    "buckets": len(trainer.groups),
    "candidates": pool,
    "steps": train[-1]["step"],
    "distinct_archs": train[-1]["distinct_archs"],
    "steady_windows": len(steady),
    "steady_steps_per_s": round(rate / m, 2),
    "steady_archs_per_s": round(rate, 2),
    "steady_samples_per_s": round(rate / m * config.data.batch_size, 1),
    "archs_in_30_min": visits,
    "distinct_archs_in_30_min": len(seen),
    "batch_size": config.data.batch_size,
    "last_loss": train[-1]["loss"],
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
}))
"""


def run_child(setting: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(setting)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    # SIGTERM (e.g. pkill) becomes an exception, so subprocess.run kills the running
    # child instead of leaving it to share the cores with the next benchmark.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vit_mnist", choices=sorted(RANGES))
    parser.add_argument("--pools", default="8,100,1000,stream", help="pool sizes and/or 'stream'")
    parser.add_argument("--paths", default="bucketed,per_arch", help="bucketed and/or per_arch")
    parser.add_argument("--steps", type=int, default=200, help="N steps per run")
    parser.add_argument("--per-arch-steps", type=int, default=0, help="cap N for per_arch runs")
    parser.add_argument("--meta-batch", type=int, default=2, help="m: architectures per step")
    parser.add_argument(
        "--buckets", type=int, default=6, help="archs.buckets of the bucketed path (base default)"
    )
    parser.add_argument("--log-every", type=int, default=10, help="steps per measured window")
    parser.add_argument("--caches", default="cold", help="cold and/or warm")
    parser.add_argument("--ranges", default="", help="JSON overriding the sampler ranges")
    parser.add_argument(
        "--minutes", type=float, default=0.0, help="stop each run after this wall time (0: none)"
    )
    args = parser.parse_args()

    from common import emit, machine

    ranges = {**RANGES[args.config], **json.loads(args.ranges or "{}")}
    emit({"bench": "train_throughput", "machine": machine(), "config": args.config})
    for pool in args.pools.split(","):
        for path in args.paths.split(","):
            steps = args.steps
            if path == "per_arch" and args.per_arch_steps:
                steps = min(steps, args.per_arch_steps)
            with tempfile.TemporaryDirectory() as cache:
                for which in args.caches.split(","):
                    setting = {
                        "config": args.config,
                        "config_file": str(ROOT / "configs" / f"{args.config}.py"),
                        "ranges": ranges,
                        "pool": pool,
                        "path": path,
                        "steps": steps,
                        "meta_batch": args.meta_batch,
                        "buckets": args.buckets,
                        "log_every": args.log_every,
                        "minutes": args.minutes,
                        "cache": cache,
                    }
                    out = run_child(setting)
                    setting = {
                        k: v for k, v in setting.items() if k not in ("config_file", "cache")
                    }
                    emit({"bench": "train_throughput", "cache": which, **setting, **out})


if __name__ == "__main__":
    main()
