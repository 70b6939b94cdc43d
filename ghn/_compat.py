"""Every use of JAX or Flax internals, each behind a guard that checks it at use time.

Verified with jax `VERIFIED_JAX` and flax `VERIFIED_FLAX`. On an upgrade, run
`pytest tests/test_compat.py` and read each item below; a guard that fails either
falls back to the public, slower path with one `CompatWarning`, or raises
`CompatError` naming the versions and this file.

1. `host_counted(rngs)` swaps the draw counter of an `nnx.Rngs` stream
   (`rngs.params.count`, an `nnx.RngCount` holding a JAX array) for a NumPy one.
   Why: under `nnx.eval_shape` or `jit` every draw writes a traced counter, and
   flax's Variable update probes the tracer's `.sharding`, raising an AttributeError
   whose message scans the whole trace so far; building is quadratic in the number of
   layers (GPT-2 XL under `nnx.eval_shape` on a 2-core CPU: 6.7 s, 1.0 s with the
   NumPy counter). Relies on: `RngStream` keeping its counter in an `nnx.RngCount`
   attribute `count` and reading and writing it through `get_value`/`set_value`
   (which `count[...]` calls); ours hand out copies, because JAX on CPU may alias a
   NumPy argument that flax would then increment in place. Guard: the structure is
   checked on every call, and on first use a probe draws keys from a host-counted and
   a stock stream and compares them; on failure, a warning and a stock
   `nnx.Rngs(params=rngs.params())` (same parameters, only slower). The probe compiles
   a few PRNG programs (~0.4-1 s in a fresh process), so shape-only builds, whose drawn
   values are discarded, skip it (`check_keys=False`) and keep the structure check. On
   upgrade check `flax/nnx/rnglib.py` `RngStream.__init__`/`__call__` and
   `Variable.get_value`/`set_value` in `flax/nnx/variablelib.py`.
2. `patched_calls(classes, wrap)` replaces `__call__` on module classes for the
   length of a `with` block; `ghn.trace` uses it to run each submodule's forward under
   `jax.named_scope`, since NNX names no scopes itself. Relies on: NNX module classes
   being ordinary mutable Python classes whose instances are called through
   `type(m).__call__`. Guard: every assignment is read back; if one fails, all
   classes are restored and `CompatError` is raised. A process-wide lock serializes
   patched regions, so concurrent traces cannot restore each other's wrappers.
3. `coordination_client()` returns the `jax.distributed` coordination-service client
   (`jax._src.distributed.global_state.client`), which has no public accessor; its
   `wait_at_barrier` lines processes up without a device collective (CPU gloo
   collectives give up after ~30 s when a peer is late). Guard: the module, the
   attribute and `wait_at_barrier` must exist once `jax.distributed.is_initialized()`;
   otherwise a warning and None, and `ghn.train.distributed.barrier` falls back to
   `multihost_utils.sync_global_devices`. On upgrade check `jax/_src/distributed.py`
   (`State.client`) and the `DistributedRuntimeClient.wait_at_barrier` signature.

Imports nothing from the rest of `ghn`: zoo, graph and train all import it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax
import jax
import numpy as np
from flax import nnx

VERIFIED_JAX = "0.10.2"
VERIFIED_FLAX = "0.12.8"


class CompatError(RuntimeError):
    """A JAX/Flax internal that ghn relies on has changed and has no fallback."""


class CompatWarning(RuntimeWarning):
    """A JAX/Flax internal has changed; ghn took the slower public path."""


def _versions() -> str:
    return (
        f"jax {jax.__version__} / flax {flax.__version__} (ghn/_compat.py was verified "
        f"with jax {VERIFIED_JAX} / flax {VERIFIED_FLAX})"
    )


_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(what: str, message: str) -> None:
    with _warned_lock:
        if what in _warned:
            return
        _warned.add(what)
    warnings.warn(
        f"{message}; on {_versions()}. Update ghn/_compat.py ({what}).",
        CompatWarning,
        stacklevel=3,
    )


@functools.cache
def _host_count_type() -> type | None:
    """An `nnx.RngCount` whose NumPy value is never mutated once JAX may hold it.

    JAX on CPU may alias a NumPy argument instead of copying it (aligned buffers)
    and reads it asynchronously; flax's `count[...] += 1` increments the stored
    array in place, so a plain NumPy counter let `fold_in` see the incremented
    value: two draws shared a key and the parameters depended on malloc alignment.
    Here reads hand out copies and writes swap in a new read-only array.
    """
    base = getattr(nnx, "RngCount", None)
    if not (isinstance(base, type) and hasattr(base, "get_value") and hasattr(base, "set_value")):
        return None

    class HostCount(base):
        def get_value(self, **kwargs):
            return np.array(super().get_value(**kwargs))

        def set_value(self, value, *, index=...):
            new = np.array(super().get_value())
            new[index] = value
            new.flags.writeable = False
            super().set_value(new)

    return HostCount


def _host_counted(key: jax.Array) -> nnx.Rngs | None:
    """`nnx.Rngs(params=key)` with a host counter, or None if flax's layout changed."""
    local = nnx.Rngs(params=key)
    stream = vars(local).get("params")
    count = getattr(stream, "count", None)
    host_count = _host_count_type()
    stream_type = getattr(nnx, "RngStream", None)
    if (
        host_count is None
        or not isinstance(stream_type, type)
        or not isinstance(stream, stream_type)
        or not isinstance(count, nnx.RngCount)
    ):
        return None
    zeros = np.zeros(count.shape, count.dtype)
    zeros.flags.writeable = False
    stream.count = host_count(zeros, tag=count.tag)
    return local


