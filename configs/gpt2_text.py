"""LoGAH-Tiny meta-trained on small GPT-2s (gpts-1k) over bytes of Python's help texts.

    python train.py --config configs/gpt2_text.py --workdir /tmp/gpt2_text

Hardware: 2 CPU cores suffice; any GPU is faster. Time: about 5 minutes on 2 CPU
cores, most of it compiling one program per architecture (6 training + 3
evaluation GPTs). The data (`pydoc_text`, ~465k characters) ships with Python,
so this runs offline. Expect the byte-level task loss to fall from ~5.5 toward
~3 (perplexity ~20) as the GHN learns to predict working language models.
"""

import ml_collections

from ghn.hypernet import GHNConfig
from ghn.train import base_config

SEQ_LEN = 64


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.num_steps = 300
    config.log_every = 20
    config.ghn = ml_collections.ConfigDict(GHNConfig.named("tiny", max_dim=1024).to_dict())

    config.archs.sampler = "gpts-1k"
    # gpts-1k shrunk for a CPU: 2-3 blocks, width 32-64, byte vocabulary.
    config.archs.ranges = ml_collections.ConfigDict(
        dict(vocab_size=256, context_length=SEQ_LEN, depth=(2, 3), width=(32, 64))
    )
    config.archs.pool_size = 6
    config.archs.meta_batch_size = 2

    config.data.name = "pydoc_text"
    config.data.tokenizer = "byte"
    config.data.seq_len = SEQ_LEN
    config.data.batch_size = 32

    config.optim.lr = 1e-3
    config.optim.warmup_steps = 20

    config.eval.every = 150
    config.eval.num_heldout = 2
    config.eval.larger = ml_collections.ConfigDict(dict(depth=4, width=96))
    config.eval.batch_size = 64
    config.eval.max_batches = 8

    config.checkpoint.every = 150
    return config
