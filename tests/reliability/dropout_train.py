"""``elas-train`` with hidden and attention dropout on, so that every training step draws random numbers.

The config has no dropout key (LLaMA-style pretraining uses none), so the RNG-resume tests switch it on here, in
megatron's ``TransformerConfig``: :func:`enable_dropout` for in-process trainers, or run this file with elas-train's
arguments (``reliability_runs.launch(..., script=DROPOUT_TRAIN)``, also under torchrun, with faults as
``fault_train.py``). Run as a script it also re-seeds torch's CPU generator per rank once the model is built
(:class:`SeedPerRank`), so that the ranks draw different dropout masks and a rank resumed with another rank's RNG
states would be caught.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from elas_megatron.training.callbacks import Callback  # noqa: E402

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


class SeedPerRank(Callback):
    """Once the model is built (the weights are the same on every rank), seed torch's generator with
    ``train.seed + 1 + global rank``; a resume then restores the checkpoint's per-rank states over it."""

    def on_model_built(self, trainer) -> None:
        import torch

        torch.manual_seed(trainer.cfg.train.seed + 1 + trainer.info.global_rank)


if __name__ == "__main__":  # dist_checkpointing may spawn processes: keep the guard
    enable_dropout()
    from fault_train import main

    sys.exit(main(callbacks=[SeedPerRank()]))
