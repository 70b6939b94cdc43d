"""Shared helpers for benchmark scripts (each prints one JSON line per measurement)."""

import json
import os
import platform
import resource
import sys
import time

import jax


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def presets_from_argv(default: list[str]) -> list[str]:
    names = [a for a in sys.argv[1:] if not a.startswith("-")]
    return names or default
