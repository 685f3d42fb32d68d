"""Fixtures of the reliability tests: in-process trainers on a tiny random-token dataset (one process, gloo)."""
from __future__ import annotations

import pytest
from faults import FaultInjector
from reliability_runs import RandomTokens

SEQ_LEN, VOCAB = 16, 128
SMALL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.ffn_hidden_size=64", "model.rank=8",
         f"model.vocab_size={VOCAB}", f"train.seq_len={SEQ_LEN}", "train.global_batch=4", "train.micro_batch=2",
         "train.steps=8", "train.eval_iters=1", "optim.lr=1e-2", "optim.warmup_steps=1", "checkpoint.save_final=false",
         "checkpoint.keep_last=0", "log.level=warning"]


@pytest.fixture
def make_trainer(tmp_path):
    """``make_trainer(*overrides, faults=None, resume=False) -> Trainer`` in a world of one; torn down after."""
    from elas_megatron.config.loader import load_config
    from elas_megatron.parallel.setup import destroy_parallel
    from elas_megatron.training.trainer import Trainer

    def make(*overrides: str, faults: str | None = None, resume: bool = False):
        callbacks = [FaultInjector.parse(faults)] if faults else []
        cfg = load_config(None, SMALL + [f"train.run_dir={tmp_path / 'run'}", *overrides], world_size=1)
        ds = RandomTokens(4096, SEQ_LEN, VOCAB)
        return Trainer(cfg, resume=resume, datasets=(ds, ds), callbacks=callbacks)

    yield make
    destroy_parallel()
