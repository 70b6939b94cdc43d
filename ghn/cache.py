"""A bounded cache of compiled programs, least recently used evicted first.

Every compiled XLA:CPU program holds ~300-2,000 memory mappings
(`/proc/self/maps`: ~340 per small prediction program, ~2,000 per
meta-training program, measured with jax 0.10 on a 2-core x86 CPU), and
Linux caps a process at `vm.max_map_count` (65,530 by default). A cache that
keeps every program alive therefore aborts a long run with "LLVM compilation
error: Cannot allocate memory" after ~33 training programs, whatever RAM is
free. Dropping the last reference to a compiled program releases its
mappings; with JAX's persistent compilation cache on, compiling it again
later is a disk read.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRUCache(Generic[V]):
    """At most `maxsize` entries; `get_or_build` builds a missing one, evicting the least
    recently used. Thread-safe; `build` runs outside the lock (compiles are slow).

    With `weigh` (an entry's weight, e.g. its bytes), entries are also evicted while
    their summed weight exceeds `max_weight`; the newest entry always stays.
    """

    def __init__(
        self,
        maxsize: int,
        *,
        weigh: Callable[[V], int] | None = None,
        max_weight: int | None = None,
    ):
        if maxsize < 1:
            raise ValueError(f"cache size must be >= 1, got {maxsize}")
        if (weigh is None) != (max_weight is None):
            raise ValueError("give both weigh and max_weight, or neither")
        self.maxsize = maxsize
        self.evictions = 0
        self.weight = 0
        self._weigh = weigh
        self._max_weight = max_weight
        self._data: collections.OrderedDict[Hashable, V] = collections.OrderedDict()
        self._weights: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def keys(self) -> list[Hashable]:
        """The keys, least recently used first."""
        with self._lock:
            return list(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            if self._weigh is not None:
                self.weight -= self._weights.pop(key, 0)
                self._weights[key] = int(self._weigh(value))
                self.weight += self._weights[key]
            self._data[key] = value
            self._data.move_to_end(key)
            self._shrink()

    def get_or_build(self, key: Hashable, build: Callable[[], V]) -> V:
        hit = self.get(key)
        if hit is None:
            hit = build()
            self.put(key, hit)
        return hit

    def resize(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"cache size must be >= 1, got {maxsize}")
        with self._lock:
            self.maxsize = maxsize
            self._shrink()

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._weights.clear()
            self.weight = 0

    def _over(self) -> bool:
        if len(self._data) > self.maxsize:
            return True
        return self._max_weight is not None and self.weight > self._max_weight

    def _shrink(self) -> None:
        while len(self._data) > 1 and self._over():
            key, _ = self._data.popitem(last=False)
            self.weight -= self._weights.pop(key, 0)
            self.evictions += 1


def mapping_count() -> int | None:
    """This process's memory mappings (Linux), or None where /proc is absent."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None
