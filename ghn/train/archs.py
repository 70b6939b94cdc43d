"""The order a run visits its training architectures (`ghn.zoo.pools` draws pools).

`ArchSampler`: each epoch over a fixed pool is a permutation drawn from (seed,
epoch); with a window, the pool is visited a window of W architectures at a
time, for a few epochs each, so a run of per-architecture programs keeps only
W of them compiled at once. `GroupedSampler`: the pool is split into groups (shape buckets) and
every meta-batch comes from one group, chosen per step with probability
proportional to its size, so a step runs one bucket's program. `StreamSampler`:
no pool; position i of the run is a fresh draw from the sampler seeded with
(seed, i). Every process computes the same order, and the position is a few
integers in the checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ghn.zoo import ArchSpec


def fingerprint(specs: Sequence[ArchSpec]) -> str:
    doc = json.dumps([s.to_json() for s in specs], sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


class _Positional:
    """A sampler whose whole state is its position `index` (plus what must match on
    restore: seed, meta-batch size and the fingerprint of what it draws from)."""

    _what = "pool"  # the state's key for the fingerprint
    index: int
    seed: int
    meta_batch_size: int
    _fingerprint: str

    def peek(self) -> list[ArchSpec]:
        raise NotImplementedError

    def next(self) -> list[ArchSpec]:
        specs = self.peek()
        self.index += self.meta_batch_size
        return specs

    def state(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "seed": self.seed,
            "meta_batch_size": self.meta_batch_size,
            self._what: self._fingerprint,
        }

    def restore(self, state: dict[str, Any]) -> None:
        _check_same(state, self.state(), ("seed", "meta_batch_size", self._what))
        self.index = int(state["index"])


class ArchSampler(_Positional):
    """Meta-batches of `m` architectures from `pool`, epoch after epoch.

    Position i of the stream is `pool[perm(i // P)[i % P]]`, where P is the pool
    size and perm(e) a permutation drawn from (seed, e); a meta-batch may span
    two epochs. `state()`/`restore()` carry i.

    With `window` = W > 0 the pool is cut into consecutive windows of W
    architectures (the last may be smaller), and the run visits them in turn,
    `window_epochs` epochs over each, then starts over with the first: each visit's
    epochs are permutations of its window drawn from (seed, visit, epoch). A
    per-architecture program is compiled (or loaded from the persistent cache)
    once per visit, so a pool larger than the programs a process can keep
    compiled (`program_cache_size`) costs one compile per architecture rather
    than a reload at almost every step.
    """

    def __init__(
        self,
        pool: Sequence[ArchSpec],
        meta_batch_size: int,
        seed: int,
        *,
        window: int = 0,
        window_epochs: int = 1,
    ):
        if not pool:
            raise ValueError("the architecture pool is empty")
        if window < 0 or window_epochs < 1:
            raise ValueError(f"need window >= 0, window_epochs >= 1; got {window}, {window_epochs}")
        self.pool = tuple(pool)
        self.meta_batch_size = meta_batch_size
        self.seed = seed
        self.index = 0
        self.window = min(window, len(self.pool)) if window else len(self.pool)
        self.window_epochs = window_epochs if window else 1
        self._windowed = bool(window)
        self._fingerprint = fingerprint(self.pool)
        if window:  # a run resumed with other windows would visit another order
            self._fingerprint += f"/window={self.window}x{self.window_epochs}"
        starts = np.arange(0, len(self.pool), self.window)
        self._starts = starts
        sizes = np.minimum(starts + self.window, len(self.pool)) - starts
        # Positions at which each window's visit begins within one cycle over the pool.
        self._bounds = np.concatenate([[0], np.cumsum(sizes * self.window_epochs)])
        self._perm: tuple[tuple[int, int], np.ndarray] | None = None

    def _order(self, key: tuple[int, int], size: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != key:
            # Unwindowed: one visit per epoch, seeded (seed, epoch) as before windows.
            seed = [self.seed, *key] if self._windowed else [self.seed, key[0]]
            self._perm = (key, np.random.default_rng(seed).permutation(size))
        return self._perm[1]

    def _at(self, i: int) -> ArchSpec:
        cycle, r = divmod(i, int(self._bounds[-1]))
        w = int(np.searchsorted(self._bounds, r, side="right")) - 1
        start = int(self._starts[w])
        size = min(self.window, len(self.pool) - start)
        epoch, j = divmod(r - int(self._bounds[w]), size)
        visit = cycle * len(self._starts) + w
        return self.pool[start + self._order((visit, epoch), size)[j]]

    def peek(self) -> list[ArchSpec]:
        return [self._at(i) for i in range(self.index, self.index + self.meta_batch_size)]


class GroupedSampler:
    """Meta-batches of `m` architectures that all come from one of `groups`.

    Step t picks group g with probability len(groups[g]) / pool size (drawn from
    (seed, t)), then takes that group's next m architectures (an `ArchSampler` per
    group), so each architecture is visited about as often as in `ArchSampler`.
    """

    def __init__(self, groups: Sequence[Sequence[ArchSpec]], meta_batch_size: int, seed: int):
        if not groups or not all(groups):
            raise ValueError("every architecture group needs at least one architecture")
        self.samplers = [ArchSampler(g, meta_batch_size, seed) for g in groups]
        self.meta_batch_size = meta_batch_size
        self.seed = seed
        self.step = 0
        sizes = np.asarray([len(g) for g in groups], np.float64)
        self._p = sizes / sizes.sum()
        self._fingerprint = fingerprint([s for g in groups for s in g])

    def _group(self, step: int) -> int:
        rng = np.random.default_rng([self.seed, 1, step])
        return int(rng.choice(len(self._p), p=self._p))

    def peek(self) -> list[ArchSpec]:
        return self.samplers[self._group(self.step)].peek()

    def next(self) -> list[ArchSpec]:
        specs = self.samplers[self._group(self.step)].next()
        self.step += 1
        return specs

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "indices": [s.index for s in self.samplers],
            "seed": self.seed,
            "meta_batch_size": self.meta_batch_size,
            "pool": self._fingerprint,
        }

    def restore(self, state: dict[str, Any]) -> None:
        _check_same(state, self.state(), ("seed", "meta_batch_size", "pool"))
        if len(state["indices"]) != len(self.samplers):
            raise ValueError("architecture sampler state was saved with other groups")
        self.step = int(state["step"])
        for sampler, index in zip(self.samplers, state["indices"], strict=True):
            sampler.index = int(index)


class StreamSampler(_Positional):
    """A fresh architecture at every position of the run: no pool.

    Position i draws `draw(seed=(seed, i, j))` for j = 0, 1, ... until the draw is
    not in `exclude` (the held-out architectures) and, for the 2nd..m-th
    architectures of a meta-batch, lies in the same group (`group_of`) as the
    first, so a step runs one bucket's program; each position's architecture is
    still distributed as the sampler's draw. The state is the position.
    """

    _what = "stream"

    def __init__(
        self,
        draw: Callable[[Sequence[int]], ArchSpec],
        meta_batch_size: int,
        seed: int,
        *,
        exclude: Sequence[ArchSpec] = (),
        group_of: Callable[[ArchSpec], Any] = lambda spec: None,
        fingerprint: str = "",
        max_tries: int = 100_000,
    ):
        self.draw = draw
        self.meta_batch_size = meta_batch_size
        self.seed = seed
        self.exclude = frozenset(exclude)
        self.group_of = group_of
        self.index = 0
        self._fingerprint = fingerprint
        self.max_tries = max_tries

    def _at(self, i: int, group: Any = None, *, any_group: bool = False) -> ArchSpec:
        for j in range(self.max_tries):
            spec = self.draw((self.seed, i, j))
            if spec not in self.exclude and (any_group or self.group_of(spec) == group):
                return spec
        raise ValueError(
            f"the architecture stream found no draw for position {i} in {self.max_tries} tries "
            "outside the held-out architectures (and in the first one's group): widen the ranges"
        )

    def peek(self) -> list[ArchSpec]:
        first = self._at(self.index, any_group=True)
        group = self.group_of(first)
        rest = [self._at(self.index + k, group) for k in range(1, self.meta_batch_size)]
        return [first, *rest]


def _check_same(saved: dict[str, Any], mine: dict[str, Any], keys: Sequence[str]) -> None:
    wrong = [k for k in keys if saved.get(k) != mine[k]]
    if wrong:
        detail = ", ".join(f"{k}: saved {saved.get(k)}, now {mine[k]}" for k in wrong)
        raise ValueError(f"architecture sampler state was saved with other settings ({detail})")
