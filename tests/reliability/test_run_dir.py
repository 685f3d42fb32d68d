"""The run directory: one job at a time (an flock on RUN_DIR/.lock held by rank 0), bad paths refused in one line at
start-up, and metrics.jsonl that reads right after a kill -9 before the first checkpoint."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from reliability_runs import REPO, launch, step_losses

from elas_megatron.config.loader import load_config
from elas_megatron.config.schema import ConfigError
from elas_megatron.training import run_dir as run_dir_module
from elas_megatron.training.run_dir import RunDirError, RunDirLock


@pytest.mark.distributed
def test_a_second_job_on_the_run_dir_stops_at_start_up_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    lock = RunDirLock.acquire(run)  # the first job
    try:
        second = launch(run, "train.steps=2", nproc=2, timeout_s=600)
    finally:
        lock.release()
    assert second.returncode != 0
    lines = [line for line in second.stderr.splitlines() if line.startswith("elas-train: error:")]
    assert len(lines) == 2, second.stderr[-3000:]  # both ranks stop, with the same line
    # (torchrun's agent prints its own ChildFailedError traceback; no frame of the ranks' code is shown)
    assert len(set(lines)) == 1 and "elas_megatron/" not in second.stderr, second.stderr[-3000:]
    assert (f"train.run_dir={run} is in use by another job (process {os.getpid()}@{socket.gethostname()} holds "
            f"{run / '.lock'}); use another train.run_dir, or wait until that job ends") in lines[0]
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing else was written


def test_the_lock_of_a_killed_job_is_free(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from elas_megatron.training.run_dir import "
                               f"RunDirLock; RunDirLock.acquire({str(run)!r}); print('locked', flush=True); "
                               "time.sleep(600)"], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"process {holder.pid}@"):
            RunDirLock.acquire(run)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunDirLock.acquire(run)  # the stale lock file is there, the lock is not
    assert (run / ".lock").read_text() == f"{os.getpid()}@{socket.gethostname()}\n"
    lock.release()


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    run = tmp_path / "run"
    lock = RunDirLock.acquire(run)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a helper process (e.g. a checkpoint writer) that outlives the job
        os.close(write)
        os.read(read, 1)
        os._exit(0)
    try:
        lock.release()
        RunDirLock.acquire(run).release()  # free although the child still runs
    finally:
        os.close(write)
        os.waitpid(pid, 0)


@pytest.mark.parametrize("override", ["train.run_dir=", 'train.run_dir=""', "train.run_dir='  '"])
def test_an_empty_run_dir_is_refused(override):
    with pytest.raises(ConfigError, match=r"train.run_dir='\s*' is invalid: expected a directory path \(an empty one "
                                          r"would write checkpoints and metrics into the current directory\)"):
        load_config(None, [override], world_size=1)


def test_a_run_dir_under_a_file_is_one_line_naming_it(tmp_path, capsys):
    from elas_megatron.cli.train import main
    from reliability_runs import DATA, TINY

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main([str(REPO / "configs/demo.yaml"), *TINY, *DATA, f"train.run_dir={blocker / 'run'}",
                 f"data.cache_dir={tmp_path / 'cache'}", "train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("elas-train")] == [f"elas-train: error: cannot use train.run_dir={blocker / 'run'}: NotADirectoryError: [Errno 20] "
                   f"Not a directory: '{blocker / 'run'}'; choose a writable directory (not under a file)"]


def test_a_read_only_run_dir_is_one_line_naming_it(tmp_path, monkeypatch, make_trainer):
    run = tmp_path / "ro"
    run.mkdir()
    if os.geteuid() == 0:  # root writes into a read-only directory: fail the lock file as a read-only one would
        real_open = os.open

        def read_only_open(path, flags, *args):
            if str(path).startswith(str(run)) and flags & os.O_CREAT:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *args)

        monkeypatch.setattr(run_dir_module.os, "open", read_only_open)
    else:
        run.chmod(0o555)
    with pytest.raises(RunDirError) as info:
        make_trainer(f"train.run_dir={run}")
    assert str(info.value) == (f"cannot use train.run_dir={run}: PermissionError: [Errno 13] Permission denied: "
                               f"'{run / '.lock'}'; choose a writable directory (not under a file)")


def test_kill_before_the_first_checkpoint_then_resume_logs_each_step_once(tmp_path):
    run = tmp_path / "run"
    args = ("train.steps=5", "checkpoint.save_final=false")
    killed = launch(run, *args, nproc=1, faults="kill@4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run / "checkpoints" / "latest").exists()
    resumed = launch(run, *args, nproc=1, resume=True)  # no checkpoint: starts over from step 0
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    raw = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in raw if "loss" in r] == [1, 2, 3, 1, 2, 3, 4, 5]  # the file keeps both attempts
    assert [r for r in raw if r.get("event")] == [{"event": "resume", "step": 0, "checkpoint": None}] * 2
    assert sorted(step_losses(run / "metrics.jsonl")) == [1, 2, 3, 4, 5]  # read: each step once


def test_trainers_of_one_program_share_the_lock_until_the_last_is_gone(tmp_path, make_trainer):
    import gc

    def other_job_can_lock() -> bool:
        probe = subprocess.run([sys.executable, "-c", "from elas_megatron.training.run_dir import RunDirLock; "
                                f"RunDirLock.acquire({str(tmp_path / 'run')!r})"], cwd=REPO, capture_output=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
        return probe.returncode == 0

    first = make_trainer()
    second = make_trainer()  # same run_dir, same process: one job
    del first
    gc.collect()
    assert not other_job_can_lock()
    del second
    gc.collect()
    assert other_job_can_lock()
