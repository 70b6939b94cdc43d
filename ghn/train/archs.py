"""The order a run visits its training architectures (`ghn.zoo.pools` draws them).

Each epoch over the pool is a permutation drawn from (seed, epoch). Every
process computes the same pool and order, and the whole position is one
integer, so a resumed run continues exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from ghn.zoo import ArchSpec


def fingerprint(specs: Sequence[ArchSpec]) -> str:
    doc = json.dumps([s.to_json() for s in specs], sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


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
