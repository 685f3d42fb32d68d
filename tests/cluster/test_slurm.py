"""launch/submit.sh and launch/slurm.sbatch through a real SLURM scheduler: two nodes on one machine, gloo on CPU.

Every job trains the same tiny config (one torchrun per node, c10d rendezvous across the two nodes, data parallel)
and must end with the per-step losses of one single-process run of that config, computed once:

* the time limit: ``--signal=B:USR1@85`` and a time limit shortened to 2 minutes once the job trains warn the
  batch script, the workers save, the script requeues the job, which restarts (``SLURM_RESTART_COUNT`` 1) and
  resumes; then ``scontrol requeue`` (SLURM's SIGTERM to every process; srun turns its own into SIGKILL for the
  workers, so they may or may not finish a stop checkpoint first) and ``scancel --signal=TERM --batch`` (the batch
  shell only: the script sends the workers SIGUSR1) each stop the job, which is requeued and resumes from its
  latest checkpoint; the appended output file holds every attempt;
* ``submit.sh --chain=2`` (a shorter run of the same model): a rank of the first link is SIGKILLed on node n2
  during a checkpoint save, ``--kill-on-bad-exit`` fails that link, and the second link
  (``--dependency=afterany``) resumes from the last complete checkpoint.

SLURM holds a requeued job until its old credentials expire (two minutes by default; 6 s in this cluster).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import subprocs
from slurm_cluster import MARKER_ENV, SlurmCluster

from elas_megatron.training.metrics import read_metrics

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[2]
STEPS = 300  # >= 45 s of training on 2 quiet cores after the time-limit update: the warning comes within 30 s
CHAIN_STEPS = 40  # the chain test kills a rank at step 15 or later and needs no pacing: a short run
BASE = ["configs/demo.yaml", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.ffn_hidden_size=64", "model.rank=8", "model.dense_warmup_steps=1", "train.seq_len=16",
        "train.global_batch=4", "train.micro_batch=2", "train.eval_iters=1", "optim.warmup_steps=1", "log.every=1",
        "checkpoint.every=2", "checkpoint.keep_last=2"]
CONFIG = [*BASE, f"train.steps={STEPS}"]
CHAIN_CONFIG = [*BASE, f"train.steps={CHAIN_STEPS}"]
# checkpoint.every=2 also paces the jobs (0.15-0.4 s a step on 2 CPU cores, depending on their other load), so
# that the time-limit warning, due within 30 s, finds them training; the one-process reference saves nothing
JOB_TIMEOUT_S = 300  # any one wait for a job (a chain link at 0.4 s a step on busy cores: ~140 s)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def one_process_losses(run_dir: Path, config: list[str]) -> dict[int, float]:
    """The per-step losses of ``config`` in one process, without SLURM."""
    out = subprocs.run([sys.executable, "-m", "elas_megatron.cli.train", *config, f"train.run_dir={run_dir}",
                        "checkpoint.every=0", "checkpoint.save_final=false", "log.level=warning"],
                       cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=JOB_TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-3000:]
    return losses(run_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    result = one_process_losses(tmp_path_factory.mktemp("reference"), CONFIG)
    assert sorted(result) == list(range(1, STEPS + 1))
    return result


def submit(slurm: SlurmCluster, run_dir: Path, *sbatch_args: str, config: list[str] = CONFIG) -> list[int]:
    """``launch/submit.sh --nodes=2 --gpus-per-node=0 SBATCH_ARGS -- CONFIG``; the job ids it printed."""
    env = dict(slurm.env, OMP_NUM_THREADS="1", PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    # 300 s bounds a hang only: submit.sh's dry run is a python process, which can take minutes to start beside CPU hogs
    out = subprocs.run(["launch/submit.sh", "--nodes=2", "--gpus-per-node=0", f"--output={run_dir}/slurm-%j.out",
                        *sbatch_args, "--", *config, f"train.run_dir={run_dir}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "world 2 = dp 2" in out.stdout
    return [int(j) for j in re.findall(r"^Submitted batch job (\d+)", out.stdout, re.MULTILINE)]


def logged_steps(run_dir: Path) -> int:
    """Step records written so far by every attempt (resume events and evaluations not counted)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)


