"""Trained GHNs on disk: the ones shipped with the package, exports, and training workdirs.

    hyper = ghn.load("vit-mnist")           # shipped with the package
    hyper = ghn.load("runs/vit_mnist")      # a train.py workdir (its latest checkpoint)
    ghn.checkpoints("runs/vit_mnist")       # [400, 800]: the steps it has checkpoints of
    hyper = ghn.load("runs/vit_mnist", step=400)
    hyper = ghn.load("my_ghn/")             # a directory written by ghn.save

An exported GHN is a directory with `ghn.json` (the `GHNConfig` and what it
was trained on) and `params/` (an Orbax checkpoint of the GHN's parameters as
a plain nested dict of float32 arrays). `python -m ghn export WORKDIR DIR`
turns a training run into one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ghn.checkpoint import (
    Checkpointer,
    CheckpointError,
    drop_closed_loop_errors,
    error_summary,
)
from ghn.errors import ConfigError, GHNError
from ghn.hypernet import GHN, GHNConfig, abstract_ghn
from ghn.treepath import entry_key

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
FORMAT = 1


class GHNNotFoundError(GHNError, FileNotFoundError):
    """Neither a shipped GHN's name nor a directory holding a GHN (or not the step asked for)."""


class CorruptGHNError(GHNError, ValueError):
    """A GHN directory or checkpoint whose record or parameters cannot be used."""


class GHNExistsError(GHNError, FileExistsError):
    """`save` into a directory that already holds a GHN."""


def available() -> dict[str, dict[str, Any]]:
    """The GHNs shipped with the package: name -> what `info(name)` returns."""
    out = {}
    if PRETRAINED_DIR.is_dir():
        for d in sorted(PRETRAINED_DIR.iterdir()):
            if (d / "ghn.json").is_file():
                out[d.name] = _read_json(d / "ghn.json")
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptGHNError(
            f"{path} is not a readable ghn.json ({e}); export the GHN again"
        ) from e
    if record.get("format") != FORMAT:
        raise CorruptGHNError(
            f"{path} has format {record.get('format')!r}; this version reads {FORMAT}: use the "
            "ghn version that wrote it, or export the GHN again with this one"
        )
    return record


def _abstract_params(config: GHNConfig):
    """(graphdef, abstract Param state, its pure-dict view) of a GHN of `config`."""
    abstract = abstract_ghn(config)
    state = nnx.state(abstract, nnx.Param)
    return nnx.graphdef(abstract), state, nnx.to_pure_dict(state)


def train_config_of(info: dict[str, Any]) -> dict[str, Any] | None:
    """The train.py config a GHN was trained with, from `load(..., with_info=True)` or `info`."""
    return info.get("train_config") or info.get("metadata", {}).get("train_config")


def _lookup(raw, path) -> Any:
    """`raw[k1][k2]...` for a tree path, accepting the string keys Orbax restores ints as."""
    node = raw
    for entry in path:
        key = entry_key(entry)
        if isinstance(node, dict):
            node = node[key] if key in node else node[str(key)]
        else:
            node = node[int(key)]
    return node


def _build(config: GHNConfig, params: dict, abstract_params=None) -> GHN:
    """A GHN of `config` holding `params` (a nested dict; string keys for ints are fine).

    `abstract_params` is `_abstract_params(config)` if the caller has it already.
    """
    graphdef, state, abstract = abstract_params or _abstract_params(config)
    leaves = []
    for path, a in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        where = jax.tree_util.keystr(path)
        try:
            x = np.asarray(_lookup(params, path))
        except (KeyError, IndexError, TypeError) as e:
            raise CorruptGHNError(
                f"saved GHN parameters lack {where}, which the config needs: the parameters "
                "and the recorded GHNConfig come from different GHNs"
            ) from e
        if tuple(x.shape) != tuple(a.shape):
            raise CorruptGHNError(
                f"saved GHN parameter {where} has shape {x.shape}, config: {a.shape}: the "
                "parameters and the recorded GHNConfig come from different GHNs"
            )
        # Not jnp.asarray, which compiles a program per shape (JAX 0.10); this only copies.
        leaves.append(jax.device_put(np.asarray(x, a.dtype)))
    pure = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


# How parameters may be stored: float16 halves a GHN on disk (the shipped GHNs must fit
# 15 MB together) at a relative rounding of 2^-11 per parameter; loading casts back to
# the GHN's own dtype.
STORAGE_DTYPES = ("float32", "float16")


def _check_storage_dtype(storage_dtype: str) -> None:
    if storage_dtype not in STORAGE_DTYPES:
        raise ConfigError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")


