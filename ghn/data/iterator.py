"""Deterministic, shardable, resumable batch iteration over an indexed dataset."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


def stream_rng(seed: int, counter: int, stream: int) -> np.random.Generator:
    """A generator that depends only on (seed, counter, stream); counter is an epoch or a step."""
    return np.random.default_rng([seed, counter, stream])


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index}, {process_count}"
        )
    return process_index, process_count


class DataIterator:
    """Yields this process's rows of each global batch as a dict of numpy arrays.

    Global batch k of epoch e holds examples `order_fn(e)[k*B:(k+1)*B]`, where
    `order_fn` is a pure function of the epoch (and the seed it closes over).
    Process p of P keeps rows [p*B/P, (p+1)*B/P), so the processes' shares
    concatenate, in process order, to the single-process batch. The position is
    three ints (epoch, batch in epoch, step); `state()`/`restore()` carry it.

    With `drop_remainder=False` the last batch of an epoch is padded to B rows
    and every batch carries a boolean `mask` that is False on padding.
    """

    def __init__(
        self,
        *,
        order_fn: Callable[[int], np.ndarray],
        fetch_fn: Callable[[np.ndarray, int, int, int], Batch],
        batch_size: int,
        num_epochs: int | None,
        drop_remainder: bool,
        process_index: int | None,
        process_count: int | None,
        config: dict[str, int],
    ):
        self.process_index, self.process_count = resolve_process(process_index, process_count)
        if batch_size <= 0 or batch_size % self.process_count:
            raise ValueError(
                f"global batch_size {batch_size} must be a positive multiple of "
                f"process_count {self.process_count}"
            )
        if num_epochs is not None and num_epochs < 0:
            raise ValueError(f"num_epochs must be >= 0 or None, got {num_epochs}")
        self.batch_size = batch_size
        self.local_batch_size = batch_size // self.process_count
        self.num_epochs = num_epochs
        self.drop_remainder = drop_remainder
        self._order_fn, self._fetch_fn = order_fn, fetch_fn
        self._config = {k: int(v) for k, v in config.items()} | {"batch_size": batch_size}
        self._epoch = self._batch = self._step = 0
        self._order_cache: tuple[int, np.ndarray] | None = None
        if self.steps_per_epoch(0) == 0:
            raise ValueError(
                f"{len(self._order(0))} examples do not fill one batch of "
                f"{batch_size} (drop_remainder={drop_remainder})"
            )

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, self._order_fn(epoch))
        return self._order_cache[1]

    def steps_per_epoch(self, epoch: int = 0) -> int:
        n = len(self._order(epoch))
        return n // self.batch_size if self.drop_remainder else math.ceil(n / self.batch_size)

    @property
    def step(self) -> int:
        return self._step

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> Batch:
        while True:
            if self.num_epochs is not None and self._epoch >= self.num_epochs:
                raise StopIteration
            if self._batch < self.steps_per_epoch(self._epoch):
                break
            self._epoch, self._batch = self._epoch + 1, 0
        B, b = self.batch_size, self.local_batch_size
        ids = self._order(self._epoch)[self._batch * B : (self._batch + 1) * B]
        valid = np.arange(B) < len(ids)
        ids = np.pad(ids, (0, B - len(ids)), mode="edge")
        lo = self.process_index * b
        batch = self._fetch_fn(ids[lo : lo + b], lo, B, self._step)
        if not self.drop_remainder:
            batch["mask"] = valid[lo : lo + b]
        self._batch += 1
        self._step += 1
        return batch

    def state(self) -> dict[str, int]:
        """The position plus the settings it is valid for; plain ints, JSON-serializable."""
        return {"epoch": self._epoch, "batch": self._batch, "step": self._step} | self._config

    def restore(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state()` was taken (process count may differ)."""
        wrong = {k: (state.get(k), v) for k, v in self._config.items() if state.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k}: saved {s}, now {v}" for k, (s, v) in wrong.items())
            raise ValueError(f"data iterator state was saved with other settings ({detail})")
        try:
            epoch, batch, step = (int(state[k]) for k in ("epoch", "batch", "step"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed data iterator state {state!r}") from e
        if min(epoch, batch, step) < 0:
            raise ValueError(f"malformed data iterator state {state!r}")
        self._epoch, self._batch, self._step = epoch, batch, step


def to_global_arrays(batch: Batch, sharding) -> dict[str, Any]:
    """Assemble every process's rows into global jax.Arrays laid out by `sharding`.

    Rows are split over the sharding's first axis in process order, which is how
    `DataIterator` assigns them.
    """
    import jax

    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
