"""Names of `jax.tree_util` key paths, as the rest of the package spells parameters.

A key path is a tuple of entries: `DictKey` (`.key`), `SequenceKey` (`.idx`),
`GetAttrKey` (`.name`) or `FlattenedIndexKey` (`.key`). NNX states flatten to
dict keys and integer keys (`blocks/3/attn/qkv/kernel`); this is the one place
that turns an entry into its key, so every module names a parameter the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_ATTRS = ("key", "idx", "name")


def entry_key(entry: Any) -> Any:
    """The dict key, sequence index or attribute name a key-path entry stands for."""
    for attr in _ATTRS:
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """Each entry of a key path as a string: `("blocks", "3", "attn", "qkv", "kernel")`."""
    return tuple(str(entry_key(e)) for e in path)


def path_str(path: Sequence[Any]) -> str:
    """A key path as the package's parameter name: `"blocks/3/attn/qkv/kernel"`."""
    return "/".join(path_names(path))