def _stored(params: dict, storage_dtype: str) -> dict:
    """`params` (NumPy leaves) with floating leaves cast to `storage_dtype`."""
    _check_storage_dtype(storage_dtype)
    dtype = np.dtype(storage_dtype)

    def cast(path, x):
        if not np.issubdtype(x.dtype, np.floating) or x.dtype == dtype:
            return x
        biggest = float(np.abs(x).max(initial=0.0))
        if biggest > float(np.finfo(dtype).max):
            raise ConfigError(
                f"GHN parameter {jax.tree_util.keystr(path)} reaches {biggest:.3g}, past "
                f"{storage_dtype}'s range: store it as float32"
            )
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def save(
    hyper: GHN, directory: str | os.PathLike, *, storage_dtype: str = "float32", **metadata: Any
) -> Path:
    """Writes `hyper` to `directory` (created; must not hold a GHN already), its floating
    parameters as `storage_dtype` ("float32", or "float16": half the size on disk)."""
    directory = Path(directory).absolute()
    if (directory / "ghn.json").exists():
        raise GHNExistsError(f"{directory} already holds a GHN; choose another directory")
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(hyper, nnx.Param)))
    params = _stored(params, storage_dtype)
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / "params", params)
    record = {"format": FORMAT, "ghn_config": hyper.config.to_dict(), "metadata": metadata}
    if storage_dtype != "float32":
        record["storage_dtype"] = storage_dtype
    (directory / "ghn.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return directory


def _resolve(name_or_path: str | os.PathLike) -> Path:
    shipped = PRETRAINED_DIR / str(name_or_path)
    if isinstance(name_or_path, str) and "/" not in name_or_path and shipped.is_dir():
        return shipped
    path = Path(name_or_path).expanduser()
    if (path / "ghn.json").is_file() or (path / "checkpoints").is_dir():
        return path
    names = ", ".join(available()) or "none"
    raise GHNNotFoundError(
        f"no GHN at {name_or_path!r}: not a shipped name (available: {names}), not a directory "
        "with ghn.json (written by ghn.save / `python -m ghn export`), and not a train.py "
        "workdir with checkpoints/"
    )


def checkpoints(workdir: str | os.PathLike) -> list[int]:
    """The steps of a train.py workdir's finished checkpoints, ascending.

    Any of them is `load(workdir, step=...)`; how many a run keeps is its
    `checkpoint.max_to_keep`.
    """
    path = Path(workdir).expanduser()
    if not (path / "checkpoints").is_dir():
        raise GHNNotFoundError(
            f"{workdir} is not a train.py workdir: it has no checkpoints/ directory"
        )
    ckpt = Checkpointer.reader(path / "checkpoints")
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def _from_workdir(workdir: Path, use_ema: bool, step: int | None) -> tuple[GHN, dict[str, Any]]:
    ckpt = Checkpointer.reader(workdir / "checkpoints")
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointError(
                f"{workdir / 'checkpoints'} holds no finished checkpoint: let the run save one "
                "(at its end, on SIGTERM, or every checkpoint.every steps)"
            )
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise GHNNotFoundError(
                f"{workdir} has no checkpoint of step {step}; it has steps {steps}"
            )
        meta = ckpt.read_meta(step)
        config = GHNConfig.from_json(meta["ghn_config"])
        state = ckpt.restore_as_saved(step)
    finally:
        ckpt.close()
    which = "ema" if use_ema and "ema" in state else "params"
    info = {"source": str(workdir), "step": step, "weights": which}
    config_path = workdir / "config.json"
    if config_path.is_file():
        info["train_config"] = json.loads(config_path.read_text())
    return _build(config, jax.tree.map(np.asarray, state[which])), info


def load(
    name_or_path: str | os.PathLike,
    *,
    step: int | None = None,
    use_ema: bool = True,
    with_info: bool = False,
) -> GHN | tuple[GHN, dict[str, Any]]:
    """A trained GHN: a shipped name (`available()`), an exported directory, or a workdir.

    From a train.py workdir the checkpoint of `step` is read (default: the
    latest; `checkpoints(workdir)` lists them), its EMA parameters when it has
    them and `use_ema`. `with_info=True` also returns the record of what the
    GHN was trained on (its `ghn.json`, or the workdir's config and the step).
    """
    path = _resolve(name_or_path)
    if not (path / "ghn.json").is_file():
        hyper, info = _from_workdir(path, use_ema, step)
        return (hyper, info) if with_info else hyper
    record = _read_json(path / "ghn.json")
    if step is not None:
        trained = record.get("metadata", {}).get("train_step", "?")
        raise ConfigError(
            f"step={step} selects a checkpoint of a train.py workdir, but {name_or_path} is an "
            f"exported GHN with one set of parameters (from training step {trained}); leave "
            "step out, or load the workdir it was exported from"
        )
    config = GHNConfig.from_json(record["ghn_config"])
    abstract_params = _abstract_params(config)
    abstract = abstract_params[2]
    stored = record.get("storage_dtype", "float32")
    if stored not in STORAGE_DTYPES:
        raise CorruptGHNError(f"{path / 'ghn.json'} records an unknown storage_dtype {stored!r}")

    def on_disk(a):
        floating = np.issubdtype(np.dtype(a.dtype), np.floating)
        return jax.ShapeDtypeStruct(a.shape, np.dtype(stored) if floating else a.dtype)

    target = jax.tree.map(on_disk, abstract)
    drop_closed_loop_errors()
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(path.absolute() / "params", target)
    except Exception as e:
        raise CorruptGHNError(
            f"the parameters in {path / 'params'} could not be restored ({error_summary(e)}); "
            "the directory is incomplete or corrupt: export or save the GHN again"
        ) from e
    hyper = _build(config, params, abstract_params)
    info = {"source": str(path), **record}
    return (hyper, info) if with_info else hyper


def info(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """What a GHN was trained on, without loading its parameters."""
    path = _resolve(name_or_path)
    if (path / "ghn.json").is_file():
        return {"source": str(path), **_read_json(path / "ghn.json")}
    return load(path, with_info=True)[1]


def export(
    workdir: str | os.PathLike,
    directory: str | os.PathLike,
    *,
    step: int | None = None,
    storage_dtype: str = "float32",
    **metadata: Any,
) -> Path:
    """A train.py workdir's GHN (EMA if any) as an exported GHN directory: that of
    checkpoint `step`, by default the latest, stored as `storage_dtype` (`save`)."""
    _check_storage_dtype(storage_dtype)  # before the checkpoint is read
    hyper, found = load(workdir, step=step, with_info=True)
    train_config = found.get("train_config", {})
    record = {
        "train_step": found["step"],
        "weights": found["weights"],
        "train_config": train_config,
        **metadata,
    }
    versions = Path(workdir) / "versions.json"
    if versions.is_file():
        record["versions"] = json.loads(versions.read_text())
    return save(hyper, directory, storage_dtype=storage_dtype, **record)
