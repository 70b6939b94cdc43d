"""JAX's persistent compilation cache, and counting what it saves.

Every architecture is its own XLA program; with the cache on, a second run
(or a restarted one) loads them from disk instead of compiling.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import jax

log = logging.getLogger(__name__)

CACHE_ENV = "GHN_COMPILATION_CACHE"
DEFAULT_DIR = "~/.cache/ghn/xla"

_lock = threading.Lock()
_counts = {"hits": 0, "saved_s": 0.0}
_listening = False


def _on_event(event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        with _lock:
            _counts["hits"] += 1


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/compilation_cache/compile_time_saved_sec":
        with _lock:
            _counts["saved_s"] += duration


def persistent_cache_counts() -> dict[str, float]:
    """Programs this process loaded from the persistent cache, and the compile time saved."""
    with _lock:
        return dict(_counts)


def resolve_dir(setting: str) -> Path | None:
    if setting == "off":
        return None
    return Path(setting or os.environ.get(CACHE_ENV) or DEFAULT_DIR).expanduser()


def enable(setting: str = "") -> Path | None:
    """Turns the persistent cache on at `setting` (see `resolve_dir`); returns the directory.

    The cache directory is process-wide: if another one is already active, it
    stays, with a warning.
    """
    global _listening
    path = resolve_dir(setting)
    if not _listening:
        jax.monitoring.register_event_listener(_on_event)
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _listening = True
    if path is None:
        return None
    current = jax.config.jax_compilation_cache_dir
    if current and Path(current) != path:
        log.warning("compilation cache already at %s; not switching to %s", current, path)
        return Path(current)
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Small programs too: a step's programs compile in seconds on a CPU, not minutes.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
