"""LoGAH-Tiny meta-trained on small randomly wired cell networks (cnns-1k) for MNIST-5k.

    python train.py --config configs/cnn_mnist.py --workdir /tmp/cnn_mnist

Hardware: 2 CPU cores suffice. Time: measured 7 minutes on 2 CPU cores
(DeepNets-1M-style cells have many small operations, so each of the 6
training and 3 evaluation networks takes longer to compile than a ViT).
Measured: the task loss falls from 2.90 (step 20) to 2.29 by step 300, i.e.
only to chance (ln 10 = 2.30); held-out networks' predicted parameters stay
at chance (accuracy 0.10). At this scale the GHN does not yet learn useful
cell-network parameters; this config exercises the CNN path (BatchNorm in
training mode, convolutions, concatenation) and is a starting point for
longer runs, not a demonstration.
"""

import ml_collections

from ghn.hypernet import GHNConfig
from ghn.train import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.num_steps = 300
    config.log_every = 20
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
        )
    )
    config.archs.pool_size = 6
    config.archs.meta_batch_size = 2

    config.data.name = "mnist5k"
    config.data.batch_size = 64

    config.optim.lr = 1e-3
    config.optim.warmup_steps = 20

    config.eval.every = 150
    config.eval.num_heldout = 2
    config.eval.larger = ml_collections.ConfigDict(dict(num_cells=6, width=32))
    config.eval.batch_size = 200

    config.checkpoint.every = 150
    return config
