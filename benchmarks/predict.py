"""Prediction cost per preset, each in a fresh subprocess (so peak RSS is its own).

Per preset: trace seconds, compile seconds, warm predict seconds, peak RSS
during prediction, predicted bytes, and, in the same process afterwards, the
seconds the family's own random init of the same model takes.

    python benchmarks/predict.py [preset ...] [--config tiny]
"""

import json
import subprocess
import sys

PRESETS = ["vit-s", "vit-b", "vit-l", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]

CHILD = r"""
import json, sys, time
sys.path.insert(0, "benchmarks")
from common import RSSSampler, Timer, machine, peak_rss_mb
import jax
from flax import nnx
import ghn
from ghn.hypernet.predict import _compiled, prepare

name, size = sys.argv[1], sys.argv[2]
spec = ghn.zoo.get(name)
with Timer() as t_ghn:
    hyper = ghn.GHN(ghn.GHNConfig.named(size), rngs=nnx.Rngs(0))
graphdef, state = nnx.split(hyper)
with Timer() as t_abstract:
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
x = spec.input_spec(batch_size=1)
with Timer() as t_trace:
    prep = prepare(model, (x,), hyper.config)
with Timer() as t_compile:
    fn = _compiled(graphdef, prep.plan, None)
    compiled = fn.lower(state, prep.batch).compile()
with Timer() as t_first:
    jax.block_until_ready(hyper.predict(model, x))
times = []
params = None
for _ in range(2):
    del params  # keep one set of predicted parameters alive at a time
    with RSSSampler() as rss, Timer() as t:
        params = hyper.predict(model, x)
        jax.block_until_ready(params)
    times.append(t.seconds)
nbytes = sum(v.nbytes for v in jax.tree.leaves(params))
peak_lifetime = peak_rss_mb()
del params
with Timer() as t_random:
    m = spec.build(rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(m))
warm = min(times)
print(json.dumps({"bench": "predict", "preset": name, "ghn": size,
    "params": spec.num_params(), "predicted_mb": round(nbytes / 2**20),
    "abstract_build_s": round(t_abstract.seconds, 3), "trace_s": round(t_trace.seconds, 3),
    "compile_s": round(t_compile.seconds, 3), "first_predict_s": round(t_first.seconds, 3),
    "warm_predict_s": round(warm, 3), "lifetime_peak_rss_mb": round(peak_lifetime),
    "rss_before_predict_mb": round(rss.start_mb), "predict_peak_rss_mb": round(rss.peak_mb),
    "predict_extra_over_predicted": round((rss.peak_mb - rss.start_mb) / (nbytes / 2**20), 2),
    "random_init_s": round(t_random.seconds, 3),
    "predict_over_random_init": round(warm / t_random.seconds, 3), **machine()}))
"""


def main():
    args = sys.argv[1:]
    size = "tiny"
    if "--config" in args:
        i = args.index("--config")
        size = args[i + 1]
        del args[i : i + 2]
    for name in args or PRESETS:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, name, size], capture_output=True, text=True
        )
        if out.returncode != 0:
            print(json.dumps({"bench": "predict", "preset": name, "error": out.stderr[-3000:]}))
            continue
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
