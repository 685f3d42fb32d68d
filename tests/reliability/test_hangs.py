"""Collective hangs: with parallel.distributed_timeout_s, a rank that stops (here: sleeps) makes every rank exit
with a message naming it, during training (watchdog) and during distributed initialisation -- where gloo alone
says only "Timed out waiting 3000ms for recv operation" or lists store keys."""
from __future__ import annotations

import threading
import time

import pytest
from reliability_runs import TORCHRUN, launch, run

from elas_megatron.training.guards import EXIT_HANG, Progress, Watchdog, diagnose_hang


@pytest.mark.distributed
def test_a_stuck_rank_is_named_by_every_rank(tmp_path):
    start = time.monotonic()
    result = launch(tmp_path / "run", "train.steps=6", "checkpoint.save_final=false",
                    "parallel.distributed_timeout_s=8", faults="hang@3:rank=1", timeout_s=120)
    assert result.returncode != 0 and time.monotonic() - start < 90
    assert result.stderr.count(f"exitcode  : {EXIT_HANG}") == 2, result.stderr[-3000:]
    lines = {line.split(" on rank ")[1][:1]: line for line in result.stderr.splitlines()
             if line.startswith("elas-train: error: no progress for")}
    assert set(lines) == {"0", "1"}, result.stderr[-3000:]
    for line in lines.values():
        assert "parallel.distributed_timeout_s=8" in line
        assert "stuck rank(s) [1] -- rank 1: step 3 'step start'" in line and "not in a collective" in line
    assert "this rank: rank 0: step 3 'forward'" in lines["0"] and "waiting in torch.distributed" in lines["0"]


INIT_SCRIPT = """
import os, sys, time
from elas_megatron.config.schema import ParallelConfig
from elas_megatron.parallel.setup import initialize_parallel
if os.environ["RANK"] == "1":
    time.sleep(120)
try:
    initialize_parallel(ParallelConfig(distributed_timeout_s=3), seed=0, device="cpu")
except RuntimeError as exc:
    print(f"rank {os.environ['RANK']}: {exc}", file=sys.stderr, flush=True)
    sys.exit(3)
"""


@pytest.mark.distributed
def test_initialisation_timeout_names_the_rank_that_never_joined(tmp_path):
    script = tmp_path / "init.py"
    script.write_text(INIT_SCRIPT)
    cmd = TORCHRUN + ["--nproc-per-node", "2", str(script)]
    err = run(cmd, tmp_path / "init", timeout_s=90).stderr
    assert ("rank 0: distributed initialisation failed on global rank 0 of 2 after waiting up to "
            "parallel.distributed_timeout_s=3: rank(s) [1] never joined") in err, err[-3000:]


def test_watchdog_fires_on_no_progress_and_not_before():
    progress, fired = Progress(), []
    with Watchdog(progress, timeout_s=1.0, board=None, global_rank=0, on_hang=fired.append):
        for _ in range(6):  # progress every 0.3 s: never idle long enough
            time.sleep(0.3)
            progress.update(1, "forward")
        assert not fired
        progress.update(2, "checkpoint save", watched=False)  # unwatched phases may take long
        time.sleep(1.5)
        assert not fired
        progress.update(2, "forward")
        deadline = time.monotonic() + 5
        while not fired and time.monotonic() < deadline:
            time.sleep(0.1)
    assert fired and "no progress for 1 s (parallel.distributed_timeout_s=1) on rank 0" in fired[0]
    assert "rank 0: step 2 'forward'" in fired[0] and "test_watchdog_fires_on_no_progress" in fired[0]


def _report(step, phase, idle_s, in_collective, wall=100.0):
    return {"step": step, "phase": phase, "idle_s": idle_s, "wall": wall, "in_collective": in_collective,
            "where": "somewhere (x/y.py:1)"}


def test_diagnosis_rules():
    now = 101.0
    # the rank outside a collective is stuck, the waiting ones are not
    reports = {0: _report(3, "forward", 30, True), 1: _report(3, "step start", 31, False),
               2: _report(3, "forward", 30, True)}
    assert diagnose_hang(reports, 0, now, stale_s=10).startswith("stuck rank(s) [1] -- rank 1: step 3 'step start'")
    # a rank that never reported, or stopped reporting (dead, or its process frozen), comes first
    reports[2] = None
    reports[1] = _report(3, "forward", 5, False, wall=50.0)
    text = diagnose_hang(reports, 0, now, stale_s=10)
    assert text.startswith("stuck rank(s) [1, 2]") and "rank 2: no report at all" in text
    assert "(last report 51 s ago)" in text
    # everybody waits (mismatched collectives / an asynchronous backend): the longest idle
    reports = {0: _report(3, "forward", 30, True), 1: _report(2, "optimizer step", 40, True)}
    assert diagnose_hang(reports, 0, now, stale_s=10).startswith("stuck rank(s) [1]")


def test_watchdog_thread_is_gone_after_training():
    before = {t.name for t in threading.enumerate()}
    with Watchdog(Progress(), timeout_s=60, board=None, global_rank=0, on_hang=lambda message: None):
        assert "elas-watchdog" in {t.name for t in threading.enumerate()}
    assert {t.name for t in threading.enumerate()} == before
