"""Prediction cost per preset, each in a fresh subprocess (so peak RSS is its own).

Per preset, from a fresh process with JAX's persistent compilation cache off:
import and GHN construction seconds, trace seconds, the first predict (its
programs compiled, then run) and the warm predict, `cold_total_s` (process start
to every parameter predicted, what a one-shot user waits for), peak RSS, predicted
bytes; then a second architecture of the same family in the same process (first
call and warm call, `second_over_warm`); and, afterwards, the seconds the family's
own random init of the same model takes.

    python benchmarks/predict.py [preset ...] [--config tiny] [--factors view|transpose]

A preset name with ":untied" (e.g. gpt2-large:untied) predicts that GPT-2 with its own
output head instead of the tied token embedding (GPT-2 Large: 838M parameters).

On a VM whose memory the hypervisor backs lazily, the first process to write gigabytes
after an idle minute pays slow page faults whatever it computes (BENCHMARKS.md measured
6 GB of `np.ones` at 16-17 s after an idle minute, 1.6-3.8 s right after another run):
compare cold totals of runs made back to back, and say which.
"""

import json
import subprocess
import sys
import time

PRESETS = ["vit-s", "vit-b", "vit-l", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
# The architecture predicted second in the same process.
SECOND = {
    "vit-s": "vit-b",
    "vit-b": "vit-s",
    "vit-l": "vit-b",
    "gpt2": "gpt2-medium",
    "gpt2-medium": "gpt2",
    "gpt2-large": "gpt2-medium",
    "gpt2-xl": "gpt2-large",
}

CHILD = r"""
import json, sys, time
sys.path.insert(0, "benchmarks")
from common import RSSSampler, Timer, machine, peak_rss_mb
with Timer() as t_import:
    import jax
    from flax import nnx
    import ghn
    from ghn.hypernet import predict as predict_lib

name, second, size, factors = sys.argv[1:5]
start = float(sys.argv[5])
with Timer() as t_ghn:
    hyper = ghn.GHN(ghn.GHNConfig.named(size, factors=factors), rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(hyper))
compiled = []
_compile_all = predict_lib._compile_all
predict_lib._compile_all = lambda jobs: compiled.append(_compile_all(jobs)) or compiled[-1]


def first_and_warm(spec):
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    x = spec.input_spec(batch_size=1)
    with Timer() as t_trace:
        predict_lib.prepare(model, (x,), hyper.config)
    with Timer() as t_first:
        params = jax.block_until_ready(hyper.predict(model, x))
    done = time.time()
    del params
    with RSSSampler() as rss, Timer() as t_warm:
        params = jax.block_until_ready(hyper.predict(model, x))
    return model, params, t_trace.seconds, t_first.seconds, done, t_warm.seconds, rss


def get(name):
    base, _, variant = name.partition(":")
    spec = ghn.zoo.get(base)
    return spec.replace(tie_embeddings=False) if variant == "untied" else spec


spec = get(name)
model, params, trace_s, first_s, done, warm_s, rss = first_and_warm(spec)
programs = sum(compiled)
nbytes = sum(v.nbytes for v in jax.tree.leaves(params))
del params
_, params2, _, second_first, _, second_warm, _ = first_and_warm(get(second))
del params2
peak_lifetime = peak_rss_mb()
with Timer() as t_random:
    m = spec.build(rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(m))
print(json.dumps({"bench": "predict", "preset": name, "ghn": size, "factors": factors,
    "params": spec.num_params(), "predicted_mb": round(nbytes / 2**20),
    "import_s": round(t_import.seconds, 3), "ghn_init_s": round(t_ghn.seconds, 3),
    "trace_s": round(trace_s, 3), "programs_compiled": programs,
    "first_predict_s": round(first_s, 3), "warm_predict_s": round(warm_s, 3),
    "cold_total_s": round(done - start, 2),
    "second": second, "second_first_s": round(second_first, 3),
    "second_warm_s": round(second_warm, 3),
    "second_over_warm": round(second_first / second_warm, 2),
    "second_programs_compiled": sum(compiled) - programs,
    "lifetime_peak_rss_mb": round(peak_lifetime),
    "rss_before_predict_mb": round(rss.start_mb), "predict_peak_rss_mb": round(rss.peak_mb),
    "predict_extra_over_predicted": round((rss.peak_mb - rss.start_mb) / (nbytes / 2**20), 2),
    "random_init_s": round(t_random.seconds, 3),
    "predict_over_random_init": round(warm_s / t_random.seconds, 3), **machine()}))
"""


def main():
    args = sys.argv[1:]
    options = {"--config": "tiny", "--factors": "view"}
    for flag in options:
        if flag in args:
            i = args.index(flag)
            options[flag] = args[i + 1]
            del args[i : i + 2]
    size, factors = options.values()
    for name in args or PRESETS:
        # The process's start as the parent saw it: psutil's create_time counts from the
        # boot time in whole seconds (/proc/stat), up to 1 s off.
        cmd = [
            sys.executable,
            "-c",
            CHILD,
            name,
            SECOND[name.partition(":")[0]],
            size,
            factors,
            repr(time.time()),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(json.dumps({"bench": "predict", "preset": name, "error": out.stderr[-3000:]}))
            continue
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
