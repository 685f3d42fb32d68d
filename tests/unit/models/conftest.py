"""Fixtures of the model tests: tiny run configs and a world of one to build them in."""
from __future__ import annotations

import pytest

from elas_megatron.config.schema import Config, ModelConfig, ParallelConfig, TrainConfig

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48, rank=8)
VOCAB = 64
SEQ = 8


def tiny_config(variant: str = "elas", *, recompute: str = "none", seed: int = 1234, **model) -> Config:
    return Config(model=ModelConfig(variant=variant, **{**TINY, **model}),
                  parallel=ParallelConfig(recompute=recompute),
                  train=TrainConfig(seq_len=SEQ, seed=seed, device="cpu"))


@pytest.fixture
def world(megatron_world):
    """A world of one (TP=PP=1) for the duration of the test."""
    return megatron_world()
