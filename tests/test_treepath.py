import jax
from flax import nnx

from ghn.treepath import entry_key, path_names, path_str
from ghn.zoo.gpt2 import GPT2Spec


def test_entry_key_of_every_entry_kind():
    tu = jax.tree_util
    assert entry_key(tu.DictKey("wte")) == "wte"
    assert entry_key(tu.SequenceKey(3)) == 3
    assert entry_key(tu.GetAttrKey("value")) == "value"
    assert entry_key(tu.FlattenedIndexKey(2)) == 2
    assert entry_key("plain") == "plain"


def test_nnx_state_paths_name_parameters_with_integer_block_keys():
    spec = GPT2Spec(depth=2, width=16, num_heads=2, vocab_size=11, context_length=8)
    state = nnx.state(nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0))), nnx.Param)
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    names = {path_str(p[:-1]) for p in paths}  # the last entry is the Variable's value
    assert "blocks/1/attn/c_attn/kernel" in names and "wte/embedding" in names
    block = next(p for p in paths if path_names(p)[:2] == ("blocks", "1"))
    assert entry_key(block[1]) == 1  # an int, as `ghn.params.in_repeated_block` needs
