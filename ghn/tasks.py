"""Tasks: what a target model is trained on, its loss, and its metric.

"image": classification, batches dict(image, label); metric accuracy.
"text": next-token prediction, batches dict(tokens (b, L + 1)); metric perplexity.
Losses are returned as masked sums plus a count, so evaluation can add up
batches of which the last is padded (`mask`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ghn import data as ghn_data
from ghn.errors import ConfigError
from ghn.zoo import ArchSpec


@dataclasses.dataclass(frozen=True)
class Task:
    kind: str  # "image" or "text"
    seq_len: int = 0

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "image" else "perplexity"

    def input_spec(self, spec: ArchSpec, batch_size: int = 2) -> jax.ShapeDtypeStruct:
        """The model input `prepare` traces the architecture with."""
        if self.kind == "text":
            return spec.input_spec(batch_size, seq_len=self.seq_len)
        return spec.input_spec(batch_size)

    def logits_and_labels(self, model, batch: dict[str, jax.Array], dtype=jnp.float32) -> tuple:
        """float32 logits and the labels they predict: next tokens for text, classes for images."""
        if self.kind == "text":
            tokens_BxL1 = batch["tokens"]
            return model(tokens_BxL1[:, :-1]).astype(jnp.float32), tokens_BxL1[:, 1:]
        return model(batch["image"].astype(dtype)).astype(jnp.float32), batch["label"]

    def sums(self, model, batch: dict[str, jax.Array], dtype=jnp.float32) -> dict[str, jax.Array]:
        """Masked sums of the loss and the metric's numerator, and the count they are over."""
        if self.kind == "text":
            logits_BxLxV, labels_BxL = self.logits_and_labels(model, batch)
            nll_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, labels_BxL)
            w_BxL = jnp.ones(nll_BxL.shape, jnp.float32)
            if "mask" in batch:
                w_BxL = w_BxL * batch["mask"].astype(jnp.float32)[:, None]
            loss_sum = jnp.sum(nll_BxL * w_BxL)
            return {"loss_sum": loss_sum, "metric_sum": loss_sum, "count": jnp.sum(w_BxL)}
        logits_BxV, labels_B = self.logits_and_labels(model, batch, dtype)
        nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxV, labels_B)
        correct_B = (jnp.argmax(logits_BxV, axis=-1) == labels_B).astype(jnp.float32)
        w_B = batch["mask"].astype(jnp.float32) if "mask" in batch else jnp.ones_like(nll_B)
        return {
            "loss_sum": jnp.sum(nll_B * w_B),
            "metric_sum": jnp.sum(correct_B * w_B),
            "count": jnp.sum(w_B),
        }

    def summarize(self, loss: float, metric_mean: float) -> dict[str, float]:
        """Host-side metrics from the mean loss and the mean of the metric's numerator."""
        if self.kind == "text":
            return {"loss": loss, "perplexity": math.exp(min(loss, 80.0))}
        return {"loss": loss, "accuracy": metric_mean}


# Text corpora read whole from Python itself (no files, nothing to cache) and all text.
OFFLINE_TEXT = ("pydoc_text", "python_source")
TEXT_DATASETS = (*OFFLINE_TEXT, "wikitext2", "wikitext103")


def dataset_kwargs(
    name: str,
    *,
    train: bool,
    tokenizer: str = "byte",
    tokenizer_dir: str = "",
    cache_dir: str = "",
    data_dir: str = "",
    augment: bool = False,
) -> dict[str, Any]:
    """The keyword arguments `ghn.data.get_dataset` takes for dataset `name`."""
    kw: dict[str, Any] = {}
    if name in TEXT_DATASETS:
        kw["tokenizer"] = tokenizer
        if tokenizer_dir:
            kw["tokenizer_dir"] = tokenizer_dir
        if cache_dir and name not in OFFLINE_TEXT:
            kw["cache_dir"] = cache_dir
    else:
        kw["augment"] = bool(augment) and train
    if data_dir:
        kw["data_dir"] = data_dir
    return kw


def task_of(train, seq_len: int = 0) -> Task:
    """The task a training split defines (text needs the sequence length)."""
    if train.kind == "text" and seq_len <= 0:
        raise ConfigError(
            f"text dataset {train.name!r} needs a sequence length: set seq_len > 0 "
            "(train.py: --config.data.seq_len; eval.py: --seq_len)"
        )
    return Task(train.kind, seq_len if train.kind == "text" else 0)


def load_datasets(
    name: str,
    *,
    train_split: str = "train",
    eval_split: str = "validation",
    seq_len: int = 0,
    **kwargs: Any,
):
    """(task, train split, evaluation split) of dataset `name`.

    `kwargs` are those of `dataset_kwargs` (tokenizer, data_dir, augment, ...).
    """
    train = ghn_data.get_dataset(name, train_split, **dataset_kwargs(name, train=True, **kwargs))
    evals = ghn_data.get_dataset(name, eval_split, **dataset_kwargs(name, train=False, **kwargs))
    return task_of(train, seq_len), train, evals


def task_fields(task: Task, dataset) -> dict[str, Any]:
    """Spec fields the data fixes, checked against every architecture."""
    if task.kind == "text":
        return {"vocab_size": dataset.vocab_size}
    h, w, c = dataset.image_shape
    return {"image_size": h, "in_channels": c, "num_classes": dataset.num_classes}


def check_archs(task: Task, dataset, specs) -> None:
    """A clear error when an architecture does not fit the data (wrong classes, vocab, size)."""
    fields = task_fields(task, dataset)
    for spec in specs:
        wrong = {k: (getattr(spec, k), v) for k, v in fields.items() if getattr(spec, k, v) != v}
        if task.kind == "text" and getattr(spec, "context_length", task.seq_len) < task.seq_len:
            wrong["context_length"] = (spec.context_length, f">= seq_len {task.seq_len}")
        if wrong:
            detail = ", ".join(f"{k}={a} (data needs {b})" for k, (a, b) in wrong.items())
            raise ConfigError(
                f"architecture {spec.name} does not fit {dataset.name}: {detail}; set them in "
                "archs.ranges (or the architecture dataset)"
            )


def train_iterator(
    dataset,
    task: Task,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
):
    """An endless, resumable iterator of this process's rows of each training batch."""
    kw = dict(seed=seed, process_index=process_index, process_count=process_count)
    if task.kind == "text":
        return dataset.iterator(batch_size, task.seq_len, **kw)
    return dataset.iterator(batch_size, **kw)


def eval_batches(
    dataset,
    task: Task,
    *,
    batch_size: int,
    max_batches: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> list:
    """This process's rows of every evaluation batch (padded last batch with a mask).

    `max_batches=0` takes the whole split.
    """
    kw = dict(
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
        process_index=process_index,
        process_count=process_count,
    )
    if task.kind == "text":
        it = dataset.iterator(batch_size, task.seq_len, **kw)
    else:
        it = dataset.iterator(batch_size, **kw)
    out = []
    for batch in it:
        out.append(batch)
        if max_batches and len(out) >= max_batches:
            break
    return out
