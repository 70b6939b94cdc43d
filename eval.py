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

--baselines mimetic adds a row per target fine-tuned from mimetic init
(`ghn.baselines.mimetic_init`: the family's random init with self-attention set
to query-key ~ +identity, value-output ~ -identity), same recipe and seeds.

A prediction is prepared before step 0 (`ghn.calibrate.prepare`), on 4
training batches and against the random init it replaces:
--blocks (default auto) keeps the predicted blocks only when they carry at
least half of the prediction's gain over the random init there, else takes
the random init's blocks under the predicted stem and head
(`ghn.calibrate.keep_blocks`); then the random init is added to every
predicted matrix, predicted + a x random with a = --mix (default auto: 0 for a
target of a family the GHN trained on, predicted at its own width; otherwise
1, the random init at its full scale, which tells a widened prediction's copied
units apart; --combine=blend makes it sqrt(1 - a^2) x predicted + a x random
instead); then --temper; then the
fine-tuning probe (--probe_steps, default N/10): the prepared prediction and the
random init are each fine-tuned for the first N/10 steps of the recipe and
scored on the 8 training batches that follow, and the random init is taken
unless the prediction scores lower by more than the standard error of the
per-batch differences (the row then says "probe: random init" and its curve
is the random init's run). A prediction can start far
below random init and still fine-tune slower (GPT-2s wider than the GHN's
training); the loss at step 0 cannot tell, the start of fine-tuning can. --raw
adds a row for the prediction as the GHN made it.

--widen (default auto): a ViT or GPT-2 wider than every architecture the GHN
trained on is predicted at the widest trained width its width is an integer
multiple of and widened to its own width, computing the same function
(`ghn.zoo.widen`); the table says "widened from ...". The decoder has no
trained parameters past its training widths, so predicted directly such a
target's blocks are worse than random ones (RESULTS.md, "Widening by
default"); --widen never predicts it directly.

--temper (default auto) holds a prediction to the random init it replaces: when
its loss on 4 training batches is above the random init's there, its output
layer is scaled by the alpha in [0, 1] that minimizes the loss
(`ghn.calibrate.safeguard`), and when even that is above the random init's (a
random init can beat the uniform guess: GPT-2's does by ~0.15 nats), it is
blended toward the random init, b x tempered + (1 - b) x random, with the b in
[0, 1] of least loss there. Every prediction at least as good as the random init
is left as predicted (tempering a good one slows its fine-tuning).
--temper=always tempers every prediction, --temper=never none. The saved
parameters are the prepared ones, and the tables show what preparing did
("random blocks", "+ random" or "mix a", the factor x alpha, the blend weight
blend b).

Writes to --workdir: results.json and results.md (metrics at step 0, N/10, N
and the speed-up), curves/<arch>.png, curves.json, and predicted/<arch>/ (the
predicted parameters as an Orbax checkpoint a plain Flax user can restore,
with predicted/<arch>.json, the spec that builds it).
"""

from __future__ import annotations

import dataclasses

from absl import flags, logging

from ghn.errors import ConfigError, run_absl

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
_COMPARE = flags.DEFINE_list(
    "compare_ghns",
    [],
    "Also fine-tune from these GHNs' predictions, as LABEL=GHN (comma list; GHN as for "
    "--ghn), e.g. transpose=runs/dec_transpose to compare two decoders.",
)
_BLOCKS = flags.DEFINE_enum(
    "blocks",
    "auto",
    ["auto", "predicted", "random"],
    "Predicted blocks or the random init's (every parameter under an integer key, e.g. "
    "blocks[3]) under the predicted stem and head. auto: predicted only when they carry at "
    "least half of the prediction's gain over the random init on 4 training batches "
    "(ghn.calibrate.keep_blocks).",
)
_MIX = flags.DEFINE_string(
    "mix",
    "auto",
    "Weight a of the random init combined with every predicted matrix (0: the prediction "
    "alone), see --combine; auto: 0 for a target of a family the GHN trained on, predicted "
    "at its own width; 1 otherwise (widened predictions: the random init tells their copied "
    "units apart; other families: it lets the probe see a prediction that fine-tunes "
    "slowly).",
)
_COMBINE = flags.DEFINE_enum(
    "combine",
    "add",
    ["add", "blend"],
    "add: predicted + a*random (the random init at full scale under the prediction); "
    "blend: sqrt(1-a^2)*predicted + a*random (a in [0, 1]).",
)
_RAW = flags.DEFINE_bool(
    "raw",
    False,
    "Also fine-tune from the prediction as the GHN made it (row 'raw': predicted blocks, "
    "no mix, no tempering).",
)
_NOISE = flags.DEFINE_list(
    "noise_mix",
    [],
    "Also fine-tune from the prediction prepared with each of these mix weights (rows "
    "'predicted+noise<a>'; blocks, tempering and --combine as for the main row).",
)
_BASELINES = flags.DEFINE_list(
    "baselines",
    [],
    "Also fine-tune from these closed-form inits of the same random init (comma list; "
    "`mimetic`: Trockman & Kolter 2023's attention init, ViTs and GPT-2s).",
)
_TEMPER = flags.DEFINE_enum(
    "temper",
    "auto",
    ["auto", "always", "never"],
    "Temper predictions' output layer on 4 training batches (ghn.calibrate): logits "
    "scaled by the alpha in [0, 1] with the least loss. auto: only predictions worse "
    "than the random init there (confidently wrong: new data, an architecture far "
    "from training), blended toward the random init when tempering is not enough "
    "(ghn.calibrate.safeguard); always: every prediction; never: none.",
)
_PROBE = flags.DEFINE_integer(
    "probe_steps",
    -1,
    "Fine-tuning probe (ghn.evaluate.make_probe): the prepared prediction and the random "
    "init are each fine-tuned for this many steps of the recipe and scored on the next 8 "
    "training batches; the random init is taken unless the prediction scores lower by "
    "more than the standard error of the per-batch differences. -1: "
    "N/10; 0: no probe.",
)
_WIDEN = flags.DEFINE_enum(
    "widen",
    "auto",
    ["auto", "never"],
    "auto: a ViT or GPT-2 wider than every architecture the GHN trained on is predicted at "
    "the widest trained width it is an integer multiple of, and widened to its own width "
    "computing the same function (ghn.zoo.widen: units copied, readers divided; the "
    "preparation's '+ random' breaks the copies' symmetry); targets the GHN records no "
    "trained width for are predicted at their own width. never: predicted at its own width "
    "(the GHN's decoder has no trained parameters past its training widths; RESULTS.md, "
    "'Widening by default').",
)
_DATA = flags.DEFINE_string("data", None, "Dataset name; default: the GHN's training data.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Text datasets: sequence length (default: GHN's).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where local datasets live.")
flags.mark_flags_as_required(["ghn", "workdir"])


def _mix(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"--mix takes a number or auto, got {value!r}") from None


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import ghn
    from ghn import evaluate
    from ghn.zoo import widen

    hyper, info = ghn.load(_GHN.value, with_info=True)
    other_ghns = {}
    for entry in _COMPARE.value:
        label, sep, where = entry.partition("=")
        if not sep or not label or not where:
            raise ValueError(f"--compare_ghns takes LABEL=GHN entries, got {entry!r}")
        other_ghns[label] = ghn.load(where)
    kw = {"data_dir": _DATA_DIR.value} if _DATA_DIR.value else {}
    setup = evaluate.Setup.from_ghn_info(info, _DATA.value, seq_len=_SEQ_LEN.value, **kw)
    specs = evaluate.resolve_archs(_ARCHS.value, info, setup)
    widths = evaluate.trained_widths(info) if _WIDEN.value == "auto" else None
    widenable = any(isinstance(s, widen.FAMILIES) for s in specs)
    if _WIDEN.value == "auto" and not widths and widenable:
        logging.warning(
            "%s records no ViT or GPT-2 widths it was trained on (no training config, or no "
            "ViTs or GPT-2s in it): every target is predicted at its own width",
            _GHN.value,
        )
    # Every target must fit every GHN: fail now, not after hours of fine-tuning.
    for label, other in [("--ghn", hyper), *other_ghns.items()]:
        for spec in specs:
            evaluate.check_fits(other, spec, setup, label, widths=widths)
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
    policy = evaluate.Policy(
        blocks=_BLOCKS.value,
        mix=_mix(_MIX.value),
        temper_mode=_TEMPER.value,
        combine=_COMBINE.value,
        probe_steps=_PROBE.value,
    )
    variants = {"raw": evaluate.RAW} if _RAW.value else {}
    for a in map(float, _NOISE.value):
        variants[f"predicted+noise{a:g}"] = dataclasses.replace(policy, mix=a)
    evaluate.run(
        hyper,
        specs,
        setup,
        recipe,
        _WORKDIR.value,
        ghn_name=_GHN.value,
        ghn_source=info.get("source"),
        policy=policy,
        variants=variants,
        baseline_ghns=other_ghns,
        baselines=_BASELINES.value,
        widths=widths,
        families=evaluate.trained_families(info),
    )


if __name__ == "__main__":
    run_absl(main)
