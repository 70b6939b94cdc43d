"""Architecture names (one syntax for eval.py and `python -m ghn`) and evaluation set-ups."""

import json

import numpy as np
import pytest
from test_train_common import tiny_config

from ghn import evaluate, zoo
from ghn.cli import load_spec
from ghn.zoo.dataset import VERSION
from ghn.zoo.parse import parse_value, split_names


def test_values_are_json_or_python_literals_else_strings():
    assert parse_value("6") == 6 and parse_value("-2") == -2
    assert parse_value("true") is True and parse_value("False") is False
    assert parse_value("[4, 2]") == [4, 2] and parse_value("(4,2)") == (4, 2)
    assert parse_value("cls") == "cls" and parse_value("abc") == "abc"
    assert zoo.parse_overrides(["depth=6", " pool = mean "]) == {"depth": 6, "pool": "mean"}
    with pytest.raises(ValueError, match="field=value"):
        zoo.parse_overrides(["depth"])


def test_presets_with_changed_fields():
    (spec,) = zoo.parse_arch("vit-ti:patch_size=7;depth=2")
    assert spec == zoo.get("vit-ti", patch_size=7, depth=2)
    assert zoo.parse_archs(" gpt2 , vit-s ") == [zoo.get("gpt2"), zoo.get("vit-s")]
    # Commas inside brackets belong to a value, not to the list of names.
    assert split_names("a:x=[1,2],b") == ["a:x=[1,2]", "b"]


def test_wrong_names_and_values_are_clear_errors():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        zoo.parse_archs("gpt5")
    with pytest.raises(ValueError, match="depth must be int, got 'abc'"):
        zoo.parse_archs("vit-ti:depth=abc")
    with pytest.raises(ValueError, match="unknown GPT2Spec field"):
        zoo.parse_archs("gpt2:tied=false")
    with pytest.raises(ValueError, match="names no architectures"):
        zoo.parse_archs(" , ")
    with pytest.raises(ValueError, match="does not exist"):
        zoo.parse_archs("missing.json")


def test_files_specs_lists_and_dataset_splits(tmp_path):
    a, b = zoo.get("vit-ti", depth=1), zoo.get("vit-ti", depth=2)
    one = tmp_path / "one.json"
    one.write_text(json.dumps(a.to_json()))
    many = tmp_path / "many.json"
    many.write_text(json.dumps([a.to_json(), b.to_json()]))
    ds = tmp_path / "ds.json"
    doc = {"version": VERSION, "train": [a.to_json()], "heldout": [b.to_json()]}
    ds.write_text(json.dumps(doc))
    assert zoo.parse_archs(f"{one},{many}") == [a, a, b]
    assert zoo.parse_arch(f"{many}:1") == [b]
    assert zoo.parse_arch(str(ds)) == [b]  # a dataset alone: its held-out split
    assert zoo.parse_arch(f"{ds}:train") == [a]
    assert zoo.parse_arch(f"{ds}:train:0") == [a]
    with pytest.raises(ValueError, match="index '5' is not in 0..0"):
        zoo.parse_arch(f"{ds}:train:5")
    with pytest.raises(ValueError, match="splits 'train' and 'heldout'"):
        zoo.parse_arch(f"{ds}:test")
    # The command line takes exactly one, with --set overrides on top.
    assert load_spec(f"{ds}:train:0", ["depth=3"]) == a.replace(depth=3)
    with pytest.raises(ValueError, match="names 2 architectures"):
        load_spec(str(many), [])


def test_named_groups_are_resolved_only_when_named():
    calls = []

    def heldout():
        calls.append(1)
        return [zoo.get("vit-ti", depth=1)]

    assert zoo.parse_archs("vit-s", {"heldout": heldout}) == [zoo.get("vit-s")]
    assert not calls
    assert zoo.parse_archs("heldout,vit-s", {"heldout": heldout})[0].depth == 1
    assert calls == [1]


def test_resolve_archs_rebuilds_a_runs_pools_and_fits_them_to_the_data():
    config = tiny_config({"archs.pool_size": 3, "eval.larger.depth": 2})
    info = {"train_config": config.to_dict()}
    setup = evaluate.Setup.from_name("mnist5k")
    pools = evaluate.training_pools(info)
    specs = evaluate.resolve_archs("heldout,larger,vit-ti:patch_size=7", info, setup)
    assert specs[: len(pools.heldout)] == list(pools.heldout)
    assert specs[len(pools.heldout)] == pools.larger[0] and pools.larger[0].depth == 2
    fitted = specs[-1]
    assert (fitted.image_size, fitted.in_channels, fitted.num_classes) == (28, 1, 10)
    with pytest.raises(ValueError, match="'heldout': this GHN records no training config"):
        evaluate.resolve_archs("heldout", {}, setup)


def test_fit_sets_the_context_length_to_the_sequence_length():
    setup = evaluate.Setup.from_name("pydoc_text", seq_len=32)
    spec = setup.fit(zoo.get("gpt2"))
    # GPT-2's 1024 positions come down to the 32 the data uses (and the GHN saw).
    assert spec.context_length == 32 and spec.vocab_size == 256
    longer = evaluate.Setup.from_name("pydoc_text", seq_len=64).fit(spec)
    assert longer.context_length == 64
    assert setup.fit(spec) is spec  # nothing to change


def test_setup_from_your_own_datasets_matches_the_registry():
    named = evaluate.Setup.from_name("mnist5k")
    own = evaluate.Setup.from_datasets(named.train, named.validation)
    assert own.task == named.task
    recipe = evaluate.Recipe(batch_size=8, eval_batch_size=16, eval_batches=1)
    # Same datasets and recipe: the same batches (a data copy, so bitwise).
    np.testing.assert_array_equal(
        next(own.train_iterator(recipe))["image"], next(named.train_iterator(recipe))["image"]
    )
    text = evaluate.Setup.from_name("pydoc_text", seq_len=16)
    with pytest.raises(ValueError, match="seq_len"):
        evaluate.Setup.from_datasets(text.train, text.validation)
    with pytest.raises(ValueError, match="validation is text"):
        evaluate.Setup.from_datasets(named.train, text.validation)


def test_number_of_evaluation_points_is_a_recipe_field():
    assert evaluate.eval_points(100, 4) == [0, 10, 25, 50, 75, 100]
    assert evaluate.eval_points(200) == list(range(0, 201, 10))
    with pytest.raises(ValueError, match="num_points"):
        evaluate.Recipe(num_points=0)
