"""The smallest trainer configuration the in-process training tests share: a 2-layer model on 16-token sequences of
random ids, small enough that a test trains a few steps in a second on one CPU core."""
from __future__ import annotations

from elas_megatron.data.synthetic import SyntheticTokens

SEQ_LEN, VOCAB = 16, 128
SMALL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.ffn_hidden_size=64", "model.rank=8",
         f"model.vocab_size={VOCAB}", f"train.seq_len={SEQ_LEN}", "train.global_batch=4", "train.micro_batch=2",
         "train.steps=4", "train.eval_iters=1", "train.eval_every=2", "optim.warmup_steps=1", "checkpoint.every=2",
         "checkpoint.keep_last=0", "log.level=warning"]


def tokens(num_samples: int = 4096) -> SyntheticTokens:
    """Random token ids in the shape SMALL trains on."""
    return SyntheticTokens(num_samples=num_samples, seq_len=SEQ_LEN, vocab_size=VOCAB)
