"""launch/torchrun.sh, launch/slurm.sbatch and launch/submit.sh run against stub torchrun / srun / scontrol.

The stubs record their arguments and environment in a log; the slurm tests also send the batch script the
time-limit signal and check that it reaches the "workers" and that the job requeues itself after they exit.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DEMO = "configs/demo.yaml"

STUB_TORCHRUN = """#!/usr/bin/env bash
echo "torchrun node=${SLURM_NODEID:-x} $*" >> "$STUB_LOG"
for v in OMP_NUM_THREADS CUDA_DEVICE_MAX_CONNECTIONS PET_SIGNALS_TO_HANDLE PET_SHUTDOWN_TIMEOUT NCCL_DEBUG; do
    echo "env node=${SLURM_NODEID:-x} $v=${!v:-}" >> "$STUB_LOG"
done
if [ -n "${STUB_WAIT_SIGNAL:-}" ]; then
    on_signal() { echo "torchrun node=${SLURM_NODEID:-x} got $1" >> "$STUB_LOG"; exit 0; }
    trap 'on_signal USR1' USR1
    trap 'on_signal TERM' TERM
    touch "$STUB_DIR/ready.${SLURM_NODEID:-x}"
    for _ in $(seq 600); do sleep 0.1; done
    exit 3
fi
"""
STUB_SRUN = """#!/usr/bin/env bash
# like srun: one task per node (SLURM_NODEID), signals forwarded to the tasks
nodes=1
while [[ $1 == -* ]]; do case $1 in --nodes=*) nodes=${1#*=} ;; esac; shift; done
echo "srun nodes=$nodes $*" >> "$STUB_LOG"
pids=()
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
forward() { echo "srun forwards $1" >> "$STUB_LOG"; kill -"$1" "${pids[@]}" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
rc=0
for p in "${pids[@]}"; do
    while :; do wait "$p" && r=0 || r=$?; kill -0 "$p" 2>/dev/null || break; done
    [ "$r" -le "$rc" ] || rc=$r
done
exit $rc
"""
STUB_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
    "show hostnames") printf 'gpu-a01\\ngpu-a02\\n' ;;
    "show node") echo "NodeName=$4 Arch=x86_64 CoresPerSocket=8 NodeAddr=10.0.0.${4: -1} NodeHostName=$4" ;;
    "show job") echo "JobId=$4 JobName=elas UserId=u(1) JobState=${STUB_JOB_STATE:-RUNNING} Reason=None" ;;
    requeue*) echo "scontrol requeue $2" >> "$STUB_LOG" ;;
esac
"""
STUB_SBATCH = """#!/usr/bin/env bash
echo "sbatch $*" >> "$STUB_LOG"
"""


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("torchrun", STUB_TORCHRUN), ("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL),
                       ("sbatch", STUB_SBATCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "stub.log"
    log.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMP_", "PET_", "NNODES", "NODE_RANK",
                                                                        "NPROC_PER_NODE", "RDZV_", "WORLD_SIZE"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHON=sys.executable, STUB_LOG=str(log), STUB_DIR=str(tmp_path))
    return env, log


def run(cmd: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, **kw)


def torchrun_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("torchrun ")]


def test_single_node_launch_prints_the_layout_and_runs_the_train_module(stubs):
    env, log = stubs
    out = run(["launch/torchrun.sh", "--nproc-per-node", "2", DEMO, "train.steps=5", "--resume"], env)
    assert out.returncode == 0, out.stderr
    assert "world 2 = dp 2 x tp 1 x pp 1" in out.stdout and "memory/GPU" in out.stdout
    (line,) = torchrun_lines(log)
    assert line.endswith("--nnodes 1 --nproc-per-node 2 --standalone --max-restarts 0 "
                         f"-m elas_megatron.cli.train {DEMO} train.steps=5 --resume")
    logged = log.read_text()
    cores = os.cpu_count() or 1
    assert f"OMP_NUM_THREADS={max(1, cores // 2)}" in logged
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in logged and "NCCL_DEBUG=WARN" in logged
    assert "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in logged
    assert "PET_SHUTDOWN_TIMEOUT=600" in logged


def test_multi_node_launch_uses_c10d_and_only_node_0_prints(stubs):
    env, log = stubs
    args = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", "gpu-a01:29400", "--rdzv-id", "77", DEMO]
    node1 = run(["launch/torchrun.sh", "--node-rank", "1", *args], env)
    assert node1.returncode == 0, node1.stderr
    assert node1.stdout == ""
    (line,) = torchrun_lines(log)
    assert "--nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint gpu-a01:29400 --rdzv-id 77" in line


@pytest.mark.parametrize("args, fragment", [
    (["--nproc-per-node", "4", DEMO], "train.global_batch=16 is not divisible"),
    (["--nnodes", "2", "--nproc-per-node", "1", DEMO], "needs --rdzv-endpoint"),
    (["--nnodes", "2", "--node-rank", "2", DEMO], "--node-rank 2 is not below --nnodes 2"),
    (["--nproc-per-node", "1"], "no config given"),
])
def test_bad_launches_stop_before_torchrun_with_exit_2(stubs, args, fragment):
    env, log = stubs
    out = run(["launch/torchrun.sh", *args], env)
    assert out.returncode == 2 and fragment in out.stderr
    assert torchrun_lines(log) == []


def test_dry_run_flag_stops_after_the_report(stubs):
    env, log = stubs
    out = run(["launch/torchrun.sh", "--nproc-per-node", "1", DEMO, "--dry-run"], env)
    assert out.returncode == 0 and "memory/GPU" in out.stdout
    assert torchrun_lines(log) == []


def slurm_env(env: dict) -> dict:
    return dict(env, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_NNODES="2",
                SLURM_GPUS_ON_NODE="2", SLURM_SUBMIT_DIR=str(REPO))


def test_sbatch_runs_one_torchrun_per_node_with_the_first_host_as_rendezvous(stubs):
    env, log = stubs
    out = run(["bash", "launch/slurm.sbatch", DEMO, "train.micro_batch=4"], slurm_env(env))
    assert out.returncode == 0, out.stderr
    assert "2 node(s) x 2 process(es) (2 GPU(s)): gpu-a01 gpu-a02; rendezvous 10.0.0.1:24242" in out.stdout
    lines = sorted(torchrun_lines(log))
    assert len(lines) == 2
    for node, line in enumerate(lines):
        assert line.startswith(f"torchrun node={node} --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d "
                               "--rdzv-endpoint 10.0.0.1:24242 --rdzv-id 4242 --max-restarts 0 "
                               f"-m elas_megatron.cli.train {DEMO} train.micro_batch=4 --resume")
    assert "srun nodes=2 launch/torchrun.sh" in log.read_text()
    assert "scontrol requeue" not in log.read_text()
    assert out.stdout.count("memory/GPU") == 1              # only node 0 prints the report


def test_cpu_nodes_run_one_process_each(stubs):
    env, log = stubs
    env = dict(slurm_env(env), SLURM_GPUS_PER_NODE="0")  # what --gpus-per-node=0 sets
    del env["SLURM_GPUS_ON_NODE"]
    out = run(["bash", "launch/slurm.sbatch", DEMO], env)
    assert out.returncode == 0, out.stderr
    assert "2 node(s) x 1 process(es) (0 GPU(s))" in out.stdout
    assert all(" --nnodes 2 --nproc-per-node 1 " in line for line in torchrun_lines(log))


@pytest.mark.parametrize("sig, extra_env, requeue", [
    ("USR1", {}, True),                                    # the time-limit warning: requeue
    ("USR1", {"ELAS_CHAIN": "1/2"}, False),                # ... unless the next link of a chain continues
    ("TERM", {"ELAS_CHAIN": "1/2"}, True),                 # scancel --signal=TERM --batch: requeue
    ("TERM", {"STUB_JOB_STATE": "CANCELLED"}, False),      # scancel: SLURM sent the TERM, job already cancelled
])
def test_signal_reaches_the_workers_and_the_job_requeues_after_they_exit(stubs, tmp_path, sig, extra_env, requeue):
    env, log = stubs
    env = dict(slurm_env(env), STUB_WAIT_SIGNAL="1", **extra_env)
    proc = subprocess.Popen(["bash", "launch/slurm.sbatch", DEMO, "train.micro_batch=4"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready.{n}").exists() for n in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(getattr(signal, f"SIG{sig}"))         # USR1: what `--signal=B:USR1@300` does
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    events = [line for line in log.read_text().splitlines()
              if line.startswith(("srun forwards", "scontrol requeue")) or " got " in line]
    assert events[0] == "srun forwards USR1"               # never TERM: srun would SIGKILL its tasks
    assert sorted(events[1:3]) == ["torchrun node=0 got USR1", "torchrun node=1 got USR1"]
    assert events[3:] == (["scontrol requeue 4242"] if requeue else [])  # only after every worker has exited
    assert f"SIG{sig} received: forwarding SIGUSR1 to the workers" in out


def test_submit_validates_then_calls_sbatch(stubs):
    env, log = stubs
    out = run(["launch/submit.sh", "--nodes=2", "--gpus-per-node=2", "--time=01:00:00", "--", DEMO,
               "train.micro_batch=4"], env)
    assert out.returncode == 0, out.stderr
    assert "world 4 = dp 4" in out.stdout
    assert log.read_text().strip() == ("sbatch --job-name=elas-demo --nodes=2 --gpus-per-node=2 --time=01:00:00 "
                                       f"launch/slurm.sbatch {DEMO} train.micro_batch=4")
    assert (REPO / "runs/slurm").is_dir()
    bad = run(["launch/submit.sh", "--nodes=2", "--gpus-per-node=2", DEMO], env)   # 16 % (8 * 4) != 0
    assert bad.returncode == 2 and "not divisible" in bad.stderr
    assert [line for line in log.read_text().splitlines() if line.startswith("sbatch ")] == \
        [log.read_text().splitlines()[0]]


@pytest.mark.parametrize("script", ["launch/torchrun.sh", "launch/submit.sh"])
def test_help_prints_the_usage_and_exits_0(stubs, script):
    env, log = stubs
    out = run([script, "--help"], env)
    assert out.returncode == 0 and f"{script} --help" in out.stdout and out.stderr == ""
    assert "--no-data-check" in out.stdout and "set -euo" not in out.stdout and log.read_text() == ""


def test_planning_flags_reach_the_dry_run_with_the_planned_world_size(stubs):
    env, log = stubs
    files = ["configs/c4.yaml", "configs/model/7b.yaml", "configs/variant/elas.yaml", "configs/layout/tp4-pp2.yaml"]
    out = run(["launch/torchrun.sh", "--nnodes", "4", "--nproc-per-node", "8", "--dry-run", *files,
               "--no-data-check", "--vocab-size", "32000"], env)
    assert out.returncode == 0, out.stderr
    assert "world 32 = dp 4 x tp 4 x pp 2" in out.stdout and "vocab 32000 (--vocab-size)" in out.stdout
    assert torchrun_lines(log) == []
    out = run(["launch/torchrun.sh", DEMO, "--no-data-check"], env)
    assert out.returncode == 2 and "--no-data-check is for planning: add --dry-run" in out.stderr
    out = run(["launch/submit.sh", "--nodes=4", "--dry-run", "--", *files, "--no-data-check"], env)
    assert out.returncode == 0, out.stderr
    assert "world 32 = dp 4 x tp 4 x pp 2" in out.stdout and "sbatch" not in log.read_text()


def test_submit_keeps_planning_flags_out_of_the_job(stubs):
    env, log = stubs
    files = ["configs/c4.yaml", "configs/model/1b.yaml", "configs/variant/elas.yaml", "configs/layout/dp8.yaml"]
    out = run(["launch/submit.sh", "--nodes=4", "--no-data-check", "--", *files, "train.micro_batch=16", "--resume"],
              env)
    assert out.returncode == 0, out.stderr
    sbatch = [line for line in log.read_text().splitlines() if line.startswith("sbatch ")]
    assert len(sbatch) == 1 and sbatch[0].endswith("configs/layout/dp8.yaml train.micro_batch=16 --resume")
    assert "--no-data-check" not in sbatch[0]


def test_submit_chain_makes_each_job_depend_on_the_previous_one(stubs, tmp_path):
    env, log = stubs
    out = run(["launch/submit.sh", "--nodes=2", "--gpus-per-node=0", "--chain=3", f"--output={tmp_path}/logs/%j.out",
               "--", DEMO], dict(env, ELAS_SUBMIT_DRY="1"))
    assert out.returncode == 0, out.stderr
    assert "world 2 = dp 2" in out.stdout and (tmp_path / "logs").is_dir()   # SLURM does not create it
    sbatch = [line for line in out.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(sbatch) == 3
    assert "--dependency" not in sbatch[0] and "--export=ALL\\,ELAS_CHAIN=1/3 --parsable launch/slurm.sbatch" in sbatch[0]
    assert "--dependency=afterany:\\<job\\ 2\\>" in sbatch[2] and "ELAS_CHAIN=3/3" in sbatch[2]
    bad = run(["launch/submit.sh", "--chain=0", DEMO], env)
    assert bad.returncode == 2 and bad.stderr.strip() == "launch/submit.sh: --chain=0 must be a positive integer"
