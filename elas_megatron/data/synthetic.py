"""A deterministic synthetic token dataset: no tokenizer, no files, identical in every process.

Used by the multi-process equivalence tests and the benchmarks, where real text would add I/O and tokenizer
set-up without changing what is measured.

Sample ``i`` is a sequence drawn from a fixed random bigram table (seeded by ``i``), so the model has something
to learn and the loss moves step to step, which makes a per-step comparison meaningful.
"""
from __future__ import annotations

import numpy as np


class SyntheticTokens:
    """``len(self)`` samples of ``seq_len`` tokens over ``vocab_size`` ids, in megatron GPTDataset's item format."""

    def __init__(self, *, num_samples: int, seq_len: int, vocab_size: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.seed = seed
        table_rng = np.random.default_rng(seed)
        # Each token has 4 likely successors: a learnable, low-entropy bigram language.
        self.successors = table_rng.integers(0, vocab_size, size=(vocab_size, 4))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, index))
        seq = np.empty(self.seq_len + 1, dtype=np.int64)
        seq[0] = rng.integers(self.vocab_size)
        choices = rng.integers(0, 4, size=self.seq_len)
        for t in range(self.seq_len):
            seq[t + 1] = self.successors[seq[t], choices[t]]
        return {"tokens": seq[:-1], "labels": seq[1:], "loss_mask": np.ones(self.seq_len, dtype=np.float32),
                "position_ids": np.arange(self.seq_len, dtype=np.int64)}
