"""metrics.jsonl under faults: a torn last line (kill, full disk) is skipped with a warning, a failed write warns once
and training goes on, and the next record after a torn line stays readable."""
from __future__ import annotations

import json
import logging

import pytest

import torch

from elas_megatron.training.metrics import MetricsLogger, read_metrics


def _logger(run_dir):
    return MetricsLogger(run_dir, enabled=True, flops_per_token=None, device=torch.device("cpu"), num_gpus=1)


def _step(log, step):
    log.log_step(step=step, loss=1.0 / step, lr=1e-3, grad_norm=0.5, tokens_per_step=8, step_time_s=0.1,
                 tokens=8 * step)



@pytest.fixture(autouse=True)
def _warnings_only(caplog):
    """caplog sees warnings only, whatever level an earlier test left the root logger at (the step lines are
    INFO)."""
    caplog.set_level(logging.WARNING)

def test_a_torn_last_line_is_ignored_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')
    with caplog.at_level(logging.WARNING, logger="elas_megatron.training.metrics"):
        assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    assert len(caplog.messages) == 1
    assert f"{path}: ignoring the last line, which is not a complete record" in caplog.messages[0]


def test_the_next_record_after_a_torn_line_starts_a_line_of_its_own(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"event": "resume", "step": 0, "checkpoint": None}) + "\n"
                    + json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')  # killed mid-write
    log = _logger(tmp_path)  # the resumed run
    log.log_resume(step=1, checkpoint="step_00000001")
    _step(log, 2)
    with caplog.at_level(logging.WARNING, logger="elas_megatron.training.metrics"):
        records = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 2.0), (2, 0.5)]
    assert ["line 3" in m for m in caplog.messages] == [True]


def test_a_failed_write_warns_once_and_training_goes_on(tmp_path, caplog):
    log = _logger(tmp_path)
    _step(log, 1)
    log.path.rename(tmp_path / "saved.jsonl")
    log.path.mkdir()  # every open of metrics.jsonl now fails with an OSError, as on a full disk
    with caplog.at_level(logging.WARNING, logger="elas_megatron.training.metrics"):
        for step in (2, 3, 4):
            _step(log, step)
        log.log_eval(step=4, val_loss=1.0)
        assert len(caplog.messages) == 1 and f"cannot write {log.path} (IsADirectoryError" in caplog.messages[0]
        assert "training continues" in caplog.messages[0]
        log.path.rmdir()
        (tmp_path / "saved.jsonl").rename(log.path)
        _step(log, 5)
    assert caplog.messages[1] == f"{log.path} is writable again; 4 record(s) were lost"
    assert [r["step"] for r in read_metrics(log.path)] == [1, 5]
