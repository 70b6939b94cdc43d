"""Datasets by name: `get_dataset("cifar10", "train", data_dir=...)`."""

from __future__ import annotations

import functools
from collections.abc import Callable

from ghn.data import images, text
from ghn.data.dataset import Dataset
from ghn.errors import ConfigError

_REGISTRY: dict[str, tuple[Callable[..., Dataset], tuple[str, ...]]] = {}


def register_dataset(name: str, builder: Callable[..., Dataset], splits: tuple[str, ...]) -> None:
    """Make `builder(split, **kwargs)` available as `get_dataset(name, split, **kwargs)`."""
    if name in _REGISTRY:
        raise ValueError(f"dataset {name!r} is already registered")
    _REGISTRY[name] = (builder, tuple(splits))


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def dataset_splits(name: str) -> tuple[str, ...]:
    return _lookup(name)[1]


def _lookup(name: str):
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown dataset {name!r}; known: {', '.join(list_datasets())} (or register one "
            "with ghn.data.register_dataset)"
        )
    return _REGISTRY[name]


def get_dataset(name: str, split: str = "train", **kwargs) -> Dataset:
    """One split of a named dataset; kwargs go to its loader (data_dir, tokenizer, ...)."""
    builder, splits = _lookup(name)
    if split not in splits:
        raise ConfigError(f"dataset {name!r} has splits {list(splits)}, not {split!r}")
    return builder(split, **kwargs)


register_dataset("mnist5k", images.mnist5k, ("train", "validation"))
register_dataset("digits", images.digits, ("train", "validation"))
register_dataset("digits28", images.digits28, ("train", "validation"))
register_dataset("cifar10", functools.partial(images.cifar, "cifar10"), ("train", "test"))
register_dataset("cifar100", functools.partial(images.cifar, "cifar100"), ("train", "test"))
register_dataset("imagefolder", images.imagefolder, ("train", "validation", "test"))
register_dataset("pydoc_text", text.pydoc_text, ("train", "validation"))
register_dataset("python_source", text.python_source, ("train", "validation"))
register_dataset(
    "wikitext2", functools.partial(text.wikitext, "wikitext2"), ("train", "validation", "test")
)
register_dataset(
    "wikitext103", functools.partial(text.wikitext, "wikitext103"), ("train", "validation", "test")
)
