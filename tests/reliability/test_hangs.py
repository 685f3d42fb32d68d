"""Collective hangs: with parallel.distributed_timeout_s, a rank that stops (here: sleeps) makes every rank exit
with a message naming it during training (watchdog), and with the start-up limit during distributed
initialisation -- where gloo alone says only "Timed out waiting 3000ms for recv operation" or lists store keys.
Checkpoint saves are timed with parallel.io_timeout_s, start-up with the longer of the two limits, also in a
single process. (The watchdog's own rules: tests/unit/training/test_watchdog.py.)"""
from __future__ import annotations

import pytest
from faults import SLOW_START_ENV
from reliability_runs import FAULT_TRAIN, TORCHRUN, launch, run

from elas_megatron.training.watchdog import EXIT_HANG


def _hang_lines_of_both_ranks(result) -> dict[str, str]:
    """Both ranks of a 2-rank job exited with the hang code; their watchdog lines by rank ("0", "1")."""
    assert result.stderr.count(f"exitcode  : {EXIT_HANG}") == 2, result.stderr[-3000:]
    lines = {line.split(" on rank ")[1][:1]: line for line in result.stderr.splitlines()
             if line.startswith("elas-train: error: no progress for")}
    assert set(lines) == {"0", "1"}, result.stderr[-3000:]
    return lines


@pytest.mark.distributed
def test_a_stuck_rank_is_named_by_every_rank(tmp_path):
    """Rank 1 starts 12 s behind rank 0 (it stalls after building the datasets; on busy cores ranks drift that far
    apart): start-up collectives wait for it past the 8-s collective limit, under the start-up limit (the I/O
    limit's default here). Then rank 1 hangs in step 3, and the collective limit ends the job again."""
    # no wall-clock bound: start-up beside busy cores takes minutes; the lines below prove who ended the run
    result = launch(tmp_path / "run", "train.steps=6", "checkpoint.save_final=false",
                    "parallel.distributed_timeout_s=8", faults="hang@3:rank=1", timeout_s=600,
                    env={SLOW_START_ENV: f"datasets:{tmp_path / 'late'}:12:rank=1"})
    assert result.returncode != 0
    assert (tmp_path / "late.1").exists() and not (tmp_path / "late.0").exists()
    lines = _hang_lines_of_both_ranks(result)
    for line in lines.values():
        assert "parallel.distributed_timeout_s=8" in line
        assert "stuck rank(s) [1] -- rank 1: step 3 'step start'" in line and "not in a collective" in line
    assert "this rank: rank 0: step 3 'forward'" in lines["0"] and "waiting in torch.distributed" in lines["0"]


INIT_SCRIPT = """
import os, sys, time
from elas_megatron.config.schema import ParallelConfig
from elas_megatron.parallel.setup import initialize_parallel
late_s, io_timeout_s = float(sys.argv[1]), int(sys.argv[2])
if os.environ["RANK"] == "1":
    time.sleep(late_s)
try:
    initialize_parallel(ParallelConfig(distributed_timeout_s=2, io_timeout_s=io_timeout_s), seed=0, device="cpu")
except RuntimeError as exc:
    print(f"rank {os.environ['RANK']}: {exc}", file=sys.stderr, flush=True)
    sys.exit(3)
print(f"rank {os.environ['RANK']}: initialised", flush=True)
"""


@pytest.mark.distributed
def test_initialisation_timeout_names_the_rank_that_never_joined(tmp_path):
    script = tmp_path / "init.py"
    script.write_text(INIT_SCRIPT)
    # rank 1 sleeps longer than any start-up of rank 0 on starved cores (torchrun ends it once rank 0 failed)
    cmd = TORCHRUN + ["--nproc-per-node", "2", str(script), "900", "3"]
    err = run(cmd, tmp_path / "init", timeout_s=600).stderr
    assert ("rank 0: distributed initialisation failed on global rank 0 of 2 after waiting up to "
            "parallel.io_timeout_s=3 (the start-up limit: the longer of the I/O and collective limits): "
            "rank(s) [1] never joined") in err, err[-3000:]


