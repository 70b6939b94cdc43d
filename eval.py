"""Predicted against random init: no training, then fine-tuning with the same recipe.

    python eval.py --ghn vit-mnist --archs heldout,larger,vit-ti:patch_size=7 --workdir runs/eval
    python eval.py --ghn runs/vit_mnist --archs my_arch.json --steps 500 --workdir runs/eval2

--ghn is a shipped GHN's name (`python -m ghn list`), a directory written
by `ghn.save` / `python -m ghn export`, or a train.py workdir.

--archs is a comma-separated list of:
  heldout, larger   the held-out / larger-than-training architectures of the
                    GHN's own training run (rebuilt from its config);
  PRESET[:k=v;...]  a zoo preset (`ghn.zoo.presets()`) with fields changed,
                    e.g. `vit-ti:patch_size=7` or `gpt2:depth=6`;
  FILE.json         a spec (`spec.to_json()`), a list of specs, or an
                    architecture dataset (its held-out split).
Fields the data fixes (classes, image size, vocabulary, context) are set from
the dataset.

Writes to --workdir: results.json and results.md (metrics at step 0, N/10, N
and the speed-up), curves/<arch>.png, curves.json, and predicted/<arch>/ (the
predicted parameters as an Orbax checkpoint a plain Flax user can restore,
with predicted/<arch>.json, the spec that builds it).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from absl import app, flags, logging

_GHN = flags.DEFINE_string("ghn", None, "Shipped GHN name, exported GHN directory or workdir.")
_ARCHS = flags.DEFINE_string("archs", "heldout,larger", "Target architectures (see above).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where tables, plots and parameters go.")
_STEPS = flags.DEFINE_integer("steps", 200, "Fine-tuning steps N.")
_LR = flags.DEFINE_float("lr", 1e-3, "Fine-tuning peak learning rate (AdamW).")
_WD = flags.DEFINE_float("weight_decay", 1e-2, "Fine-tuning AdamW weight decay.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 10, "Fine-tuning warm-up steps.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Fine-tuning batch size.")
_EVAL_BATCHES = flags.DEFINE_integer(
    "eval_batches", 4, "Validation batches per evaluation (0: the whole split)."
)
_EVAL_BATCH_SIZE = flags.DEFINE_integer("eval_batch_size", 250, "Validation batch size.")
_SEED = flags.DEFINE_integer("seed", 0, "Random-init, data-order and prediction seed.")
_PAPER_PARITY = flags.DEFINE_string(
    "paper_parity_ghn", None, "Also fine-tune from this (paper_parity) GHN's prediction."
)
_NOISE = flags.DEFINE_list(
    "noise_mix",
    [],
    "Also fine-tune from sqrt(1-a^2)*predicted + a*random for each a (e.g. 0.5): full-rank "
    "variants of the low-rank prediction.",
)
_DATA = flags.DEFINE_string("data", None, "Dataset name; default: the GHN's training data.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Text datasets: sequence length (default: GHN's).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where local datasets live.")
flags.mark_flags_as_required(["ghn", "workdir"])


def parse_archs(text: str, info: dict, setup) -> list:
    """The target specs named by --archs."""
    from ghn import zoo
    from ghn.evaluate import training_pools

    specs = []
    pools = None
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        if item in ("heldout", "larger"):
            if pools is None:
                try:
                    pools = training_pools(info)
                except ValueError as e:
                    raise app.UsageError(f"{item!r}: {e}") from e
            specs += list(pools.heldout if item == "heldout" else pools.larger)
        elif item.endswith(".json"):
            doc = json.loads(Path(item).read_text())
            if isinstance(doc, dict) and "heldout" in doc:
                specs += list(zoo.load_dataset(item)["heldout"])
            elif isinstance(doc, list):
                specs += [zoo.spec_from_json(d) for d in doc]
            else:
                specs.append(zoo.spec_from_json(doc))
        else:
            name, _, changes = item.partition(":")
            overrides = {}
            for kv in [c for c in changes.split(";") if c]:
                k, _, v = kv.partition("=")
                overrides[k] = json.loads(v) if v[:1] in "-0123456789[tfn" else v
            specs.append(zoo.get(name, **overrides))
    if not specs:
        raise app.UsageError("--archs named no architectures")
    return [setup.fit(s) for s in specs]


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import ghn
    from ghn import evaluate

    workdir = Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    hyper, info = ghn.load(_GHN.value, with_info=True)
    kw = {"data_dir": _DATA_DIR.value} if _DATA_DIR.value else {}
    if _DATA.value:
        setup = evaluate.Setup.from_name(_DATA.value, seq_len=_SEQ_LEN.value, **kw)
    else:
        setup = evaluate.Setup.from_ghn_info(info, **kw)
    specs = parse_archs(_ARCHS.value, info, setup)
    baselines = {}
    if _PAPER_PARITY.value:
        baselines["paper_parity"] = ghn.load(_PAPER_PARITY.value)
    recipe = evaluate.Recipe(
        steps=_STEPS.value,
        lr=_LR.value,
        weight_decay=_WD.value,
        warmup_steps=_WARMUP.value,
        batch_size=_BATCH.value,
        seed=_SEED.value,
        eval_batch_size=_EVAL_BATCH_SIZE.value,
        eval_batches=_EVAL_BATCHES.value,
    )
    # Every target must fit the GHN (e.g. its max_dim): fail now, not after hours of fine-tuning.
    for spec in specs:
        check_fits(hyper, spec, setup)
    for ghn_name, other in baselines.items():
        for spec in specs:
            check_fits(other, spec, setup, ghn_name)
    rows, curves = [], {}
    (workdir / "curves").mkdir(exist_ok=True)
    start = time.perf_counter()
    for i, spec in enumerate(specs):
        print(f"[{i + 1}/{len(specs)}] {spec.name}", flush=True)
        result = evaluate.compare(
            hyper,
            spec,
            setup,
            recipe,
            baseline_ghns=baselines,
            noise_mixes=[float(a) for a in _NOISE.value],
            progress=True,
        )
        rows += result.rows()
        curves[spec.name] = {k: vars(c) for k, c in result.curves.items()}
        evaluate.plot(result, workdir / "curves" / f"{spec.name}.png")
        out = evaluate.save_params(result.predicted_params, workdir / "predicted" / spec.name)
        (out.parent / f"{spec.name}.json").write_text(json.dumps(spec.to_json(), indent=2) + "\n")
        for r in result.rows():
            print("   ", evaluate.format_row(r, setup.task.metric), flush=True)
        # Written after every target, so an interrupted run keeps what it finished.
        record = {
            "ghn": _GHN.value,
            "ghn_source": info.get("source"),
            "data": setup.train.name,
            "metric": setup.task.metric,
            "recipe": dataclasses.asdict(recipe),
            "seconds": round(time.perf_counter() - start, 1),
            "rows": rows,
        }
        (workdir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
        (workdir / "curves.json").write_text(json.dumps(curves) + "\n")
        table = evaluate.markdown_table(rows, setup.task.metric)
        (workdir / "results.md").write_text(
            f"GHN `{_GHN.value}` on {setup.train.name}, N = {recipe.steps} fine-tuning steps "
            f"(lr {recipe.lr}, batch {recipe.batch_size}, seed {recipe.seed}).\n\n" + table
        )
    print(table)
    print(f"wrote {workdir}/results.json, results.md, curves/, predicted/")


def check_fits(hyper, spec, setup, label: str = "--ghn") -> None:
    from flax import nnx

    from ghn.hypernet.predict import check_width, prepare

    model = nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))
    try:
        prepared = prepare(model, (setup.input_spec(spec),), hyper.config)
        check_width(prepared.plan, hyper.config)
    except ValueError as e:
        raise app.UsageError(f"{spec.name} does not fit the {label} GHN: {e}") from e


if __name__ == "__main__":
    app.run(main)
