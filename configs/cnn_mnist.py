"""LoGAH-Tiny meta-trained on small randomly wired cell networks (cnns-1k) for MNIST-5k.

    python train.py --config configs/cnn_mnist.py --workdir /tmp/cnn_mnist

Hardware: 2 CPU cores suffice. Time: 15.5 minutes measured on 2 Intel Xeon cores
(2.5 of them shared with another job), 4 of them compiling: cell networks have
no bucketed form (their graphs differ in which operations they hold and how
they connect, not only in sizes), so each
of the 16 training and 3 evaluation networks compiles its own program.
Measured: the task loss of the predicted networks falls from ~2.3 to 1.30
(training accuracy 0.56) over the 1,500 steps; the two held-out networks reach
0.21 accuracy with predicted parameters and no training (chance: 0.10), the
larger one (6 cells, width 32) 0.14. All networks use BatchNorm: with the three
norms of cnns-1k mixed (BatchNorm, LayerNorm, none) and 6 training networks,
the GHN fits its training networks (accuracy 0.68) and stays at chance on the
held-out ones (RESULTS.md, "Cell networks"). Breadth is what generalizes here,
and each new cell network costs a compile.
"""

import ml_collections

from ghn.hypernet import GHNConfig
from ghn.train import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.num_steps = 1500
    config.log_every = 50
    config.ghn = ml_collections.ConfigDict(GHNConfig.named("tiny", max_dim=1024).to_dict())

    config.archs.sampler = "cnns-1k"
    # cnns-1k shrunk for 28x28x1 digits and a CPU: 3-4 cells, width 8-16.
    config.archs.ranges = ml_collections.ConfigDict(
        dict(
            image_size=28,
            in_channels=1,
            num_classes=10,
            num_cells=(3, 4),
            nodes=(2, 3),
            width=(8, 16),
            # BatchNorm only: with a few training networks, mixing in LayerNorm and
            # norm-free cells left held-out networks at chance (RESULTS.md).
            norms=("bn",),
        )
    )
    config.archs.pool_size = 16
    config.archs.meta_batch_size = 2

    config.data.name = "mnist5k"
    config.data.batch_size = 64

    config.optim.lr = 1e-3
    config.optim.warmup_steps = 20

    config.eval.every = 750
    config.eval.num_heldout = 2
    config.eval.larger = ml_collections.ConfigDict(dict(num_cells=6, width=32))
    config.eval.batch_size = 200

    config.checkpoint.every = 750
    return config
