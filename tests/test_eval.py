"""Trained GHNs on disk (ghn.load / ghn.save / export) and eval.py's comparison of inits."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from test_train_common import ROOT, env, tiny_config
from tolerances import assert_close, predict_reduction, transformer_reduction

import ghn
from ghn import cli, evaluate, hub, params, zoo
from ghn.calibrate import output_scale_paths
from ghn.errors import ConfigError
from ghn.train import run


def flat(tree) -> dict[str, np.ndarray]:
    """Leaves by path "a/0/b" (Orbax restores integer keys as strings)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    name = lambda e: str(getattr(e, "key", getattr(e, "idx", e)))
    return {"/".join(name(e) for e in p): np.asarray(x) for p, x in leaves}


def ghn_params(hyper) -> dict[str, np.ndarray]:
    return flat(nnx.to_pure_dict(nnx.state(hyper, nnx.Param)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 3-step training run with an EMA: its checkpoint holds params and ema."""
    path = tmp_path_factory.mktemp("run")
    run(tiny_config({"num_steps": 3}), path)
    return path


def checkpoint_state(workdir):
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "3" / "state")


def test_load_from_a_workdir_reads_the_latest_checkpoint(workdir):
    saved = checkpoint_state(workdir)
    hyper, info = ghn.load(workdir, with_info=True)
    assert info["step"] == 3 and info["weights"] == "ema"
    assert info["train_config"]["data"]["name"] == "mnist5k"
    got, want = ghn_params(hyper), flat(saved["ema"])
    assert got.keys() == want.keys()
    for k in want:
        # Restored from the checkpoint: a copy, no arithmetic, so bitwise.
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # EMA and raw parameters differ after 3 steps; use_ema=False reads the raw ones.
    raw = ghn_params(ghn.load(workdir, use_ema=False))
    assert any(not np.array_equal(raw[k], want[k]) for k in want)
    for k, v in flat(saved["params"]).items():
        np.testing.assert_array_equal(raw[k], v, err_msg=k)  # a copy, as above


def test_export_save_and_load_round_trip_and_errors(workdir, tmp_path):
    out = hub.export(workdir, tmp_path / "exported", description="test")
    record = json.loads((out / "ghn.json").read_text())
    assert record["metadata"]["description"] == "test"
    assert record["metadata"]["train_step"] == 3
    assert record["ghn_config"]["d_model"] == 32
    a, b = ghn_params(ghn.load(workdir)), ghn_params(ghn.load(out))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # saved and read back: copies
    assert hub.info(out)["metadata"]["train_config"]["seed"] == 0

    with pytest.raises(FileExistsError, match="already holds a GHN"):
        ghn.save(ghn.load(out), out)
    with pytest.raises(hub.GHNNotFoundError, match="not a shipped name"):
        ghn.load(tmp_path / "nowhere")
    with pytest.raises(hub.GHNNotFoundError, match="available: "):
        ghn.load("no-such-ghn")
    # Parameters of another config: a clear error naming the mismatch.
    cfg = json.loads((out / "ghn.json").read_text())
    cfg["ghn_config"]["d_model"] = 48
    (out / "ghn.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="could not be restored|shape"):
        ghn.load(out)
    # A directory whose parameter files are gone.
    cfg["ghn_config"]["d_model"] = 32
    (out / "ghn.json").write_text(json.dumps(cfg))
    for f in (out / "params").rglob("*"):
        if f.is_file() and "manifest" in f.name:
            f.unlink()
    with pytest.raises(ValueError, match="incomplete or corrupt"):
        ghn.load(out)


def test_a_ghn_stored_in_float16_loads_as_float32_and_takes_half_the_space(workdir, tmp_path):
    full = hub.export(workdir, tmp_path / "f32")
    cli.main(["export", str(workdir), str(tmp_path / "f16"), "--dtype", "float16"])
    half, record = ghn.load(tmp_path / "f16", with_info=True)
    assert record["storage_dtype"] == "float16" and "storage_dtype" not in hub.info(full)
    want = ghn_params(ghn.load(full))
    got = ghn_params(half)
    for k, v in want.items():
        assert got[k].dtype == v.dtype == np.float32, k
        np.testing.assert_array_equal(got[k], v.astype(np.float16).astype(np.float32), err_msg=k)
    size = lambda d: sum(f.stat().st_size for f in (d / "params").rglob("*") if f.is_file())
    assert size(tmp_path / "f16") < 0.6 * size(full)
    # The prediction moves by float16's rounding of the GHN, not more.
    vit = dict(depth=1, width=16, num_heads=2, patch_size=7, image_size=28, in_channels=1)
    spec = zoo.get("vit-ti", **vit, num_classes=10)
    model = spec.build(rngs=nnx.Rngs(0))
    a = flat(nnx.to_pure_dict(ghn.load(full).predict(model, spec.input_spec())))
    b = flat(nnx.to_pure_dict(half.predict(model, spec.input_spec())))
    for k in a:
        scale = float(np.abs(a[k]).max()) + 1e-12
        assert float(np.abs(a[k] - b[k]).max()) <= 0.05 * scale, k
    with pytest.raises(ConfigError, match="storage_dtype"):
        ghn.save(half, tmp_path / "bf16", storage_dtype="bfloat16")
    hyper = ghn.load(full)  # a parameter past float16's range is refused, not clipped
    state = nnx.state(hyper, nnx.Param)
    state = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(1e6) if x.ndim else x, state)
    nnx.update(hyper, state)
    with pytest.raises(ConfigError, match="past float16's range"):
        ghn.save(hyper, tmp_path / "big", storage_dtype="float16")
    assert not (tmp_path / "big").exists()


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A 4-step run with an EMA that keeps the checkpoints of steps 2 and 4."""
    path = tmp_path_factory.mktemp("run2")
    run(tiny_config({"num_steps": 4, "checkpoint.every": 2, "checkpoint.max_to_keep": 2}), path)
    return path


def test_checkpoints_lists_the_steps_and_load_reads_any_of_them(two_checkpoints, tmp_path):
    workdir = two_checkpoints
    assert ghn.checkpoints(workdir) == [2, 4]
    first, info = ghn.load(workdir, step=2, with_info=True)
    latest, latest_info = ghn.load(workdir, with_info=True)
    assert info["step"] == 2 and latest_info["step"] == 4 and info["weights"] == "ema"
    got, latest = ghn_params(first), ghn_params(latest)
    assert any(not np.array_equal(got[k], latest[k]) for k in got)
    saved = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "2" / "state")
    for k, v in flat(saved["ema"]).items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    raw = ghn_params(ghn.load(workdir, step=2, use_ema=False))
    for k, v in flat(saved["params"]).items():
        np.testing.assert_array_equal(raw[k], v, err_msg=k)

    with pytest.raises(hub.GHNNotFoundError, match=r"no checkpoint of step 3; .* \[2, 4\]"):
        ghn.load(workdir, step=3)
    with pytest.raises(hub.GHNNotFoundError, match="no checkpoints/"):
        ghn.checkpoints(tmp_path)
    # `python -m ghn export --step`: that checkpoint, which then has no steps of its own.
    cli.main(["export", str(workdir), str(tmp_path / "exported"), "--step", "2"])
    exported, record = ghn.load(tmp_path / "exported", with_info=True)
    assert record["metadata"]["train_step"] == 2
    for k, v in ghn_params(exported).items():
        np.testing.assert_array_equal(v, got[k], err_msg=k)
    with pytest.raises(ValueError, match="step=2 selects a checkpoint of a train.py workdir"):
        ghn.load(tmp_path / "exported", step=2)


def test_eval_points_and_speedup():
    assert evaluate.eval_points(200) == list(range(0, 201, 10))
    pts = evaluate.eval_points(7)
    assert {0, 1, 7} <= set(pts) and pts == sorted(set(pts))

    def curve(losses, steps=100):
        pts = evaluate.eval_points(steps)
        return evaluate.Curve("x", pts, list(losses), [0.0] * len(pts), [])

    n = len(evaluate.eval_points(100))  # 0, 5, ..., 100
    predicted = curve([1.0] * n)  # loss 1.0 at N/10 = step 10
    # Random reaches 1.0 halfway between steps 40 (1.2) and 45 (0.8): 42.5 steps -> 4.25x.
    losses = [2.0 - 0.1 * i for i in range(9)] + [0.8] * (n - 9)
    assert evaluate.speedup(predicted, curve(losses)) == pytest.approx(4.25)
    assert evaluate.speedup(predicted, curve([1.5] * n)) is None  # never reached
    assert evaluate.speedup(predicted, curve([0.5] * n)) == 0.0  # random is better at once


def test_markdown_table_shows_every_init_and_the_speedup():
    rows = [
        {"arch": "a", "num_params": 1234, "init": "predicted", "steps": 10, "speedup": None},
        {"arch": "a", "num_params": 1234, "init": "random", "steps": 10, "speedup": None},
    ]
    for r in rows:
        for label in ("0", "n10", "n"):
            r[f"loss_{label}"], r[f"accuracy_{label}"] = 1.0, 0.5
    table = evaluate.markdown_table(rows, "accuracy")
    lines = table.strip().splitlines()
    assert len(lines) == 4 and "accuracy @N/10" in lines[0] and "1,234" in lines[2]
    assert "not reached" in lines[2] and "not reached" not in lines[3]


def test_finetune_sees_the_same_data_and_learns():
    setup = evaluate.Setup.from_name("mnist5k")
    spec = setup.fit(zoo.get("vit-ti", depth=1, width=32, num_heads=2, patch_size=7))
    recipe = evaluate.Recipe(steps=12, lr=3e-3, warmup_steps=0, batch_size=32, eval_batches=1)
    # Every init is fine-tuned on the same batches in the same order.
    a, b = setup.train_iterator(recipe), setup.train_iterator(recipe)
    for _ in range(3):
        x, y = next(a), next(b)
        assert all(np.array_equal(x[k], y[k]) for k in x)  # same NumPy code, same seed
    curves = [
        evaluate.finetune(spec.build(rngs=nnx.Rngs(0)), setup, recipe, init="random")
        for _ in range(2)
    ]
    # Same init, same first batch: the same first loss, bitwise (the same program,
    # compiled twice, on the same machine). (Later steps agree only up to float
    # round-off, which Adam amplifies where gradients are near zero.)
    assert curves[0].train_loss[0] == curves[1].train_loss[0]
    assert curves[0].eval_loss[0] == curves[1].eval_loss[0]
    assert curves[0].eval_steps == evaluate.eval_points(12)
    assert len(curves[0].train_loss) == 12
    assert curves[0].eval_loss[-1] < curves[0].eval_loss[0] - 0.05


def test_batchnorm_models_fine_tune_and_are_read_with_batch_statistics():
    """A cell network with BatchNorm fine-tunes and probes (its statistics are updated
    inside the gradient), and every evaluation point reads batch statistics: its
    running averages lag fine-tuning for ~100 steps whatever the init."""
    setup = evaluate.Setup.from_name("mnist5k")
    cells = dict(num_cells=(3, 3), nodes=(2, 2), width=(8, 8), norms=("bn",))
    spec = zoo.sample("cnns-1k", 1, seed=0, image_size=28, in_channels=1, num_classes=10, **cells)
    recipe = evaluate.Recipe(steps=4, lr=1e-3, warmup_steps=0, batch_size=16, num_points=4)
    model = spec[0].build(rngs=nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    scores = evaluate.make_probe(model, setup, recipe, 2, score_batches=2)(params)
    assert len(scores) == 2 and np.all(np.isfinite(scores))
    data = setup.eval_batches(dataclasses.replace(recipe, eval_batch_size=50, eval_batches=1))
    curve = evaluate.finetune(model, setup, recipe, init="random", eval_data=data)
    before = nnx.state(model, nnx.BatchStat)
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(before))  # were updated

    def loss(train: bool) -> float:
        m = nnx.clone(model)
        m.train() if train else m.eval()
        sums = setup.task.sums(m, jax.tree.map(jnp.asarray, data[0]))
        return float(sums["loss_sum"] / sums["count"])

    batch_stats, running = loss(True), loss(False)
    assert abs(batch_stats - running) > 0.05  # after 4 steps the two readings differ
    # The jitted evaluation against this eager one: the longest reduction is BatchNorm's
    # mean over the batch's 50 x 28 x 28 positions.
    assert_close(curve.eval_loss[-1], batch_stats, reduction=50 * 28 * 28, scale=batch_stats)


def test_probe_is_the_start_of_the_run_it_decides():
    """`make_probe` fine-tunes with the recipe's first steps (its batches, order and
    learning-rate schedule) and scores on the training batches that follow: exactly what
    `finetune` with the same recipe holds at that step on those batches."""
    setup = evaluate.Setup.from_name("mnist5k")
    spec = setup.fit(zoo.get("vit-ti", depth=1, width=32, num_heads=2, patch_size=7))
    recipe = evaluate.Recipe(steps=12, lr=3e-3, warmup_steps=4, batch_size=32, num_points=12)
    model = spec.build(rngs=nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    probe = evaluate.make_probe(model, setup, recipe, 3, score_batches=2)
    it = setup.train_iterator(recipe)
    after = [next(it) for _ in range(5)][3:]  # batches 3 and 4: never trained on by step 3
    curves = [
        evaluate.finetune(spec.build(rngs=nnx.Rngs(0)), setup, recipe, init="r", eval_data=[b])
        for b in after
    ]
    # The same compiled programs (`_programs` is shared) on the same inputs: bitwise.
    scores = probe(params)
    assert scores == [c.at(3)["loss"] for c in curves]
    assert scores[0] != curves[0].at(0)["loss"] and scores[0] != scores[1]
    _, train_step, _ = evaluate._programs(nnx.split(model, nnx.Param, ...)[0], setup.task, recipe)
    assert train_step._cache_size() == 1  # the probe and the run share one compilation
    # Another warm-up (another schedule) is another run: the probe follows the recipe.
    other = dataclasses.replace(recipe, warmup_steps=1)
    assert evaluate.make_probe(model, setup, other, 3, score_batches=2)(params) != probe(params)
    for steps in (0, 13):
        with pytest.raises(ConfigError, match="probe needs"):
            evaluate.make_probe(model, setup, recipe, steps)
    assert evaluate.Policy().probe_length(recipe) == 1  # N/10 by default
    assert evaluate.Policy(probe_steps=50).probe_length(recipe) == 12
    assert evaluate.RAW.probe_length(recipe) == 0
    with pytest.raises(ConfigError, match="probe_steps"):
        evaluate.Policy(probe_steps=-2)


def test_a_prediction_the_probe_rejects_is_the_random_init_run(monkeypatch):
    """When the probe scores the random init lower, the saved init is the random init and
    the prediction's row is the random init's run, labelled so."""
    setup = evaluate.Setup.from_name("mnist5k")
    spec = zoo.get("vit-ti", depth=1, width=32, num_heads=2, patch_size=7)
    recipe = evaluate.Recipe(steps=4, batch_size=16, eval_batch_size=50, eval_batches=1)
    hyper = ghn.GHN(ghn.GHNConfig.named("tiny", max_dim=512), rngs=nnx.Rngs(0))
    random = flat(nnx.to_pure_dict(nnx.state(setup.fit(spec).build(rngs=nnx.Rngs(0)), nnx.Param)))
    real = evaluate.make_probe
    seen = []

    def prefer_random(model, setup_, recipe_, steps, **kw):
        probe = real(model, setup_, recipe_, steps, **kw)

        def score(params):
            loss = probe(params)  # the real probe runs
            seen.append((steps, loss))
            is_random = all(
                np.array_equal(v, random[k]) for k, v in flat(nnx.to_pure_dict(params)).items()
            )
            return 0.0 if is_random else 1.0

        return score

    monkeypatch.setattr(evaluate, "make_probe", prefer_random)
    result = evaluate.compare(hyper, spec, setup, recipe)
    assert [s for s, _ in seen] == [1, 1] and np.isfinite([v for _, v in seen]).all()
    pred, rand = result.rows()
    assert pred["choice"] == "random"
    assert pred["probe_losses"] == {"prediction": 1.0, "random": 0.0, "stderr": 0.0}
    assert evaluate.init_label(pred) == "predicted, probe: random init"
    for key in ("loss_0", "loss_n10", "loss_n"):
        assert pred[key] == rand[key], key
    for k, v in flat(nnx.to_pure_dict(result.predicted_params)).items():
        np.testing.assert_array_equal(v, random[k], err_msg=k)


def test_eval_py_writes_tables_plots_and_restorable_parameters(workdir, tmp_path):
    out = tmp_path / "eval"
    cmd = [
        sys.executable,
        str(ROOT / "eval.py"),
        f"--ghn={workdir}",
        "--archs=heldout",
        "--steps=4",
        "--batch_size=16",
        "--eval_batches=1",
        "--eval_batch_size=50",
        "--baselines=mimetic",
        "--blocks=predicted",
        "--mix=0",
        "--temper=always",
        "--raw",
        "--noise_mix=0.5",
        "--combine=blend",
        "--probe_steps=0",  # the restored parameters below are the prediction's
        f"--workdir={out}",
    ]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "results.json").read_text())
    rows = record["rows"]
    assert [r["init"] for r in rows] == [
        "predicted",
        "raw",
        "predicted+noise0.5",
        "mimetic",
        "random",
    ]
    pred, raw, mixed, mimetic, rand = rows
    assert record["policy"] == {
        "blocks": "predicted",
        "mix": 0.0,
        "temper_mode": "always",
        "combine": "blend",
        "probe_steps": 0,
    }
    assert record["variants"]["raw"] == {
        "blocks": "predicted",
        "mix": 0.0,
        "temper_mode": "never",
        "combine": "add",
        "probe_steps": 0,
    }
    assert "choice" not in pred and "probe_losses" not in pred
    assert record["variants"]["predicted+noise0.5"]["mix"] == 0.5
    assert record["metric"] == "accuracy" and record["recipe"]["steps"] == 4
    assert record["widen"] is True  # the default: targets past the trained widths widened
    for r in rows:
        for key in ("loss_0", "loss_n10", "loss_n", "accuracy_0", "accuracy_n"):
            assert np.isfinite(r[key]), key
    # Different inits, same data: training differs. (Mimetic init keeps the ViT's zero
    # head, so at step 0 it predicts uniformly, as random init does.)
    assert pred["loss_n"] != rand["loss_n"]
    assert mimetic["loss_0"] == rand["loss_0"] and mimetic["loss_n"] != rand["loss_n"]
    # The blend with the random init trains as neither of the two. (Tempering may zero
    # both heads of this 3-step GHN's predictions, so their step-0 losses may agree.)
    assert mixed["mix"] == 0.5 and mixed["loss_n"] not in (pred["loss_n"], rand["loss_n"])
    assert mixed["combine"] == "blend" and "mix 0.5" in evaluate.init_label(mixed)
    # The prediction was tempered (--temper=always): its output layer scaled by alpha in
    # [0, 1].
    alpha = pred["output_scale"]
    assert 0.0 <= alpha <= 1.0
    assert raw["output_scale"] == 1.0 and raw["mix"] == 0.0 and raw["blocks"] == "predicted"
    assert 0.0 <= mixed["output_scale"] <= 1.0 and "output_scale" not in rand
    assert "speedup" in mimetic and "reached" in mimetic  # relative to random, as predicted's
    arch = rows[0]["arch"]
    assert (out / "curves" / f"{arch}.png").stat().st_size > 10_000
    assert arch in (out / "results.md").read_text()
    assert "| mimetic |" in (out / "results.md").read_text()
    assert set(json.loads((out / "curves.json").read_text())[arch]) == {r["init"] for r in rows}

    # A plain Flax user restores the predicted parameters into their own model.
    spec = zoo.spec_from_json(json.loads((out / "predicted" / f"{arch}.json").read_text()))
    model = spec.build(rngs=nnx.Rngs(123))
    state = nnx.state(model, nnx.Param)
    restored = ocp.StandardCheckpointer().restore(out / "predicted" / arch, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    # ...and they are the GHN's prediction, giving the step-0 loss in the table.
    setup = evaluate.Setup.from_name("mnist5k")
    hyper = ghn.load(workdir)
    expected = flat(nnx.to_pure_dict(hyper.predict(model, setup.input_spec(spec))))
    tempered = output_scale_paths(ghn.trace(model, setup.input_spec(spec)))
    assert set(tempered) == {"head/kernel", "head/bias"}
    # Predicted in another process (possibly another compiled program): round-off along
    # the whole prediction (tolerances.ghn_reduction), plus one rounding for alpha.
    n = predict_reduction(hyper, model, setup.input_spec(spec))
    for k, v in expected.items():
        v = np.asarray(v) * alpha if k in tempered else v
        assert_close(flat(restored)[k], v, reduction=n + 1, err_msg=k)
    batch = setup.eval_batches(evaluate.Recipe(eval_batch_size=50, eval_batches=1))[0]
    sums = setup.task.sums(model, batch)
    # eval.py's jitted evaluation against this eager one: round-off along the ViT (patch
    # embedding, blocks, head, softmax over 10 classes) and the mean over 50 images, at
    # the scale of the loss (and of its terms, the per-image cross-entropies).
    assert spec.family == "vit", spec
    tokens = (spec.image_size // spec.patch_size) ** 2 + (spec.pool == "cls")
    vit = spec.patch_size**2 * spec.in_channels + spec.width + 10 + 50
    vit += transformer_reduction(
        depth=spec.depth,
        width=spec.width,
        mlp_width=spec.mlp_ratio * spec.width,
        head_dim=spec.width // spec.num_heads,
        tokens=tokens,
    )
    loss = float(sums["loss_sum"] / sums["count"])
    assert_close(loss, rows[0]["loss_0"], reduction=vit, scale=abs(rows[0]["loss_0"]))


def test_eval_py_rejects_a_target_the_ghn_cannot_decode_before_any_work(workdir, tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "eval.py"),
        f"--ghn={workdir}",
        "--archs=heldout,vit-ti:patch_size=7",
        "--widen=never",  # predicted at its own width: the decoder's K is too narrow
        f"--workdir={tmp_path}",
    ]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "vit-d12-w192-h3-p7 does not fit" in proc.stderr and "max_dim" in proc.stderr
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("name, data", [("vit-mnist", "digits28"), ("gpt2-text", "python_source")])
def test_other_data_is_read_as_the_ghn_read_its_own(name, data):
    """`Setup.from_ghn_info(info, data)` (eval.py --data): another dataset, with the GHN's
    sequence length and tokenizer, so its held-out targets keep their shapes."""
    info = hub.info(name)
    own = evaluate.Setup.from_ghn_info(info)
    other = evaluate.Setup.from_ghn_info(info, data)
    assert other.train.name == data and own.train.name != data
    assert other.task == own.task
    spec = evaluate.training_pools(info).heldout[0]
    assert own.fit(spec) == other.fit(spec)
    if own.task.kind == "text":
        assert other.task.seq_len == evaluate.train_config_of(info)["data"]["seq_len"]
        assert evaluate.Setup.from_ghn_info(info, data, seq_len=16).task.seq_len == 16


def test_mix_and_add_restore_full_rank_and_keep_vectors():
    rng = np.random.default_rng(0)
    low_rank = (rng.normal(size=(64, 4)) @ rng.normal(size=(4, 48))) / 2.0  # rank 4, std ~1
    full = rng.normal(size=(64, 48))
    predicted = {"w": jax.numpy.asarray(low_rank), "b": jax.numpy.ones(48)}
    random = {"w": jax.numpy.asarray(full), "b": jax.numpy.zeros(48)}
    mixed = params.mix_with_random(predicted, random, 0.5)
    np.testing.assert_array_equal(mixed["b"], predicted["b"])  # passed through: a copy
    assert np.linalg.matrix_rank(np.asarray(predicted["w"])) == 4
    assert np.linalg.matrix_rank(np.asarray(mixed["w"])) == 48
    # Elementwise float32 blend against float64: a few roundings at the terms' scale.
    scale = np.sqrt(0.75) * np.abs(low_rank).max() + 0.5 * np.abs(full).max()
    assert_close(mixed["w"], np.sqrt(0.75) * low_rank + 0.5 * full, reduction=1, scale=scale)
    assert abs(np.std(mixed["w"]) - 1.0) < 0.15
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        params.mix_with_random(predicted, random, 1.5)

    # Adding keeps the prediction whole and the random init at full scale: p + a r.
    added = params.add_random(predicted, random, 1.0)
    np.testing.assert_array_equal(added["b"], predicted["b"])
    assert np.linalg.matrix_rank(np.asarray(added["w"])) == 48
    scale = np.abs(low_rank).max() + np.abs(full).max()
    assert_close(added["w"], low_rank + full, reduction=1, scale=scale)
    with pytest.raises(ValueError, match=">= 0"):
        params.add_random(predicted, random, -1.0)
    # Table labels: what was combined, and how; rows written before `combine` blended.
    row = {"init": "predicted", "blocks": "random", "mix": 1.0, "combine": "add"}
    assert evaluate.init_label(row) == "predicted, random blocks, + random"
    assert evaluate.init_label({**row, "mix": 0.5}) == "predicted, random blocks, + 0.5 random"
    assert evaluate.init_label({"init": "predicted", "mix": 0.5}) == "predicted, mix 0.5"


def test_random_blocks_keep_the_predicted_stem_and_head():
    spec = zoo.GPT2Spec(depth=2, width=32, num_heads=4, vocab_size=64, context_length=16)
    predicted = nnx.state(spec.build(rngs=nnx.Rngs(1)), nnx.Param)
    random = nnx.state(spec.build(rngs=nnx.Rngs(2)), nnx.Param)
    pure = lambda state: flat(nnx.to_pure_dict(state))
    mixed = pure(params.with_random_blocks(predicted, random))
    p, r = pure(predicted), pure(random)
    blocks = {k for k in p if k.startswith("blocks/")}
    assert blocks and {k.split("/")[1] for k in blocks} == {"0", "1"}
    assert {k for k in p if k not in blocks} >= {"wte/embedding", "wpe/embedding", "ln_f/scale"}
    for k in p:
        want = r[k] if k in blocks else p[k]
        np.testing.assert_array_equal(mixed[k], want, err_msg=k)
    # The two inits differ wherever they are random, so the test can tell them apart.
    assert all(not np.array_equal(p[k], r[k]) for k in p if k.endswith(("kernel", "embedding")))
