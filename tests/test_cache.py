"""Bounded caches of compiled programs: many architectures in one process stay within the
process's memory-mapping limit."""

import sys

import jax
import pytest
from flax import nnx
from test_train_common import tiny_config
from test_train_tasks import evaluate_first_batch, programs_for

import ghn
from ghn import zoo
from ghn.cache import LRUCache, mapping_count
from ghn.hypernet import predict as predict_lib


def test_lru_evicts_the_least_recently_used():
    cache = LRUCache(2)
    built = []

    def build(k):
        return lambda: built.append(k) or k.upper()

    assert cache.get_or_build("a", build("a")) == "A"
    cache.get_or_build("b", build("b"))
    assert cache.get_or_build("a", build("a")) == "A"  # a hit: now the most recent
    cache.get_or_build("c", build("c"))  # evicts b, not a
    assert "a" in cache and "b" not in cache and "c" in cache
    assert built == ["a", "b", "c"] and cache.evictions == 1
    cache.resize(1)
    assert len(cache) == 1 and "c" in cache and cache.evictions == 2
    with pytest.raises(ValueError, match=">= 1"):
        LRUCache(0)


def test_lru_by_weight_keeps_the_summed_weight_bounded():
    cache = LRUCache(100, weigh=len, max_weight=10)
    for key in ("aaaa", "bbbb", "cc"):
        cache.put(key, key)
    assert cache.weight == 10 and len(cache) == 3
    cache.get("aaaa")  # now the most recent: bbbb goes first
    cache.put("ddd", "ddd")
    assert cache.keys() == ["cc", "aaaa", "ddd"]
    assert cache.weight == 9 and cache.evictions == 1
    cache.put("cc", "cccccc")  # a new value for a key is re-weighed
    assert cache.keys() == ["ddd", "cc"] and cache.weight == 9
    cache.put("big", "x" * 50)  # heavier than the budget alone: kept, everything else goes
    assert cache.keys() == ["big"] and cache.weight == 50
    with pytest.raises(ValueError, match="weigh and max_weight"):
        LRUCache(2, weigh=len)


def tiny_gpt(i: int):
    spec = zoo.GPT2Spec(depth=1, width=8 * (i + 1), num_heads=2, vocab_size=32, context_length=8)
    return nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0))), spec.input_spec()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/maps")
def test_many_predicted_architectures_keep_the_mapping_count_bounded(monkeypatch):
    # Measured: each compiled XLA:CPU program with JIT-ed code holds hundreds of mappings,
    # and the cache used to keep all of them; Linux stops a process at 65,530. Each width
    # below makes new layouts. The tiled decoder compiles a decoding program per layout
    # (~300 mappings per architecture here). The low-rank decoder compiles no program per
    # layout on CPU (float32 matrices are written by host BLAS; on an accelerator, one
    # write program per layout).
    config = ghn.GHNConfig(d_model=16, num_layers=1, num_heads=2, rank=4, max_dim=1024)
    tiled = ghn.GHN(config.replace(decoder="tiled"), rngs=nnx.Rngs(0))

    def growth(hyper, cache: LRUCache, widths: range) -> int:
        monkeypatch.setattr(predict_lib, "LEAF_PROGRAMS", cache)
        jax.block_until_ready(hyper.predict(*tiny_gpt(widths[0])))
        base, top = mapping_count(), 0
        for i in widths[1:]:
            jax.block_until_ready(hyper.predict(*tiny_gpt(i)))
            top = max(top, mapping_count())
        return top - base

    unbounded = growth(tiled, LRUCache(10**6), range(0, 11))
    bounded = growth(tiled, LRUCache(8), range(11, 22))  # about one architecture's programs
    assert predict_lib.LEAF_PROGRAMS.evictions >= 10
    assert unbounded > 1000, unbounded
    assert bounded < unbounded / 10, (bounded, unbounded)
    view = growth(ghn.GHN(config, rngs=nnx.Rngs(0)), LRUCache(10**6), range(0, 11))
    assert view < unbounded / 10, (view, unbounded)
    transpose = ghn.GHN(config.replace(factors="transpose"), rngs=nnx.Rngs(0))
    gemms = growth(transpose, LRUCache(10**6), range(0, 11))
    assert gemms < unbounded / 10, (gemms, unbounded)


@pytest.mark.slow
def test_meta_training_programs_are_bounded_and_recompiled_when_needed():
    config = tiny_config()
    programs = programs_for(config, max_programs=2)
    mnist = dict(patch_size=7, image_size=28, in_channels=1, num_classes=10)
    specs = [zoo.ViTSpec(depth=1, width=w, num_heads=2, **mnist) for w in (16, 24, 32)]
    first = evaluate_first_batch(config, programs, specs[0])
    for spec in specs[1:]:
        evaluate_first_batch(config, programs, spec)
    assert programs.stats.compilations["eval"] == 3 and programs.evictions == 1
    # specs[0] was evicted: compiled again, with the same result (same program, same
    # inputs, same machine: bitwise).
    assert evaluate_first_batch(config, programs, specs[0]) == first
    assert programs.stats.compilations["eval"] == 4
