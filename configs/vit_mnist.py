"""The default main job: LoGAH-Tiny meta-trained on small ViTs for MNIST-5k, on a CPU.

    python train.py --config configs/vit_mnist.py --workdir /tmp/w

Hardware: 2 CPU cores suffice (a laptop or CI runner). Time: under 2 minutes
(1 min 39 s measured on 2 Intel Xeon cores from a cold compilation cache, 21 s of it
compiling: one bucketed training program serves every ViT of these ranges,
plus the held-out and larger ViTs' evaluation programs). Every step draws two
fresh ViTs from the 15 training ViTs of these ranges (`archs.stream`; two more
are held out). Measured: the task loss of the predicted ViTs falls from ~2.4 to
0.97 over the 800 steps; the held-out ViTs reach 0.65 and 0.65 accuracy with
predicted parameters and no training (0.59 and 0.57 with positional embeddings at
std 0.02, `ghn.position_scale="init"`); the larger ViT
(4 blocks, width 96: past every training width, so it reads decoder columns
that never trained) stays at chance, 0.10. RESULTS.md ("Default job") has the
pool and decoder variants. The shipped `vit-mnist` GHN comes from a longer
run (`python -m ghn list` has the command).
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
    # A fresh draw every step from all ViTs of these ranges but the held-out ones: more
    # architectures generalize better in the same steps (RESULTS.md, "Default job").
    config.archs.stream = True
    config.archs.pool_size = 4
    config.archs.meta_batch_size = 2
    # One bucket: one training program for every ViT (each more would cost ~20 s of
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
