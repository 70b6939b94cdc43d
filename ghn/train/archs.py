"""Which architectures a run trains and evaluates on, and the order it visits them.

The training pool is drawn once (a sampler with a seed, or an architecture
dataset's "train" split); each epoch over the pool is a permutation drawn from
(seed, epoch). Every process computes the same pool and order, and the whole
position is one integer, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from ghn import zoo
from ghn.zoo import ArchSpec


@dataclasses.dataclass(frozen=True)
class Pools:
    train: tuple[ArchSpec, ...]
    heldout: tuple[ArchSpec, ...]  # never in `train`
    larger: tuple[ArchSpec, ...]  # evaluation only, larger than every training architecture


def fingerprint(specs: Sequence[ArchSpec]) -> str:
    doc = json.dumps([s.to_json() for s in specs], sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """ConfigDict values as the plain Python the zoo expects."""
    if hasattr(value, "to_dict"):
        return {k: _plain(v) for k, v in value.to_dict().items()}
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return value


def num_params(spec: ArchSpec) -> int:
    # By arithmetic: tracing each of a thousand specs would take minutes.
    try:
        return spec.closed_form_num_params()
    except NotImplementedError:
        return spec.num_params()


def make_pools(archs_config, eval_config) -> Pools:
    """Training, held-out and larger evaluation architectures from the config."""
    num_heldout = eval_config.num_heldout
    if archs_config.dataset:
        doc = zoo.load_dataset(archs_config.dataset)
        train, heldout = list(doc["train"]), list(doc["heldout"])[:num_heldout]
        if not train:
            raise ValueError(f"architecture dataset {archs_config.dataset} has no 'train' specs")
    else:
        ranges = _plain(archs_config.ranges)
        n = archs_config.pool_size + num_heldout
        draw = zoo.sample(archs_config.sampler, n, seed=archs_config.seed, **ranges)
        distinct = list(dict.fromkeys(draw))
        if len(distinct) <= num_heldout:
            raise ValueError(
                f"{archs_config.sampler} with ranges {ranges} gave {len(distinct)} distinct "
                f"architectures, too few to hold out {num_heldout}"
            )
        heldout = distinct[len(distinct) - num_heldout :]
        held = set(heldout)
        train = [s for s in draw if s not in held][: archs_config.pool_size]
    larger = []
    overrides = _plain(eval_config.larger)
    if overrides:
        spec = train[0].replace(**overrides)
        biggest = max(num_params(s) for s in train)
        if num_params(spec) <= biggest:
            raise ValueError(
                f"eval.larger gives {spec.name} with {num_params(spec)} parameters, not more "
                f"than the largest training architecture ({biggest}); make it deeper or wider"
            )
        larger.append(spec)
    return Pools(tuple(train), tuple(heldout), tuple(larger))


class ArchSampler:
    """Meta-batches of `m` architectures from `pool`, epoch after epoch.

    Position i of the stream is `pool[perm(i // P)[i % P]]`, where P is the pool
    size and perm(e) a permutation drawn from (seed, e); a meta-batch may span
    two epochs. `state()`/`restore()` carry i.
    """

    def __init__(self, pool: Sequence[ArchSpec], meta_batch_size: int, seed: int):
        if not pool:
            raise ValueError("the architecture pool is empty")
        self.pool = tuple(pool)
        self.meta_batch_size = meta_batch_size
        self.seed = seed
        self.index = 0
        self._fingerprint = fingerprint(self.pool)
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, rng.permutation(len(self.pool)))
        return self._perm[1]

    def peek(self) -> list[ArchSpec]:
        p = len(self.pool)
        ids = range(self.index, self.index + self.meta_batch_size)
        return [self.pool[self._order(i // p)[i % p]] for i in ids]

    def next(self) -> list[ArchSpec]:
        specs = self.peek()
        self.index += self.meta_batch_size
        return specs

    def state(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "seed": self.seed,
            "meta_batch_size": self.meta_batch_size,
            "pool": self._fingerprint,
        }

    def restore(self, state: dict[str, Any]) -> None:
        mine = self.state()
        wrong = [k for k in ("seed", "meta_batch_size", "pool") if state.get(k) != mine[k]]
        if wrong:
            detail = ", ".join(f"{k}: saved {state.get(k)}, now {mine[k]}" for k in wrong)
            raise ValueError(f"architecture sampler state was saved with other settings ({detail})")
        self.index = int(state["index"])
