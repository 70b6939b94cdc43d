"""Dataset objects: metadata for sizing models, plus deterministic batch iterators."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ghn.data.iterator import Batch, DataIterator, stream_rng
from ghn.errors import ConfigError, GHNError

DATA_DIR_ENV = "GHN_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/ghn/datasets"

_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


class DatasetNotFoundError(GHNError, FileNotFoundError):
    """A dataset's files are missing; the message says where we looked and how to get them."""


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """`data_dir`, else $GHN_DATA_DIR, else ~/.cache/ghn/datasets."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def not_found(what: str, required: Sequence[str], candidates: Sequence[Path], howto: str):
    """The error for missing files: what was needed, every place looked, and how to get it."""
    looked = "\n  ".join(str(d) for d in candidates)
    return DatasetNotFoundError(
        f"{what} not found: no {', '.join(required)} in any of\n  {looked}\n{howto} "
        f"Pass data_dir=... or set ${DATA_DIR_ENV} to choose where to look."
    )


def find_dir(candidates: Sequence[Path], required: Sequence[str], what: str, howto: str) -> Path:
    """The first candidate directory holding every `required` file, else a clear error."""
    for d in candidates:
        if all((d / f).is_file() for f in required):
            return d
    raise not_found(what, required, candidates, howto)


def check_split(name: str, split: str, splits: Sequence[str]) -> None:
    if split not in splits:
        raise ConfigError(f"dataset {name!r} has splits {list(splits)}, not {split!r}")


def random_crop_flip(
    x_BxYxXxC: np.ndarray, dy_B: np.ndarray, dx_B: np.ndarray, flip_B: np.ndarray, pad: int
) -> np.ndarray:
    """Zero-pad by `pad`, crop back to YxX at offsets (dy, dx), mirror left-right where `flip`."""
    B, Y, X, _ = x_BxYxXxC.shape
    xp = np.pad(x_BxYxXxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows_BxY = dy_B[:, None] + np.arange(Y)
    cols_BxX = dx_B[:, None] + np.arange(X)
    cols_BxX = np.where(flip_B[:, None], cols_BxX[:, ::-1], cols_BxX)
    return xp[np.arange(B)[:, None, None], rows_BxY[:, :, None], cols_BxX[:, None, :]]


class Dataset:
    """One split of a dataset. `kind` is "image" or "text"."""

    kind: str
    name: str
    split: str

    def info(self) -> dict[str, Any]:
        """Metadata as plain JSON values (for configs and the run's workdir)."""
        raise NotImplementedError


class ImageDataset(Dataset):
    """Labelled images; pixels are stored as uint8 and normalized per batch.

    `read(ids) -> uint8 (n, H, W, C)` fetches pixels, so a dataset can live in
    memory (CIFAR, MNIST) or be decoded from files on demand (image folders).
    """

    kind = "image"

    def __init__(
        self,
        name: str,
        split: str,
        *,
        labels: np.ndarray,
        num_classes: int,
        image_shape: tuple[int, int, int],
        mean: Sequence[float],
        std: Sequence[float],
        images: np.ndarray | None = None,
        read: Callable[[np.ndarray], np.ndarray] | None = None,
        augment: bool = False,
        class_names: Sequence[str] | None = None,
    ):
        if (images is None) == (read is None):
            raise ValueError("give exactly one of images= or read=")
        self.name, self.split = name, split
        self.labels = np.asarray(labels, np.int32)
        self.num_classes = int(num_classes)
        self.image_shape = tuple(int(s) for s in image_shape)
        C = self.image_shape[-1]
        self.mean = np.broadcast_to(np.asarray(mean, np.float32), (C,)).copy()
        self.std = np.broadcast_to(np.asarray(std, np.float32), (C,)).copy()
        self.images = images
        self._read = read if read is not None else images.__getitem__
        self.default_augment = augment
        self.class_names = list(class_names) if class_names is not None else None
        if images is not None and (
            len(images) != len(self.labels) or images.shape[1:] != self.image_shape
        ):
            raise ValueError(
                f"images {images.shape} do not match labels {self.labels.shape} "
                f"and image_shape {self.image_shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "split": self.split,
            "kind": self.kind,
            "num_examples": len(self),
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
        }

    def read(self, ids: np.ndarray) -> np.ndarray:
        """uint8 pixels (n, H, W, C) of examples `ids`."""
        return self._read(np.asarray(ids))

    def normalize(self, x_BxYxXxC: np.ndarray) -> np.ndarray:
        scale = (1.0 / (255.0 * self.std)).astype(np.float32)
        return x_BxYxXxC.astype(np.float32) * scale - (self.mean / self.std).astype(np.float32)

    def iterator(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        augment: bool | None = None,
        normalize: bool = True,
        num_epochs: int | None = None,
        drop_remainder: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> DataIterator:
        """Batches dict(image=float32 (b, H, W, C), label=int32 (b,)), b = batch_size / processes.

        Shuffling permutes the examples per epoch from (seed, epoch); augmentation
        (zero-pad by H//8, random crop, horizontal flip; default on for CIFAR
        train) draws per global row from (seed, step). `normalize=False` gives
        pixels in [0, 1]. `process_index`/`process_count` default to JAX's.
        """
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        augment = self.default_augment if augment is None else augment
        n = len(self)
        pad = max(1, self.image_shape[0] // 8)

        def order(epoch: int) -> np.ndarray:
            if not shuffle:
                return np.arange(n)
            return stream_rng(seed, epoch, _ORDER_STREAM).permutation(n)

        def fetch(ids: np.ndarray, lo: int, B: int, step: int) -> Batch:
            x = self.read(ids)
            if augment:
                rng = stream_rng(seed, step, _AUGMENT_STREAM)
                dy, dx = rng.integers(0, 2 * pad + 1, size=(2, B))
                flip = rng.random(B) < 0.5
                rows = slice(lo, lo + len(ids))
                x = random_crop_flip(x, dy[rows], dx[rows], flip[rows], pad)
            image = self.normalize(x) if normalize else x.astype(np.float32) / np.float32(255)
            return {"image": image, "label": self.labels[ids]}

        return DataIterator(
            order_fn=order,
            fetch_fn=fetch,
            batch_size=batch_size,
            num_epochs=num_epochs,
            drop_remainder=drop_remainder,
            process_index=process_index,
            process_count=process_count,
            config={"seed": seed, "shuffle": shuffle, "augment": augment, "num_examples": n},
        )


class TextDataset(Dataset):
    """A token stream; batches are windows of seq_len + 1 tokens (inputs and shifted targets)."""

    kind = "text"

    def __init__(self, name: str, split: str, *, tokens: np.ndarray, tokenizer):
        self.name, self.split = name, split
        self.tokens = tokens
        self.tokenizer = tokenizer
        self.vocab_size = int(tokenizer.vocab_size)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "split": self.split,
            "kind": self.kind,
            "num_tokens": len(self),
            "vocab_size": self.vocab_size,
            "tokenizer": self.tokenizer.name,
        }

    def num_windows(self, seq_len: int, shuffle: bool = False) -> int:
        """Windows per epoch: stride seq_len, so each token is a target once per epoch.

        Shuffled epochs start at a random offset in [0, seq_len), so their count
        is the one that fits for every offset.
        """
        T, L = len(self), seq_len
        return (T - L) // L if shuffle else (T - 1) // L

    def iterator(
        self,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        drop_remainder: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> DataIterator:
        """Batches dict(tokens=int32 (b, seq_len + 1)), b = batch_size / processes.

        Sequential: windows start at 0, L, 2L, ... in order. Shuffled: each epoch
        draws an offset and a permutation of the windows from (seed, epoch).
        """
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        nw = self.num_windows(seq_len, shuffle)
        if nw <= 0:
            raise ValueError(
                f"{self.name}/{self.split} has {len(self)} tokens, too few for "
                f"one window of seq_len + 1 = {seq_len + 1}"
            )
        offsets_L1 = np.arange(seq_len + 1)

        def order(epoch: int) -> np.ndarray:
            starts = np.arange(nw) * seq_len
            if not shuffle:
                return starts
            rng = stream_rng(seed, epoch, _ORDER_STREAM)
            return int(rng.integers(seq_len)) + starts[rng.permutation(nw)]

        def fetch(starts: np.ndarray, lo: int, B: int, step: int) -> Batch:
            return {"tokens": self.tokens[starts[:, None] + offsets_L1].astype(np.int32)}

        return DataIterator(
            order_fn=order,
            fetch_fn=fetch,
            batch_size=batch_size,
            num_epochs=num_epochs,
            drop_remainder=drop_remainder,
            process_index=process_index,
            process_count=process_count,
            config={"seed": seed, "shuffle": shuffle, "seq_len": seq_len, "num_tokens": len(self)},
        )


def stratified_split(
    labels: np.ndarray, validation_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: the last `fraction` of each class, in file order, validates.

    Train indices are in file order. Validation indices take the classes in
    turn (first of each class, then second of each, ...), so every prefix of
    the split, e.g. the first few evaluation batches, covers all classes evenly.
    """
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val.append(idx[len(idx) - round(validation_fraction * len(idx)) :])
    is_val = np.zeros(len(labels), bool)
    is_val[np.concatenate(val)] = True
    rank = np.concatenate([np.arange(len(v)) for v in val])
    cls = np.concatenate([np.full(len(v), i) for i, v in enumerate(val)])
    val_order = np.concatenate(val)[np.lexsort((cls, rank))]
    return np.flatnonzero(~is_val), val_order