def wait_steps(slurm: SlurmCluster, job: int, run_dir: Path, count: int) -> None:
    """Until ``count`` step records exist in total, while the job runs."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while logged_steps(run_dir) < count:
        state = slurm.job(job).get("JobState")
        assert state in ("RUNNING", "PENDING", "CONFIGURING", "SIGNALING"), \
            f"job {job} is {state}: {output(run_dir, job)}"
        assert time.monotonic() < deadline, f"job {job}: {logged_steps(run_dir)} < {count} steps"
        time.sleep(0.2)


def wait_requeued(slurm: SlurmCluster, job: int, restarts: int, *fields: str) -> None:
    """Until the job is pending again after its ``restarts``-th requeue; then update ``fields`` (e.g.
    ``TimeLimit=10``)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        info = slurm.job(job)
        if info.get("JobState") == "PENDING" and info.get("Restarts") == str(restarts):
            break
        assert info.get("JobState") in ("RUNNING", "SIGNALING", "COMPLETING", "REQUEUED", "PENDING"), \
            f"job {job}: {info}\n{output(slurm_run_dir(info), job)}"
        assert time.monotonic() < deadline, f"job {job} not requeued: {info}"
        time.sleep(0.2)
    if fields:
        out = slurm.scontrol("update", f"JobId={job}", *fields)
        assert out.returncode == 0, out.stderr


def slurm_run_dir(info: dict[str, str]) -> Path:
    return Path(info.get("StdOut", "/nonexistent")).parent


def output(run_dir: Path, job: int) -> str:
    path = run_dir / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.exists() else "(no output file)"


