"""Paper scale: LoGAH meta-trained on GPTs-1K for WikiText-103 (LoGAH, arXiv 2405.16287, Sec. 4).

    python train.py --config configs/gpt2_wikitext103.py --workdir $WORKDIR \\
        --config.data.data_dir=/path/to/datasets --config.data.tokenizer_dir=/path/to/gpt2

Needs WikiText-103 raw (wikitext-103-raw/wiki.{train,valid}.raw) under
data.data_dir or $GHN_DATA_DIR, and GPT-2's BPE files (vocab.json, merges.txt)
in data.tokenizer_dir; the ids are cached in data.cache_dir after the first,
slow (pure-Python) encoding. Hardware: 8 x 80 GB GPUs (one host) or a TPU
v4-32/v5p-32 slice: each step runs 8 GPT-2s of up to 9 layers, width 256 and a
50,257-token vocabulary on 16 x 1024 tokens. Time: an estimate, not a
measurement: ~2 days for 100k steps on 8 H100s. Programs (bucketed path, the
default): gpts-1k's ranges hold 168 distinct GPT-2s (the pool of 1,000 repeats
them); they fall into 6 shape buckets cut along the width (padded cost 1.1x
the real, `ghn.zoo.bucketed.cost`; 1.6x with one bucket), so 6 training
programs, plus one evaluation program per bucket the held-out GPTs fall in
and one for the larger GPT. A bucket program compiled in ~21 s on one H200
for small ViT buckets (BENCHMARKS.md; the blocks are scanned, so the compile
barely grows with depth): expect a few minutes for all of them, where one
program per architecture would take ~1 hour over the 168; nothing on a rerun
with the compilation cache. Expect held-out
GPTs' predicted parameters to reach a validation perplexity far below a
random init's (~50k), and to fine-tune faster (eval.py).

Approximations of the paper's recipe: AdamW lr 3e-4, weight decay 1e-2,
predicted-parameter decay 3e-5, clip 5, meta-batch 8, cosine schedule, bf16
target forwards; `ghn` is LoGAH-Tiny with K = 50304 (GPT-2's vocabulary).
"""

import ml_collections

from ghn.hypernet import GHNConfig
from ghn.train import base_config

SEQ_LEN = 1024


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.num_steps = 100_000
    config.log_every = 100
    # Positional embeddings at GPT-2's init std 0.02, as in gpt2_text.py (measured there).
    config.ghn = ml_collections.ConfigDict(GHNConfig.named("tiny", position_scale="init").to_dict())

    config.archs.sampler = "gpts-1k"
    config.archs.ranges = ml_collections.ConfigDict(dict(vocab_size=50257, context_length=SEQ_LEN))
    config.archs.pool_size = 1000
    config.archs.meta_batch_size = 8

    config.data.name = "wikitext103"
    config.data.tokenizer = "gpt2"
    config.data.seq_len = SEQ_LEN
    config.data.batch_size = 16

    config.optim.lr = 3e-4
    config.optim.warmup_steps = 2000
    config.bf16 = True
    config.ema_decay = 0.999

    config.eval.every = 5000
    config.eval.num_heldout = 10
    # GPT-2 small's depth and width: beyond every GPTs-1K architecture (depth <= 9, width <= 256).
    config.eval.larger = ml_collections.ConfigDict(dict(depth=12, width=384))
    config.eval.batch_size = 16
    config.eval.max_batches = 50

    config.checkpoint.every = 1000
    config.checkpoint.max_to_keep = 3
    return config
