"""The meta-training configuration: every key with its default, in one `ConfigDict`.

Config files (`configs/*.py`) start from `base_config()` and change what they
need; `train.py` locks the result, so a misspelled override is an error.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from ghn.errors import ConfigError
from ghn.hypernet import GHNConfig
from ghn.train import step

NONFINITE = ("skip", "stop")


def base_config() -> ml_collections.ConfigDict:
    """Defaults for every key `ghn.train.run` reads."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 1000
    c.log_every = 10
    c.progress_bar = True
    c.tensorboard = True
    # Fields of `GHNConfig`; LoGAH-Tiny unless a config says otherwise.
    c.ghn = ml_collections.ConfigDict(GHNConfig.named("tiny").to_dict())

    c.archs = ml_collections.ConfigDict()
    c.archs.sampler = "vits-1k"
    # Keyword arguments of `ghn.zoo.sample`: the sampler's ranges and fixed
    # spec fields (image_size, num_classes, vocab_size, ...).
    c.archs.ranges = ml_collections.ConfigDict()
    c.archs.pool_size = 1000  # distinct training architectures drawn once
    c.archs.seed = 0
    c.archs.dataset = ""  # an architecture-dataset JSON; replaces sampler/ranges/pool_size
    c.archs.meta_batch_size = 8  # m architectures per step
    # True: ViTs and GPT-2s of a bucket share one compiled training program (padded
    # shapes, masks; ghn.zoo.bucketed); other families (and all, with False) compile
    # one program per architecture. Same losses and, in float64, the same
    # meta-gradients (tests/float64_gap.py); in float32 the gradients differ by
    # ~1e-4 of their norm, as any two programs whose round-off flips the decoder's ReLUs.
    c.archs.bucketed = True
    # Shape buckets in all, at least one per group of architectures that share their
    # fixed fields (patch and image size, vocabulary, ...); cut along width, depth
    # and head count to minimize padded weights plus attention
    # (ghn.zoo.bucketed.partition). A step's m architectures come from one bucket, so
    # each bucket is one training program.
    c.archs.buckets = 6
    # True: no pool; every position of the run is a fresh draw from the sampler
    # (pool_size only sizes the draw the held-out architectures come from). Needs a
    # sampler whose architectures can be listed (vits-1k, gpts-1k) for the buckets.
    c.archs.stream = False
    # > 0: a pool of per-architecture programs (cell networks) is visited `window`
    # architectures at a time, `window_epochs` epochs over each, then the next
    # window, cycling (ghn.train.ArchSampler). Keep window + the evaluation
    # architectures within program_cache_size: each architecture then compiles once
    # per visit instead of being evicted and reloaded at almost every step, so the
    # pool is no longer capped by the programs a process can keep.
    c.archs.window = 0
    c.archs.window_epochs = 1

    c.data = ml_collections.ConfigDict()
    c.data.name = "mnist5k"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.batch_size = 128  # global, shared by the m architectures of a step
    c.data.seq_len = 0  # text datasets only
    c.data.data_dir = ""
    c.data.tokenizer = "byte"  # text datasets only: "byte" or "gpt2"
    c.data.tokenizer_dir = ""  # GPT-2 BPE files (vocab.json, merges.txt)
    c.data.cache_dir = ""  # WikiText: where BPE-encoded ids are cached
    c.data.augment = False  # image datasets only

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 4e-4
    c.optim.weight_decay = 1e-2
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.warmup_steps = 100
    c.optim.end_lr_ratio = 0.0  # cosine decays to lr * end_lr_ratio at num_steps
    c.optim.grad_clip = 5.0  # global norm; 0 disables
    c.optim.pred_weight_decay = 3e-5  # times the sum of L2 norms of predicted parameters

    c.ema_decay = 0.0  # 0 disables the EMA of GHN parameters
    c.bf16 = False  # target forward in bfloat16 (the GHN and its decoder stay float32)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # devices on the `data` axis; -1: all
    c.mesh.fsdp = False  # shard the GHN's large parameters (and optimizer state) over `data`
    c.mesh.fsdp_min_size = 2**16  # parameters with fewer elements stay replicated

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # steps; 0: only at the end
    c.eval.num_heldout = 2  # architectures held out of the training pool
    # Spec fields overriding the first training architecture, giving one
    # evaluation architecture larger than any in training; empty: none.
    c.eval.larger = ml_collections.ConfigDict()
    c.eval.batch_size = 250
    c.eval.max_batches = 0  # 0: the whole split
    c.eval.use_ema = True  # evaluate the EMA parameters when there are any
    c.eval.enabled = True

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.enabled = True
    c.checkpoint.every = 0  # steps; 0: only at the end and on SIGTERM/SIGINT
    c.checkpoint.max_to_keep = 2
    c.checkpoint.async_save = True

    c.nonfinite = "skip"  # a NaN/Inf loss or gradient: "skip" the update, or "stop"
    # "" -> $GHN_COMPILATION_CACHE or ~/.cache/ghn/xla; "off" disables it.
    c.compilation_cache_dir = ""
    # Per-architecture programs kept compiled (least recently used dropped). Each
    # holds ~2,000 memory mappings on CPU and Linux allows 65,530 per process.
    c.program_cache_size = 16

    c.debug = ml_collections.ConfigDict()
    c.debug.nan_step = -1  # tests only: make the loss and gradients NaN at this step
    c.debug.sleep_per_step = 0.0  # tests only: seconds to idle after each step
    return c


