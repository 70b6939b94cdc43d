"""Run records: metrics as JSON lines (and TensorBoard when installed), config and versions."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import platform
from pathlib import Path
from typing import Any

import jax

log = logging.getLogger(__name__)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; "nan" stays readable
    return v


class MetricWriter:
    """Appends one JSON object per line to `metrics.jsonl`; only process 0 writes."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled and tensorboard:
            self._tb = _tensorboard_writer(Path(workdir) / "tensorboard")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: _jsonable(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            prefix = record.get("split", "train")
            tag = f"{prefix}/{record['arch']}" if "arch" in record else prefix
            for k, v in record.items():
                if isinstance(v, int | float) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(f"{tag}/{k}", v, record.get("step", 0))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(logdir: Path):
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter(str(logdir))
    except ImportError:
        pass
    try:
        import tensorflow as tf

        writer = tf.summary.create_file_writer(str(logdir))

        class _TF:
            def add_scalar(self, tag, value, step):
                with writer.as_default():
                    tf.summary.scalar(tag, value, step=step)

            def flush(self):
                writer.flush()

            def close(self):
                writer.close()

        return _TF()
    except ImportError:
        log.info("no tensorboardX or tensorflow: metrics go to metrics.jsonl only")
        return None


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of `workdir/metrics.jsonl`, in order."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    devices = jax.devices()
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "optax": _version("optax"),
        "orbax-checkpoint": _version("orbax-checkpoint"),
        "numpy": _version("numpy"),
        "ml_collections": _version("ml_collections"),
        "ghn": _version("ghn"),
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
    }


def write_json(path: Path, obj: Any) -> None:
    """Write then rename, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