@pytest.mark.distributed
def test_a_rank_that_starts_late_is_waited_for_past_the_collective_timeout(tmp_path):
    """Initialisation is start-up: bounded by the longer of parallel.io_timeout_s and the collective timeout."""
    script = tmp_path / "init.py"
    script.write_text(INIT_SCRIPT)
    cmd = TORCHRUN + ["--nproc-per-node", "2", str(script), "6", "600"]  # 6 s late; collectives: 2 s
    result = run(cmd, tmp_path / "init", timeout_s=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0: initialised" in result.stdout and "rank 1: initialised" in result.stdout


@pytest.mark.distributed
def test_a_stall_in_a_checkpoint_save_on_one_rank_is_named(tmp_path):
    """Rank 1 stalls at the start of the save of step 4 (a dead file system); rank 0 waits for it in the save's
    first collective. Saves are timed with parallel.io_timeout_s (longer than the collectives' limit in real runs;
    here shorter, so that the watchdog, not gloo, ends the job). Start-up is timed with the longer limit, 120 s:
    beside two CPU hogs one rank started over 20 s after the other, and building the model took 6.5 s."""
    result = launch(tmp_path / "run", "train.steps=6", "checkpoint.every=4", "checkpoint.save_final=false",
                    "parallel.io_timeout_s=20", "parallel.distributed_timeout_s=120", faults="hang_in_save@4:rank=1",
                    timeout_s=600)
    assert result.returncode != 0  # ended by the watchdog at 20 s, not at the collectives' 120 s: the lines say so
    lines = _hang_lines_of_both_ranks(result)
    for line in lines.values():
        assert "(parallel.io_timeout_s=20)" in line
        assert "stuck rank(s) [1] -- rank 1: step 4 'checkpoint save'" in line and "not in a collective" in line
    assert "this rank: rank 0: step 4 'checkpoint save'" in lines["0"] and "waiting in torch.distributed" in lines["0"]
    assert not list((tmp_path / "run" / "checkpoints").glob("step_00000004"))  # nothing half-published


@pytest.mark.parametrize("stall", ["save", "startup"])
def test_the_watchdog_times_one_process_too(tmp_path, stall):
    """A single process (no torchrun store) that stalls in a checkpoint save, or in start-up (after the dataset
    index build), is ended by its own watchdog naming itself and the phase. A save is timed with
    parallel.io_timeout_s (8 s; start-up then gets the default 600-s collective limit); start-up with the longer of
    the two limits, both 15 s here (a tie names the I/O limit), which also times the start-up phases before the
    stall (about 1 s each beside two CPU hogs; one phase took 4x its usual time there)."""
    if stall == "save":
        limits, env, faults, key = ["parallel.io_timeout_s=8"], None, "hang_in_save@2", "parallel.io_timeout_s=8"
    else:
        limits = ["parallel.io_timeout_s=15", "parallel.distributed_timeout_s=15"]
        env, faults, key = {SLOW_START_ENV: f"datasets:{tmp_path / 'stalled'}"}, None, "parallel.io_timeout_s=15"
    result = launch(tmp_path / "run", "train.steps=3", "checkpoint.every=2", *limits, nproc=1, faults=faults,
                    env=env, script=FAULT_TRAIN, timeout_s=600)
    assert result.returncode == EXIT_HANG, result.stderr[-3000:]
    phase = "step 2 'checkpoint save'" if stall == "save" else "step 0 'start-up: building the datasets'"
    lines = [line for line in result.stderr.splitlines() if line.startswith("elas-train:")]
    assert len(lines) == 1 and lines[0].startswith("elas-train: error: no progress for"), result.stderr[-3000:]
    assert f"({key}) on rank 0: stuck rank(s) [0] -- rank 0: {phase}" in lines[0]