@functools.cache
def _host_counting_works() -> bool:
    # Concrete even when called under `nnx.eval_shape`/`jit`, so keys can be compared.
    with jax.ensure_compile_time_eval():
        try:
            key = jax.random.key(0)
            host = _host_counted(key)
            if host is None:
                _warn_once("host_counted", "nnx.Rngs streams no longer hold an nnx.RngCount")
                return False
            stock = nnx.Rngs(params=key)
            for _ in range(3):
                k_host, k_stock = host.params(), stock.params()
                if not np.array_equal(jax.random.key_data(k_host), jax.random.key_data(k_stock)):
                    _warn_once("host_counted", "a host-counted nnx.Rngs draws other keys")
                    return False
            if not isinstance(nnx.RngCount.get_value(host.params.count), np.ndarray):
                _warn_once("host_counted", "flax moved the NumPy draw counter onto the device")
                return False
        except Exception as e:  # noqa: BLE001 - any failure means: take the stock path
            _warn_once("host_counted", f"host-counted nnx.Rngs failed ({type(e).__name__}: {e})")
            return False
    return True


def host_counted(rngs: nnx.Rngs, *, check_keys: bool = True) -> nnx.Rngs:
    """A fresh Rngs seeded with one key from `rngs`, whose draw counter lives on the host.

    Draws the same keys as `nnx.Rngs(params=rngs.params())`, so builds the same
    parameters, but keeps the counter out of the trace: building under
    `nnx.eval_shape` is linear instead of quadratic in the number of layers (see
    the module docstring). A spec's model thus differs from the same module
    constructed directly with `rngs`; both are deterministic. If flax's Rngs
    changed, warns once and returns that stock Rngs. `check_keys=False` skips the
    probe that the keys are flax's (it compiles): only for builds under
    `nnx.eval_shape`, whose values are discarded.
    """
    key = rngs.params()
    works = _host_counting_works() if check_keys else True
    local = _host_counted(key) if works else None
    if local is None:
        _warn_once("host_counted", "nnx.Rngs streams no longer hold an nnx.RngCount")
        return nnx.Rngs(params=key)
    return local


# Reentrant: a forward traced inside a patched region may itself call `ghn.trace`.
_patch_lock = threading.RLock()
_MISSING = object()


@contextlib.contextmanager
def patched_calls(classes: Iterable[type], wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """Sets `cls.__call__ = wrap(<cls.__call__ as resolved before patching>)` for each class.

    Every class is restored on exit, also when the body raises: an own `__call__`
    is put back, an inherited one is deleted again. Each class is wrapped once
    even if listed twice, and a subclass inheriting a listed base's `__call__`
    wraps the base's original, not its wrapper. Patching is process-wide, so the
    whole region holds a lock: a second thread waits here instead of recording
    the first thread's wrapper as the "original" (and a body that blocks on
    another thread's trace would deadlock).
    """
    classes = list(dict.fromkeys(classes))
    with _patch_lock:
        # Resolve all before patching any, so subclasses see the bases' originals.
        originals = [(cls, cls.__dict__.get("__call__", _MISSING), cls.__call__) for cls in classes]
        patched = []
        try:
            for cls, own, resolved in originals:
                wrapped = wrap(resolved)
                try:
                    cls.__call__ = wrapped
                except (TypeError, AttributeError) as e:
                    raise CompatError(
                        f"cannot set {cls.__qualname__}.__call__ ({e}) on {_versions()}; "
                        "ghn.trace needs module classes to be mutable: update ghn/_compat.py "
                        "(patched_calls)"
                    ) from e
                patched.append((cls, own))
                if cls.__dict__.get("__call__") is not wrapped:
                    raise CompatError(
                        f"setting {cls.__qualname__}.__call__ did not take effect on "
                        f"{_versions()}: update ghn/_compat.py (patched_calls)"
                    )
            yield
        finally:
            for cls, own in reversed(patched):
                if own is _MISSING:
                    if "__call__" in cls.__dict__:
                        del cls.__call__
                else:
                    cls.__call__ = own


def coordination_client() -> Any | None:
    """The `jax.distributed` coordination-service client; None when not initialized.

    Also None, with one warning, if JAX's internals changed: callers then use a
    device-collective barrier instead.
    """
    if not jax.distributed.is_initialized():
        return None
    try:
        # Imported here so a JAX without this private module still imports ghn.
        from jax._src import distributed

        client = distributed.global_state.client
    except (ImportError, AttributeError) as e:
        _warn_once("coordination_client", f"jax._src.distributed.global_state.client: {e}")
        return None
    if not callable(getattr(client, "wait_at_barrier", None)):
        _warn_once(
            "coordination_client",
            f"the coordination client {type(client).__name__} has no wait_at_barrier",
        )
        return None
    return client