def ghn_config(config: ml_collections.ConfigDict) -> GHNConfig:
    return GHNConfig.from_json(config.ghn.to_dict())


# The config is read here and in `Trainer` only; library functions take plain values.


def dataset_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`ghn.tasks.load_datasets` arguments from `config.data`."""
    d = config.data
    return dict(
        train_split=d.train_split,
        eval_split=d.eval_split,
        seq_len=d.seq_len,
        tokenizer=d.tokenizer,
        tokenizer_dir=d.tokenizer_dir,
        cache_dir=d.cache_dir,
        data_dir=d.data_dir,
        augment=d.augment,
    )


def optimizer(config: ml_collections.ConfigDict):
    """(the GHN's optimizer, its schedule's numbers) from `config.optim`."""
    o = config.optim
    tx = step.make_optimizer(grad_clip=o.grad_clip, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
    schedule = step.schedule_hparams(
        lr=o.lr,
        warmup_steps=o.warmup_steps,
        end_lr_ratio=o.end_lr_ratio,
        num_steps=config.num_steps,
    )
    return tx, schedule


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` (a ValueError) naming the key for values no run could use."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"bad config: {message}")

    need(config.num_steps >= 0, f"num_steps must be >= 0, got {config.num_steps}")
    need(config.log_every >= 1, f"log_every must be >= 1, got {config.log_every}")
    need(config.archs.meta_batch_size >= 1, "archs.meta_batch_size must be >= 1")
    need(config.archs.pool_size >= 1, "archs.pool_size must be >= 1")
    need(config.archs.buckets >= 1, "archs.buckets must be >= 1")
    need(
        not (config.archs.stream and config.archs.dataset),
        "archs.stream draws from archs.sampler; it cannot be used with archs.dataset",
    )
    need(config.archs.window >= 0, "archs.window must be >= 0")
    need(config.archs.window_epochs >= 1, "archs.window_epochs must be >= 1")
    need(
        not (config.archs.window and config.archs.stream),
        "archs.window visits a pool; it cannot be used with archs.stream",
    )
    need(config.data.batch_size >= 1, "data.batch_size must be >= 1")
    need(config.nonfinite in NONFINITE, f"nonfinite must be one of {NONFINITE}")
    need(0.0 <= config.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {config.ema_decay}")
    need(config.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    need(config.optim.grad_clip >= 0, "optim.grad_clip must be >= 0")
    need(config.eval.every >= 0 and config.checkpoint.every >= 0, "every must be >= 0")
    need(config.eval.num_heldout >= 0, "eval.num_heldout must be >= 0")
    need(config.program_cache_size >= 1, "program_cache_size must be >= 1")
    ghn_config(config)  # GHNConfig's own checks
