"""The default main job: LoGAH-Tiny meta-trained on small ViTs for MNIST-5k, on a CPU.

    python train.py --config configs/vit_mnist.py --workdir /tmp/w

Hardware: 2 CPU cores suffice (a laptop or CI runner). Time: 2-4 minutes
(3 min 21 s measured on 2 cores from a cold compilation cache; ~47 s of it
compiling: one bucketed training program for the 4 ViTs, plus the held-out
and larger ViTs' evaluation programs). Measured: the task loss of the
predicted ViTs falls from ~2.5 to 1.25 (training accuracy 0.10 -> 0.57) over
the 800 steps; held-out ViTs reach 0.24 and 0.09 accuracy with predicted
parameters and no training, the larger ViT 0.10 (an earlier build of the
same config, differing only in float32 round-off of the bucketed attention:
loss 1.37, held-out 0.43 and 0.07): four training architectures generalize
little and unstably. With attention nodes carrying their head geometry
(`ghn.attention_shapes`, the default since) and host-drawn GHN init: loss 1.31,
held-out 0.23 and 0.11, larger 0.10 (wall time not comparable: shared cores).
Broader 800-1400-step variants (the stream over the 17
ViTs of these ranges, or 26 with 1-3 blocks and width 16-64) fit less in
this budget and reach 0.20-0.27 on held-out ViTs (RESULTS.md, "Default job").
The shipped `vit-mnist` GHN is this config with 16 architectures and 4000
steps (`python -m ghn list` has the command): 0.57 on held-out ViTs.
"""

import ml_collections

from ghn.hypernet import GHNConfig
from ghn.train import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.num_steps = 800
    config.log_every = 50
    # LoGAH-Tiny (d=64, 3 layers, 8 heads, r=32); K=1024 covers every width below.
    config.ghn = ml_collections.ConfigDict(GHNConfig.named("tiny", max_dim=1024).to_dict())

    config.archs.sampler = "vits-1k"
    # vits-1k shrunk for 28x28x1 digits and a CPU: 2-3 blocks, width 32-64, 7x7 patches.
    config.archs.ranges = ml_collections.ConfigDict(
        dict(
            image_size=28,
            in_channels=1,
            num_classes=10,
            depth=(2, 3),
            width=(32, 64),
            width_multiple=16,
            min_head_dim=8,
            max_heads=4,
            patch_size=7,
        )
    )
    config.archs.pool_size = 4
    config.archs.meta_batch_size = 2
    # One bucket: one training program for the 4 ViTs (each more would cost ~20 s of
    # compiling on 2 cores and save little: 2-3 blocks, width 32-64 pad little).
    config.archs.buckets = 1

    config.data.name = "mnist5k"
    config.data.batch_size = 64

    config.optim.lr = 1e-3
    config.optim.warmup_steps = 20

    config.eval.every = 400
    config.eval.num_heldout = 2
    # Deeper and wider than every training ViT.
    config.eval.larger = ml_collections.ConfigDict(dict(depth=4, width=96, num_heads=4))
    config.eval.batch_size = 200

    config.checkpoint.every = 200
    return config
