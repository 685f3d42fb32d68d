"""SIGTERM during start-up (the dataset index build, the checkpoint load of --resume): ``elas-train`` stops with one
line and exit code 143 (128 + SIGTERM), never a traceback, and leaves no half-written file: the index files the
interrupted build wrote are removed, the checkpoint directory and metrics.jsonl are as before. The stall comes from
``faults.slow_startup`` (via ``fault_train.py``); the test signals once the stall has begun on every rank."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from faults import SLOW_START_ENV
from reliability_runs import FAULT_TRAIN, REPO, launch, launch_command
from subprocs import kill_group

SIGTERM_EXIT = 128 + signal.SIGTERM
STALL_BOUND_S = 1200


def _terminate_during(tmp_path: Path, phase: str, *overrides: str, nproc: int = 1, resume: bool = False):
    """Start elas-train stalled in ``phase``; SIGTERM it (torchrun forwards it to the ranks) once every rank
    stalls; returns (exit code, stderr)."""
    marker = tmp_path / f"stalled-{phase}"
    cmd = launch_command(tmp_path / "run", *overrides, nproc=nproc, script=FAULT_TRAIN, resume=resume)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get(
        "PYTHONPATH")])), **{SLOW_START_ENV: f"{phase}:{marker}"})
    err_path = tmp_path / f"{phase}.err"
    with open(tmp_path / f"{phase}.out", "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            # bounds a broken start-up only: beside two CPU hogs a correct one took up to 462 s to reach the stall
            deadline = time.monotonic() + STALL_BOUND_S
            while not all(Path(f"{marker}.{r}").exists() for r in range(nproc)):
                assert proc.poll() is None, f"exited with {proc.returncode} before the stall: {err_path.read_text()}"
                assert time.monotonic() < deadline, \
                    f"no stall in {phase} after {STALL_BOUND_S} s: {err_path.read_text()}"
                time.sleep(0.1)
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=300)
        finally:
            kill_group(proc)
            proc.wait()
    return proc.returncode, err_path.read_text()


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("elas-train:")]


def test_sigterm_during_the_dataset_index_build(tmp_path):
    code, err = _terminate_during(tmp_path, "datasets", "train.steps=3")
    assert code == SIGTERM_EXIT and "Traceback" not in err, err[-3000:]
    assert _lines(err) == ["elas-train: stopped by SIGTERM during start-up (building the datasets); nothing was "
                           "written that a rerun would not redo: rerun the same command (with --resume) to continue"]
    cache = tmp_path / "data_cache"
    assert sorted(p.name for p in cache.iterdir()) == [".build.lock"]  # the build's index files were removed
    run = tmp_path / "run"
    assert (run / "config.yaml").read_text().startswith("model:")  # whole, written before the datasets
    assert not list(run.rglob("*.tmp")) and not (run / "metrics.jsonl").exists()


def test_sigterm_during_the_checkpoint_load_of_a_resume(tmp_path):
    first = launch(tmp_path / "run", "train.steps=3", nproc=1, timeout_s=600)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints"
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    code, err = _terminate_during(tmp_path, "checkpoint_load", "train.steps=6", resume=True)
    assert code == SIGTERM_EXIT and "Traceback" not in err, err[-3000:]
    assert _lines(err) == ["elas-train: stopped by SIGTERM during start-up (loading the checkpoint); nothing was "
                           "written that a rerun would not redo: rerun the same command (with --resume) to continue"]
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    for line in metrics.splitlines():
        json.loads(line)


@pytest.mark.distributed
def test_sigterm_to_torchrun_during_the_checkpoint_load_stops_every_rank(tmp_path):
    first = launch(tmp_path / "run", "train.steps=3", nproc=2, timeout_s=600)
    assert first.returncode == 0, first.stderr[-3000:]
    code, err = _terminate_during(tmp_path, "checkpoint_load", "train.steps=6", nproc=2, resume=True)
    assert code != 0  # torchrun's agent reports the signal itself (its own SignalException traceback)
    lines = _lines(err)
    assert len(lines) == 2 and len(set(lines)) == 1, err[-3000:]
    assert "stopped by SIGTERM during start-up (loading the checkpoint)" in lines[0]
    assert "elas_megatron/" not in err, err[-3000:]  # no traceback of the ranks' code
