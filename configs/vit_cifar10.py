"""Paper scale: LoGAH meta-trained on ViTs-1K for CIFAR-10 (LoGAH, arXiv 2405.16287, Sec. 4).

    python train.py --config configs/vit_cifar10.py --workdir $WORKDIR \\
        --config.data.data_dir=/path/to/datasets

Needs CIFAR-10's binary version (cifar-10-batches-bin) under data.data_dir or
$GHN_DATA_DIR (`ghn.data` says where it looked and how to get it if missing).
Hardware: one 80 GB GPU (A100/H100) or a TPU v4/v5 host; more hosts shard the
batch (see README). Time: an estimate, not a measurement: ~100 epochs of
50k images at 8 architectures per step is 39k steps, ~1 day on one H100,
dominated by the 8 target forwards per step. Expect held-out ViTs' predicted
parameters to reach well above chance without any training, and to fine-tune
faster than random init (eval.py).

Programs (bucketed path, the default): the 1,000 ViTs fall into 8 shape
buckets, 4 per patch size, cut along the width (`ghn.zoo.bucketed.partition`;
padded cost 1.6x the real, `ghn.zoo.bucketed.cost` over the 1,740-ViT space,
against 3.3x for one bucket per patch size: absent blocks are skipped and heads
run on sub-heads, so depth and head count pad little), and every step's 8
ViTs come from one bucket: 8 training programs in all, plus one evaluation
program per bucket the 20 held-out ViTs fall in and one for the larger ViT. A
bucket program compiled in ~21 s on one H200 for the MNIST-sized buckets of
`configs/vit_mnist.py` (BENCHMARKS.md; the blocks are scanned, so the compile
barely grows with depth): expect a few minutes for all of them, where one
program per architecture (14 s each there) would take ~4 hours over 1,000
ViTs; nothing on a rerun with the compilation cache. `--config.archs.stream=True` trains on a fresh
draw from the same 1,740-ViT space at every step, with the same programs.

Approximations of the paper's recipe: AdamW lr 4e-4, weight decay 1e-2,
predicted-parameter decay 3e-5, clip 5, batch 128, meta-batch 8, cosine
schedule with 5-epoch warm-up. `ghn` is LoGAH-Tiny; use
GHNConfig.named("small"/"base") for the larger GHNs.
"""

import ml_collections

from ghn.hypernet import GHNConfig
from ghn.train import base_config

STEPS_PER_EPOCH = 50_000 // 128


def get_config(num_classes: int = 10) -> ml_collections.ConfigDict:
    """CIFAR-10; `configs/vit_cifar100.py` calls this with 100."""
    config = base_config()
    config.num_steps = 100 * STEPS_PER_EPOCH
    config.log_every = 100
    config.ghn = ml_collections.ConfigDict(GHNConfig.named("tiny", max_dim=4096).to_dict())

    config.archs.sampler = "vits-1k"
    config.archs.ranges = ml_collections.ConfigDict(
        dict(image_size=32, in_channels=3, num_classes=num_classes)
    )
    config.archs.pool_size = 1000
    config.archs.meta_batch_size = 8
    config.archs.buckets = 8

    config.data.name = {10: "cifar10", 100: "cifar100"}[num_classes]
    config.data.eval_split = "test"
    config.data.batch_size = 128
    config.data.augment = True

    config.optim.lr = 4e-4
    config.optim.warmup_steps = 5 * STEPS_PER_EPOCH
    config.ema_decay = 0.999

    config.eval.every = 5 * STEPS_PER_EPOCH
    config.eval.num_heldout = 20
    # ViT-S-like: deeper and wider than any ViTs-1K architecture (depth <= 9, width <= 512).
    config.eval.larger = ml_collections.ConfigDict(dict(depth=12, width=576, num_heads=9))
    config.eval.batch_size = 500

    config.checkpoint.every = 1000
    config.checkpoint.max_to_keep = 3
    return config
