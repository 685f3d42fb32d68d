"""Fixtures of the layer tests: tiny configs built through the real schema -> TransformerConfig path."""
from __future__ import annotations

import pytest

from elas_megatron.config.schema import Config, ModelConfig, ParallelConfig, TrainConfig


def tiny_config(variant: str = "elas", *, tp: int = 1, sequence_parallel: bool = False, **model) -> Config:
    shape = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48, rank=8)
    shape.update(model)
    return Config(model=ModelConfig(variant=variant, **shape),
                  parallel=ParallelConfig(tp=tp, sequence_parallel=sequence_parallel),
                  train=TrainConfig(seq_len=8, device="cpu"))


@pytest.fixture
def tconfig(megatron_world):
    """``make(variant="elas", **model_overrides) -> TransformerConfig`` in a world of one."""
    from elas_megatron.models.gpt import transformer_config

    megatron_world()

    def make(variant: str = "elas", **model):
        return transformer_config(tiny_config(variant, **model))

    return make
