"""Progress of long evaluations: log lines at every tenth when stderr is no terminal, nothing for a short one, a
tqdm bar on a terminal; ``elas-eval``'s loop and the trainer's evaluation both report it."""
from __future__ import annotations

import io
import logging

import torch

from elas_megatron.cli.eval import evaluate
from elas_megatron.utils import progress as progress_mod
from elas_megatron.utils.progress import ProgressMeter

LOGGER = "elas_megatron.utils.progress"


class FakeModel:
    def __call__(self, tokens, position_ids, attention_mask, labels):
        return torch.full(tokens.shape, 2.0)


class FakeBatches:
    def eval_iterator(self, n):
        for _ in range(n):
            yield {"tokens": torch.zeros(2, 4, dtype=torch.long), "position_ids": torch.arange(4).expand(2, 4),
                   "labels": torch.zeros(2, 4, dtype=torch.long), "loss_mask": torch.ones(2, 4)}


def test_a_long_eval_logs_a_line_per_tenth_and_its_total_time(caplog, monkeypatch):
    monkeypatch.setattr(progress_mod, "DELAY_S", 0.0)  # as if every batch took long
    caplog.set_level(logging.INFO, logger=LOGGER)
    loss, tokens = evaluate(FakeModel(), FakeBatches(), 50)
    assert (loss, tokens) == (2.0, 400)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 10, lines  # 5/50 .. 45/50, then the total
    assert lines[0].startswith("eval 5/50 batches (10%), elapsed 0:00:00, ETA 0:00:")
    assert lines[-2].startswith("eval 45/50 batches (90%)") and lines[-1].startswith("eval 50/50 batches, elapsed ")


def test_a_short_eval_prints_nothing(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    evaluate(FakeModel(), FakeBatches(), 50)  # well under DELAY_S
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_a_slow_tenth_still_logs_every_interval(caplog, monkeypatch):
    clock = iter(float(t) for t in range(0, 10_000, 30))  # 30 s per call of perf_counter
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger=LOGGER)
    meter = ProgressMeter(1000, "eval", bar=False, delay_s=10, interval_s=60)
    for _ in range(4):
        meter.update()
    assert [r.getMessage() for r in caplog.records] == ["eval 2/1000 batches (0%), elapsed 0:01:00, ETA 8:19:00",
                                                        "eval 4/1000 batches (0%), elapsed 0:02:00, ETA 8:18:00"]


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    meter = ProgressMeter(20, "eval", bar=True, delay_s=0)
    for _ in range(20):
        meter.update()
    meter.close()
    assert "eval:" in stream.getvalue() and "/20 [" in stream.getvalue()  # the bar, as elas-prep shows


def test_the_trainers_evaluation_reports_progress_on_the_logging_rank(tmp_path, caplog, monkeypatch):
    import tiny_trainer

    from elas_megatron.config.loader import load_config
    from elas_megatron.parallel.setup import destroy_parallel
    from elas_megatron.training.trainer import Trainer

    monkeypatch.setattr(progress_mod, "DELAY_S", 0.0)
    cfg = load_config(None, tiny_trainer.SMALL + [f"train.run_dir={tmp_path / 'run'}", "train.eval_iters=20"], world_size=1)
    try:
        trainer = Trainer(cfg, datasets=(tiny_trainer.tokens(), tiny_trainer.tokens()))
        caplog.set_level(logging.INFO, logger=LOGGER)
        trainer.evaluate()
    finally:
        destroy_parallel()
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert lines[0].startswith("eval 2/20 batches (10%)") and lines[-1].startswith("eval 20/20 batches, elapsed")
