"""Which architectures a run trains and evaluates on.

The training pool is drawn once (a sampler with a seed, or an architecture
dataset's "train" split), the held-out architectures are never in it, and
the "larger" ones are bigger than every training architecture. Every process
and every later evaluation (`eval.py --archs heldout,larger`) rebuilds the
same pools from the same arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ghn.zoo.dataset import load_dataset
from ghn.zoo.samplers import sample, space
from ghn.zoo.spec import ArchSpec, SpecError


@dataclasses.dataclass(frozen=True)
class Pools:
    train: tuple[ArchSpec, ...]
    heldout: tuple[ArchSpec, ...]  # never in `train`
    larger: tuple[ArchSpec, ...]  # evaluation only, larger than every training architecture


def _plain(value: Any) -> Any:
    """Config values (ConfigDicts, lists from JSON) as the plain Python the zoo expects."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return value


def make_pools(
    *,
    sampler: str = "vits-1k",
    ranges: Mapping[str, Any] | None = None,
    pool_size: int = 1000,
    seed: int = 0,
    dataset: str = "",
    num_heldout: int = 2,
    larger: Mapping[str, Any] | None = None,
) -> Pools:
    """Training, held-out and larger evaluation architectures.

    Args:
      sampler, ranges, pool_size, seed: draw `pool_size + num_heldout` specs
        with `ghn.zoo.sample(sampler, ..., seed=seed, **ranges)`; the last
        `num_heldout` distinct ones are held out.
      dataset: an architecture-dataset JSON instead of a sampler (its "train"
        split trains, its "heldout" split is held out).
      larger: spec fields overriding the first training architecture, giving
        one architecture larger than any in training; empty: none.
    """
    ranges = _plain(ranges or {})
    if dataset:
        doc = load_dataset(dataset)
        train, heldout = list(doc["train"]), list(doc["heldout"])[:num_heldout]
        if not train:
            raise SpecError(f"architecture dataset {dataset} has no 'train' specs")
    else:
        draw = sample(sampler, pool_size + num_heldout, seed=seed, **ranges)
        distinct = list(dict.fromkeys(draw))
        if len(distinct) <= num_heldout:
            raise SpecError(
                f"{sampler} with ranges {ranges} gave {len(distinct)} distinct "
                f"architectures, too few to hold out {num_heldout}: widen the ranges, or hold "
                "out fewer (eval.num_heldout)"
            )
        heldout = distinct[len(distinct) - num_heldout :]
        held = set(heldout)
        train = [s for s in draw if s not in held][:pool_size]
    out = []
    overrides = _plain(larger or {})
    if overrides:
        spec = train[0].replace(**overrides)
        biggest = max(s.num_params() for s in train)
        if spec.num_params() <= biggest:
            raise SpecError(
                f"eval.larger gives {spec.name} with {spec.num_params()} parameters, not more "
                f"than the largest training architecture ({biggest}); make it deeper or wider"
            )
        out.append(spec)
    return Pools(tuple(train), tuple(heldout), tuple(out))


def pools_of(train_config: Mapping[str, Any]) -> Pools:
    """The pools of a `train.py` run, from its config (a ConfigDict or the plain dict
    a workdir's config.json / a GHN's ghn.json records)."""
    c = _plain(train_config)
    archs, ev = c["archs"], c["eval"]
    return make_pools(
        sampler=archs["sampler"],
        ranges=archs["ranges"],
        pool_size=archs["pool_size"],
        seed=archs["seed"],
        dataset=archs["dataset"],
        num_heldout=ev["num_heldout"],
        larger=ev["larger"],
    )


def candidates_of(train_config: Mapping[str, Any]) -> tuple[ArchSpec, ...]:
    """What a `train.py` run can train on: its pool, or with `archs.stream` every
    architecture its sampler can draw (held-out ones included: the stream skips them)."""
    c = _plain(train_config)
    archs = c["archs"]
    if not archs.get("stream"):
        return pools_of(c).train
    return tuple(space(archs["sampler"], **archs["ranges"]))
