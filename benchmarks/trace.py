"""Graph tracing cost per preset: nodes, edges, seconds, peak RSS.

Each preset runs in a fresh subprocess so peak RSS is its own. Models are
abstract (`nnx.eval_shape`): no weights are allocated.

    python benchmarks/trace.py [preset ...]
"""

import json
import subprocess
import sys

PRESETS = [
    "vit-ti",
    "vit-s",
    "vit-b",
    "vit-l",
    "gpt2",
    "gpt2-medium",
    "gpt2-large",
    "gpt2-xl",
    "resnet18",
    "resnet50",
]

CHILD = r"""
import json, sys
sys.path.insert(0, "benchmarks")
from common import Timer, machine, peak_rss_mb
from flax import nnx
import ghn
name = sys.argv[1]
spec = ghn.zoo.get(name)
rss0 = peak_rss_mb()
with Timer() as t_build:
    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
x = spec.input_spec(batch_size=1)
with Timer() as t_first:
    g = ghn.trace(model, x)
with Timer() as t_second:
    g = ghn.trace(model, x)
print(json.dumps({"bench": "trace", "preset": name, "nodes": g.num_nodes, "edges": g.num_edges,
    "params": g.num_params, "trace_s": round(t_first.seconds, 3),
    "trace_again_s": round(t_second.seconds, 3), "abstract_build_s": round(t_build.seconds, 3),
    "rss_before_mb": round(rss0), "peak_rss_mb": round(peak_rss_mb()), **machine()}))
"""


def main():
    names = [a for a in sys.argv[1:] if not a.startswith("-")] or PRESETS
    for name in names:
        out = subprocess.run([sys.executable, "-c", CHILD, name], capture_output=True, text=True)
        if out.returncode != 0:
            print(json.dumps({"bench": "trace", "preset": name, "error": out.stderr[-2000:]}))
            continue
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
