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


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int, async_save: bool):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict[str, Any], *, wait: bool = False) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        if wait:
            self.manager.wait_until_finished()

    def _where(self, step: int) -> str:
        return str(self.directory / str(step))

    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = out["meta"]
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {self._where(step)} is unreadable ({type(e).__name__}: {e}). It is "
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
        try:
            out = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {self._where(step)} could not be restored ({type(e).__name__}: "
                f"{e}). Its arrays are missing or corrupt: delete that step's directory to "
                "resume from an earlier checkpoint, or start in a fresh workdir."
            ) from e
        return out["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
