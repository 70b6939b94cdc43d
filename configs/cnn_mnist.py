"""LoGAH-Tiny meta-trained on small randomly wired cell networks (cnns-1k) for MNIST-5k.

    python train.py --config configs/cnn_mnist.py --workdir /tmp/cnn_mnist

Hardware: 2 CPU cores suffice. Time: 48 minutes measured on 2 AMD EPYC cores,
27 of them compiling: cell networks have no bucketed form (their graphs differ
in which operations they hold and how they connect, not only in sizes), so
each of the 100 training and 5 evaluation networks compiles its own program
(~12 s each). The pool is visited 10 networks at a time (`archs.window`), 30
epochs over each window, twice over the pool, so the 16 compiled programs a
process keeps hold the current window and the evaluation networks.
Measured (the shipped `cnn-mnist`): the four held-out networks reach 0.58,
0.47, 0.53 and 0.23 accuracy with predicted parameters and no training
(validation split, batch statistics; chance 0.10), the larger one (6 cells,
width 32) 0.17. With the first 16 networks of the same pool for the same 3,000
steps the held-out networks stay lower (RESULTS.md, "Cell networks"): breadth
is what generalizes here, and each new cell network costs a compile.
"""

import ml_collections

from ghn.hypernet import GHNConfig
from ghn.train import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.num_steps = 3000
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
    # 100 networks, more than the 16 programs a process keeps compiled: visited a
    # window of 10 at a time (+ 5 evaluation networks = 15 programs), 30 epochs each.
    config.archs.pool_size = 100
    config.archs.window = 10
    config.archs.window_epochs = 30
    config.archs.meta_batch_size = 2

    config.data.name = "mnist5k"
    config.data.batch_size = 64

    config.optim.lr = 1e-3
    config.optim.warmup_steps = 20

    config.eval.every = 750
    config.eval.num_heldout = 4
    config.eval.larger = ml_collections.ConfigDict(dict(num_cells=6, width=32))
    config.eval.batch_size = 200

    config.checkpoint.every = 750
    return config
