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

    def sums(self, model, batch: dict[str, jax.Array], dtype=jnp.float32) -> dict[str, jax.Array]:
        """Masked sums of the loss and the metric's numerator, and the count they are over."""
        if self.kind == "text":
            tokens_BxL1 = batch["tokens"]
            logits_BxLxV = model(tokens_BxL1[:, :-1]).astype(jnp.float32)
            labels_BxL = tokens_BxL1[:, 1:]
            nll_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, labels_BxL)
            w_BxL = jnp.ones(nll_BxL.shape, jnp.float32)
            if "mask" in batch:
                w_BxL = w_BxL * batch["mask"].astype(jnp.float32)[:, None]
            loss_sum = jnp.sum(nll_BxL * w_BxL)
            return {"loss_sum": loss_sum, "metric_sum": loss_sum, "count": jnp.sum(w_BxL)}
        x_BxHxWxC = batch["image"].astype(dtype)
        logits_BxK = model(x_BxHxWxC).astype(jnp.float32)
        labels_B = batch["label"]
        nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxK, labels_B)
        correct_B = (jnp.argmax(logits_BxK, axis=-1) == labels_B).astype(jnp.float32)
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


TEXT_DATASETS = ("pydoc_text", "wikitext2", "wikitext103")


def _dataset_kwargs(data_config, train: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if data_config.name in TEXT_DATASETS:
        kw["tokenizer"] = data_config.tokenizer
        if data_config.tokenizer_dir:
            kw["tokenizer_dir"] = data_config.tokenizer_dir
        if data_config.cache_dir and data_config.name != "pydoc_text":
            kw["cache_dir"] = data_config.cache_dir
    else:
        kw["augment"] = bool(data_config.augment) and train
    if data_config.data_dir:
        kw["data_dir"] = data_config.data_dir
    return kw


def load_datasets(data_config):
    """(task, train split, eval split) of `config.data`."""
    train = ghn_data.get_dataset(
        data_config.name, data_config.train_split, **_dataset_kwargs(data_config, True)
    )
    evals = ghn_data.get_dataset(
        data_config.name, data_config.eval_split, **_dataset_kwargs(data_config, False)
    )
    if train.kind == "text" and data_config.seq_len <= 0:
        raise ValueError(f"text dataset {data_config.name!r} needs data.seq_len > 0")
    return Task(train.kind, data_config.seq_len if train.kind == "text" else 0), train, evals


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
            raise ValueError(
                f"architecture {spec.name} does not fit {dataset.name}: {detail}; set them in "
                "archs.ranges (or the architecture dataset)"
            )


def train_iterator(data_config, task: Task, dataset, seed: int, process_index, process_count):
    kw = dict(seed=seed, process_index=process_index, process_count=process_count)
    if task.kind == "text":
        return dataset.iterator(data_config.batch_size, task.seq_len, **kw)
    return dataset.iterator(data_config.batch_size, **kw)


def eval_batches(eval_config, task: Task, dataset, process_index, process_count) -> list:
    """This process's rows of every evaluation batch (padded last batch with a mask)."""
    kw = dict(
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
        process_index=process_index,
        process_count=process_count,
    )
    if task.kind == "text":
        it = dataset.iterator(eval_config.batch_size, task.seq_len, **kw)
    else:
        it = dataset.iterator(eval_config.batch_size, **kw)
    out = []
    for batch in it:
        out.append(batch)
        if eval_config.max_batches and len(out) >= eval_config.max_batches:
            break
    return out