def test_time_limit_then_preemptions_requeue_and_resume_exactly(slurm, reference, tmp_path):
    run_dir = tmp_path / "run"
    (job,) = submit(slurm, run_dir, "--time=3", "--signal=B:USR1@85")
    # The controller checks time limits every 30 s and sends the warning at the first check past
    # end - 85 s - 30 s: not before 65 s with --time=3, so not while the job starts (20-40 s on 2 busy cores).
    # Once it trains, a 2-minute limit makes the warning due: it comes with the next check, within 30 s (the
    # training lasts longer), and the limit itself a minute or more later.
    wait_steps(slurm, job, run_dir, 3)
    out = slurm.scontrol("update", f"JobId={job}", "TimeLimit=2")
    assert out.returncode == 0, out.stderr

    # 1: the time-limit warning (USR1 to the batch shell only) -> save, exit, the script requeues the job
    wait_requeued(slurm, job, 1, "TimeLimit=10")         # the next attempts must not meet the limit again
    text = output(run_dir, job)
    assert "SIGUSR1 received: forwarding SIGUSR1 to the workers" in text, text[-3000:]
    # rank 0 prints the line: "stopped by SIGUSR1 after step S", or "... SIGUSR1 on another rank ..." when its own
    # agent forwarded the signal after rank 1's did and the ranks agreed to stop before it arrived
    assert "stopped by SIGUSR1" in text and f"requeueing job {job}" in text
    stopped = logged_steps(run_dir)
    assert 0 < stopped < STEPS

    # 2: `scontrol requeue` while training: SLURM's SIGTERM to every process, srun's too, which SIGKILLs its tasks
    # ("forcing job termination"): a race with the workers' stop checkpoint; else the last periodic one is resumed
    wait_steps(slurm, job, run_dir, stopped + 5)
    assert slurm.scontrol("requeue", str(job)).returncode == 0
    wait_requeued(slurm, job, 2)
    stopped = logged_steps(run_dir)

    # 3: `scancel --signal=TERM --batch`: only the batch shell; it forwards the signal and requeues the job itself
    wait_steps(slurm, job, run_dir, stopped + 5)
    assert slurm.run(["scancel", "--signal=TERM", "--batch", str(job)]).returncode == 0
    wait_requeued(slurm, job, 3)

    info = slurm.wait_job(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), JOB_TIMEOUT_S)
    text = output(run_dir, job)
    assert info["JobState"] == "COMPLETED", text[-4000:]
    for restart in range(4):  # --open-mode=append: every attempt in one file
        assert f"slurm.sbatch: job {job} (restart {restart}) on 2 node(s) x 1 process(es)" in text
    assert text.count("stopped by SIG") >= 2               # the time limit; the batch-only TERM, sent on as USR1
    assert text.count(f"requeueing job {job}") == 2        # both by the script
    assert "srun: forcing job termination" in text and "not requeued here" in text  # scontrol requeue: SLURM's
    assert f"final step {STEPS}" in text
    result = losses(run_dir)
    assert sorted(result) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert result[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step


def test_chain_continues_after_a_rank_is_killed(slurm, tmp_path):
    run_dir = tmp_path / "run"
    first, second = submit(slurm, run_dir, "--chain=2", "--time=10", config=CHAIN_CONFIG)
    assert slurm.job(second)["Dependency"].startswith(f"afterany:{first}")
    reference = one_process_losses(tmp_path / "reference", CHAIN_CONFIG)  # while the first link starts
    assert sorted(reference) == list(range(1, CHAIN_STEPS + 1))
    wait_steps(slurm, first, run_dir, 15)                  # past a few checkpoints
    caught_a_save = kill_during_a_save(worker_pid(slurm, node="n2"))
    killed_at = time.monotonic()
    assert caught_a_save, "no checkpoint save of the rank on n2 was seen within 30 s (killed anyway)"
    info = slurm.wait_job(first, ("FAILED", "COMPLETED", "CANCELLED"), JOB_TIMEOUT_S)
    assert info["JobState"] == "FAILED", output(run_dir, first)[-3000:]
    # --kill-on-bad-exit ends the job once the dead rank's srun task (its torchrun agent) exits: ~1 s on a quiet
    # machine. A checkpoint writer left alive by the killed rank kept the job COMPLETING for 120 s
    # (utils/lifetime.py); the bound leaves room for busy cores and is far below both.
    elapsed = time.monotonic() - killed_at
    assert elapsed < 60, f"the job ended {elapsed:.0f} s after the kill:\n{output(run_dir, first)[-3000:]}"
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.startswith("step_") and int(latest[5:]) % 2 == 0

    info = slurm.wait_job(second, ("COMPLETED", "FAILED", "CANCELLED"), JOB_TIMEOUT_S)
    text = output(run_dir, second)
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert "(chain link 2/2)" in text and f"resumed from {run_dir / 'checkpoints' / latest}" in text
    result = losses(run_dir)
    assert sorted(result) == list(range(1, CHAIN_STEPS + 1))
    for step, loss in reference.items():
        assert result[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def worker_pid(slurm: SlurmCluster, node: str) -> int:
    """The training process of this cluster's job on ``node``: the child of its torchrun agent (not a process that
    the worker forked, which has the same command line and environment)."""
    marker = f"{MARKER_ENV}={slurm.root}".encode()
    for entry in Path("/proc").iterdir():
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
            parent = (Path("/proc") / str(parent_pid(int(entry.name))) / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if (marker in env and f"SLURMD_NODENAME={node}".encode() in env and b"LOCAL_RANK=0" in env
                and b"elas_megatron.cli.train" in cmdline
                and (b"torch.distributed.run" in parent or b"torchrun" in parent)):
            return int(entry.name)
    ps = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True, check=False).stdout
    raise AssertionError(f"no training process on {node}:\n{ps[-3000:]}")


def kill_during_a_save(pid: int, within_s: float = 30) -> bool:
    """SIGKILL ``pid`` while a checkpoint writer it forked has its file open (the worker then waits in megatron's
    ``JoinableQueue.join()``: the moment that left the writer blocked for ever, holding the job's output, until
    utils/lifetime.py), or at ``within_s`` whatever it is doing; whether a save was caught."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            writers = children.read_text().split()
        except OSError:
            break
        for writer in writers:
            try:
                if any(os.readlink(fd).endswith(".distcp") for fd in Path(f"/proc/{writer}/fd").iterdir()):
                    os.kill(pid, signal.SIGKILL)
                    return True
            except OSError:
                continue
    os.kill(pid, signal.SIGKILL)
    return False
