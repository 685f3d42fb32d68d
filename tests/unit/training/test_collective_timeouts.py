"""Collectives time out as the watchdog times the phase they run in: every process group of the process gets the
start-up timeout while the trainer starts, the I/O one in checkpoint saves and the collective one in steps
(read back from each group's gloo backend). Why it matters, with two ranks: tests/reliability/test_hangs.py."""
from __future__ import annotations

import torch
import torch.distributed as dist

import tiny_trainer

from elas_megatron.training.callbacks import Callback


def _group_timeouts() -> set[float]:
    """The timeouts, in seconds, of this process's process groups (the world and megatron-core's)."""
    groups = list(dist.distributed_c10d._world.pg_map)
    assert len(groups) > 3  # the world and megatron's groups
    return {g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups}


class TimeoutRecorder(Callback):
    def __init__(self):
        self.seen: dict[str, set[float]] = {}

    def on_model_built(self, trainer):
        self.seen["start-up"] = _group_timeouts()

    def on_step_begin(self, trainer, step):
        self.seen["step"] = _group_timeouts()

    def on_checkpoint_phase(self, phase, step):
        if phase == "begin":
            self.seen["save"] = _group_timeouts()


def test_every_process_group_follows_the_phase(tmp_path):
    from elas_megatron.config.loader import load_config
    from elas_megatron.parallel.setup import destroy_parallel
    from elas_megatron.training.trainer import Trainer

    overrides = [f"train.run_dir={tmp_path / 'run'}", "train.steps=2", "train.device=cpu",
                 "parallel.distributed_timeout_s=30", "parallel.io_timeout_s=90"]
    cfg = load_config(None, tiny_trainer.SMALL + overrides, world_size=1)
    recorder = TimeoutRecorder()
    try:
        trainer = Trainer(cfg, datasets=(tiny_trainer.tokens(), tiny_trainer.tokens()), callbacks=[recorder])
        dog = trainer.watchdog
        assert _group_timeouts() == {dog.collective_timeout("start-up")}  # until the first step
        trainer.train()
        assert _group_timeouts() == {dog.collective_timeout("collective")}  # after the last save
    finally:
        destroy_parallel()
    assert recorder.seen == {"start-up": {dog.collective_timeout("start-up")},
                             "step": {dog.collective_timeout("collective")},
                             "save": {dog.collective_timeout("io")}}
    assert dog.collective_timeout("collective") < dog.collective_timeout("io") == dog.collective_timeout("start-up")
