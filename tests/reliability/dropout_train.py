"""``elas-train`` with hidden and attention dropout on, so that every training step draws random numbers.

The config has no dropout key (LLaMA-style pretraining uses none), so the RNG-resume tests switch it on here, in
megatron's ``TransformerConfig``: :func:`enable_dropout` for in-process trainers, or run this file with elas-train's
arguments (``reliability_runs.launch(..., script=DROPOUT_TRAIN)``, also under torchrun). Run as a script it also
re-seeds torch's CPU generator per rank once the model is built, so that the ranks draw different dropout masks
and a rank resumed with another rank's RNG states would be caught.
"""
from __future__ import annotations

import sys

DROPOUT = 0.1


def enable_dropout(monkeypatch=None) -> None:
    """Make ``elas_megatron.models.gpt.transformer_config`` set ``hidden_dropout = attention_dropout = DROPOUT``
    (through pytest's ``monkeypatch`` when given, so that it is undone after the test)."""
    from elas_megatron.models import gpt

    original = gpt.transformer_config

    def with_dropout(cfg):
        config = original(cfg)
        config.hidden_dropout = config.attention_dropout = DROPOUT
        return config

    if monkeypatch is not None:
        monkeypatch.setattr(gpt, "transformer_config", with_dropout)
    else:
        gpt.transformer_config = with_dropout


def seed_per_rank() -> None:
    """After ``Trainer._build_model`` (the weights stay the same on every rank), seed torch's generator with
    ``train.seed + 1 + global rank``; a resume then restores the checkpoint's per-rank states over it."""
    import torch

    from elas_megatron.training.trainer import Trainer

    build = Trainer._build_model

    def build_then_seed(self):
        chunks = build(self)
        torch.manual_seed(self.cfg.train.seed + 1 + self.info.global_rank)
        return chunks

    Trainer._build_model = build_then_seed


if __name__ == "__main__":  # dist_checkpointing may spawn processes: keep the guard
    enable_dropout()
    seed_per_rank()
    from elas_megatron.cli.train import main

    sys.exit(main())
