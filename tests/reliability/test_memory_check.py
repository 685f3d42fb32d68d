"""A run that cannot fit is refused before anything is allocated, with the estimate and the memory available; runs
that fit start; ``train.check_memory=false`` overrides. On CPU the budget is the host's available RAM (or cgroup
limit) shared by this host's processes; on GPU the device's free memory (not exercised here)."""
from __future__ import annotations

import re

import pytest
from reliability_runs import launch

from elas_megatron.config.schema import ConfigError
from elas_megatron.training import memory


def test_the_demo_at_seq_len_100000_is_refused_in_one_line(tmp_path):
    result = launch(tmp_path / "run", "train.seq_len=100000", "train.device=cpu", nproc=1, timeout_s=600)
    lines = [line for line in result.stderr.splitlines() if line.startswith("elas-train:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    match = re.fullmatch(
        r"elas-train: error: this run needs an estimated ([\d.]+) GiB per process \(weights\+grads\+optimizer "
        r"[\d.]+ GiB, activations [\d.]+ GiB for train\.micro_batch=4 x train\.seq_len=100000, cpu fp32\) but "
        r"([\d.]+) GiB is available \(host RAM \(.*\)\); lower train\.micro_batch or train\.seq_len, set "
        r"parallel\.recompute=full, or set train\.check_memory=false to start anyway", lines[0])
    assert match and float(match[1]) > float(match[2]), lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_budget_decides_and_the_override_starts_anyway(make_trainer, monkeypatch):
    trainer = make_trainer()  # the tiny run fits the real budget
    assert trainer.step == 0
    monkeypatch.setattr(memory, "available_memory", lambda *a, **k: (1024, "a 1 KiB test budget"))
    with pytest.raises(ConfigError, match=r"GiB is available \(a 1 KiB test budget\); .* or set "
                                          r"train\.check_memory=false to start anyway$"):
        make_trainer()
    assert make_trainer("train.check_memory=false").step == 0


def test_host_memory_is_read_from_the_system():
    available, source = memory.host_memory_available()
    assert available > 0 and source
    shared, where = memory.available_memory("cpu", None, local_processes=4)
    assert shared <= available // 4 + 1 and "shared by 4 processes on this host" in where
