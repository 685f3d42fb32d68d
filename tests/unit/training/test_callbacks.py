"""Trainer hooks: which callback methods are called, in which order, with which step numbers and metrics."""
from __future__ import annotations

import pytest

import tiny_trainer

from elas_megatron.training.callbacks import Callback
from elas_megatron.training.metrics import read_metrics

SMALL = tiny_trainer.SMALL + ["log.every=2"]


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_model_built(self, trainer):
        self.calls.append(("model_built", trainer.step, hasattr(trainer, "guard")))

    def on_resume(self, trainer, path):
        self.calls.append(("resume", trainer.step, path.name))

    def on_step_begin(self, trainer, step):
        self.calls.append(("step_begin", step))

    def on_before_optimizer_step(self, trainer):
        self.calls.append(("before_optimizer",))

    def on_after_optimizer_step(self, trainer):
        self.calls.append(("after_optimizer",))

    def on_step_end(self, trainer, step, metrics):
        self.calls.append(("step_end", step, trainer.step))
        metrics["extra"]["probe"] = step  # runs before the metrics log: added keys are written

    def on_evaluate(self, trainer, step, val_loss):
        self.calls.append(("evaluate", step))

    def on_checkpoint_phase(self, phase, step):
        self.calls.append(("checkpoint", phase, step))

    def on_save_end(self, trainer, path):
        self.calls.append(("save_end", path.name))


@pytest.fixture
def build(tmp_path):
    from elas_megatron.config.loader import load_config
    from elas_megatron.parallel.setup import destroy_parallel
    from elas_megatron.training.trainer import Trainer

    def make(*overrides, callbacks=(), resume=False):
        cfg = load_config(None, SMALL + [f"train.run_dir={tmp_path / 'run'}", *overrides], world_size=1)
        return Trainer(cfg, resume=resume, datasets=(tiny_trainer.tokens(), tiny_trainer.tokens()), callbacks=callbacks)

    yield make
    destroy_parallel()


def test_hooks_are_called_in_loop_order(build):
    rec = Recorder()
    trainer = build(callbacks=[rec])
    assert rec.calls == [("model_built", 0, False)]  # before the numerical guard exists
    trainer.train()
    step = [("step_begin", 1), ("before_optimizer",), ("after_optimizer",), ("step_end", 1, 1)]
    save = [("checkpoint", "begin", 2), ("checkpoint", "written", 2), ("checkpoint", "published", 2),
            ("save_end", "step_00000002")]
    assert rec.calls[1:5] == step
    assert rec.calls[5:9] == [("step_begin", 2), ("before_optimizer",), ("after_optimizer",), ("step_end", 2, 2)]
    assert rec.calls[9:14] == [("evaluate", 2), *save]
    final = [c for c in rec.calls[14:] if c[0] not in ("before_optimizer", "after_optimizer")]
    assert final == [("step_begin", 3), ("step_end", 3, 3), ("step_begin", 4), ("step_end", 4, 4), ("evaluate", 4),
                     ("checkpoint", "begin", 4), ("checkpoint", "written", 4), ("checkpoint", "published", 4),
                     ("save_end", "step_00000004")]
    records = read_metrics(trainer.run_dir / "metrics.jsonl")
    assert [(r["step"], r.get("probe")) for r in records if "loss" in r] == [(2, 2), (4, 4)]  # log.every=2
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]


def test_resume_is_announced_after_the_state_is_loaded(build):
    trainer = build("train.steps=2")
    trainer.train()
    rec = Recorder()
    build("train.steps=4", callbacks=[rec], resume=True)
    assert rec.calls == [("model_built", 0, False), ("resume", 2, "step_00000002")]


def test_a_skipped_step_has_no_optimizer_hooks(build):
    import torch

    class Poison(Callback):
        def on_model_built(self, trainer):
            param = next(trainer._unwrapped()[0].parameters())
            param.register_hook(lambda g: g * float("nan") if trainer.step + 1 == 2 else g)

    rec = Recorder()
    trainer = build("train.max_skipped_steps=1", callbacks=[Poison(), rec])
    for _ in range(2):
        trainer.train_step()
    names = [c[0] for c in rec.calls[1:]]
    assert names == ["step_begin", "before_optimizer", "after_optimizer", "step_end", "step_begin", "step_end"]
    assert trainer.guard.skipped_steps == 1 and torch.isfinite(next(trainer.model[0].parameters())).all()
