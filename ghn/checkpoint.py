"""Crash-safe checkpoints with Orbax: the train state's arrays plus a JSON record.

A checkpoint holds two items: "state" (GHN params, optimizer state, EMA,
step, skipped-step count, RNG; `StandardSave`) and "meta" (JSON: the GHN
config, a digest of the state's tree, the data-iterator and
architecture-sampler positions). Orbax writes each step to a temporary
directory and renames it when complete, so a kill at any moment leaves the
previous checkpoints readable; leftovers of an interrupted save are removed
at the next start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from ghn.errors import GHNError

log = logging.getLogger(__name__)

FORMAT = 1


class CheckpointError(GHNError, RuntimeError):
    """A checkpoint that cannot be used: unreadable, corrupt, or from another set-up."""


def tree_digest(tree) -> str:
    """Paths, shapes and dtypes of a tree's leaves, hashed: equal iff the layouts match."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    desc = [(jax.tree_util.keystr(p), tuple(x.shape), str(x.dtype)) for p, x in leaves]
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]


def error_summary(e: Exception) -> str:
    """An Orbax error in a line: TensorStore appends kilobytes of JSON specs to its messages."""
    text = " ".join(str(e).split(" [tensorstore_spec", 1)[0].split())
    return f"{type(e).__name__}: {text[:500]}{'...' if len(text) > 500 else ''}"


class _UnreadRestoreErrors(logging.Filter):
    """Drops asyncio's report of an Orbax/TensorStore read whose error was never retrieved."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        # asyncio reports an unread Task or an unread Future; TensorStore's errors carry
        # their JSON spec, Orbax's deserializing tasks their module names.
        unread = message.startswith(
            ("Task exception was never retrieved", "Future exception was never retrieved")
        )
        ours = ("orbax" in message and "deserialize" in message) or "tensorstore_spec" in message
        return not (unread and ours)


def drop_closed_loop_errors() -> None:
    """Keeps a failed restore's error readable.

    When one read fails, Orbax closes its event loop while TensorStore still
    finishes the other reads; each late callback then prints "RuntimeError:
    Event loop is closed" as an unraisable exception (measured: 60-160
    tracebacks after one corrupt checkpoint), burying the real error. They
    arrive after the restore has raised, so the filter stays installed.
    """
    # The failed reads' tasks are also garbage-collected with their exception unread,
    # which asyncio logs ("Task exception was never retrieved", a traceback each).
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnreadRestoreErrors) for f in asyncio_log.filters):
        asyncio_log.addFilter(_UnreadRestoreErrors())
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_errors", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_errors = True
    sys.unraisablehook = hook


class Checkpointer:
    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None,
        async_save: bool,
        read_only: bool = False,
    ):
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            enable_async_checkpointing=async_save,
            # A reader must not touch the directory: a run may be saving into it. (Not
            # Orbax's own read_only, which logs two warnings on every open.)
            cleanup_tmp_directories=not read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    @classmethod
    def reader(cls, directory: str | os.PathLike) -> Checkpointer:
        """Reads a run's checkpoints (e.g. while it trains) without creating, deleting or
        cleaning up anything."""
        return cls(directory, max_to_keep=None, async_save=False, read_only=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of finished checkpoints, ascending (an interrupted save is not one)."""
        return sorted(int(s) for s in self.manager.all_steps())

    def save(self, step: int, state, meta: dict[str, Any], *, wait: bool = False) -> None:
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only, for reading checkpoints")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        if wait:
            self.manager.wait_until_finished()

    def _where(self, step: int) -> str:
        return str(self.directory / str(step))

    def read_meta(self, step: int) -> dict[str, Any]:
        drop_closed_loop_errors()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = out["meta"]
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {self._where(step)} is unreadable ({error_summary(e)}). It is "
                "corrupt or not a ghn.train checkpoint: delete that step's directory to resume "
                "from an earlier one, or start in a fresh workdir."
            ) from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(
                f"checkpoint {self._where(step)} has format "
                f"{meta.get('format') if isinstance(meta, dict) else meta!r}; this version "
                f"reads format {FORMAT}"
            )
        return meta

    def check_compatible(self, step: int, meta: dict[str, Any], expected: dict[str, Any]) -> None:
        """A clear error when the checkpoint was written by a differently configured run."""
        saved_ghn, ghn = meta.get("ghn_config", {}), expected["ghn_config"]
        if saved_ghn != ghn:
            diff = {
                k: (saved_ghn.get(k), ghn.get(k))
                for k in sorted(set(saved_ghn) | set(ghn))
                if saved_ghn.get(k) != ghn.get(k)
            }
            detail = ", ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(
                f"checkpoint {self._where(step)} holds a GHN with a different config ({detail}). "
                "Use the same GHN config to resume, or a fresh workdir to start over."
            )
        if meta.get("state_tree") != expected["state_tree"]:
            raise CheckpointError(
                f"checkpoint {self._where(step)} holds a train state of another layout (e.g. "
                "EMA or optimizer settings changed: saved "
                f"{meta.get('state_summary')}, expected {expected['state_summary']}). Resume "
                "with the original settings, or start in a fresh workdir."
            )

    def restore(self, step: int, abstract_state, shardings):
        """The arrays of `step`, laid out by `shardings`."""
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state,
            shardings,
        )
        return self._restore_state(step, ocp.args.StandardRestore(target))

    def restore_as_saved(self, step: int):
        """The arrays of `step` with their saved shapes and dtypes, on the default device
        (reading a run's parameters outside of training)."""
        return self._restore_state(step, ocp.args.StandardRestore())

    def _restore_state(self, step: int, args):
        drop_closed_loop_errors()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=args))
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {self._where(step)} could not be restored ({error_summary(e)}). Its "
                "arrays are missing or corrupt: delete that step's directory to resume from an "
                "earlier checkpoint, or start in a fresh workdir."
            ) from e
        return out["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
