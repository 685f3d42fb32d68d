"""A real SLURM cluster of two nodes on this machine, for the tests of launch/slurm.sbatch and launch/submit.sh.

munged, slurmctld and two slurmd (``-N n1``, ``-N n2``: two node entries that share this host, each with its own
port and ``%n`` spool/log/pid files) run in the foreground as children of the test process, with their config,
state and logs in one directory. Every process they start carries ``ELAS_TEST_SLURM=<that directory>`` in its
environment, so :meth:`SlurmCluster.stop` can also end job processes that slurmstepd detached from the daemons.
Needs Debian's ``slurmctld slurmd slurm-client munge`` packages (22.05) and root (slurmd runs jobs as their user).
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "srun")
ENABLE_HINT = ("install SLURM to run them: apt-get install -y slurmctld slurmd slurm-client munge "
               "(as root; .ci/run does it)")
MARKER_ENV = "ELAS_TEST_SLURM"

# Time limits: the controller checks them (and sends --signal warnings) every 30 s, with the warning up to 30 s
# early; a job past its limit gets SIGTERM to every step and the batch shell, then SIGKILL KillWait s later.
# cred_expire: a requeued job may start again only once its old credentials expired (cred_expire + 1 s; the
# default 120 s would hold every requeue for two minutes, and starting it earlier fails with "Job credential
# revoked"); sched_interval: a job whose begin time passed waits for the next scheduling pass (default 60 s).
SLURM_CONF = """\
ClusterName=elastest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket,cred_expire=6
CredType=cred/munge
StateSaveLocation={root}/ctld
SlurmctldPidFile={root}/slurmctld.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdSpoolDir={root}/%n
SlurmdPidFile={root}/%n.pid
SlurmdLogFile={root}/%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=15
OverTimeLimit=0
MinJobAge=600
JobRequeue=1
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1_port} CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2_port} CPUs=1 State=UNKNOWN
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


def missing_binaries() -> list[str]:
    """SLURM/munge programs not found (daemons are looked up in /usr/sbin too)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name, path=path) is None]


def skip_reason() -> str | None:
    """Why the SLURM tests cannot run here (one line saying how to enable them), or None."""
    missing = missing_binaries()
    if missing:
        return f"SLURM not installed (no {', '.join(missing)}): {ENABLE_HINT}"
    if os.geteuid() != 0:
        return f"SLURM tests need root (slurmd runs the jobs as their user): {ENABLE_HINT}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd n1/n2, started by :meth:`start`, stopped by :meth:`stop` (idempotent).

    Args:
        root: an empty directory for the config, state and daemon logs.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"), **{MARKER_ENV: str(self.root)})
        self.env["PATH"] = os.pathsep.join([self.env.get("PATH", ""), "/usr/sbin", "/sbin"])
        for key in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del self.env[key]  # a test session inside a SLURM job must not leak its job into ours

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 60) -> None:
        """Write the config, start the daemons, wait until both nodes are idle; on any failure stop and raise."""
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> None:
        root = self.root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)  # munged refuses directories others can write
        (root / "ctld").mkdir(exist_ok=True)
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        conf = SLURM_CONF.format(host=socket.gethostname(), root=root, user=getpass.getuser(),
                                 ctld_port=free_port(), n1_port=free_port(), n2_port=free_port())
        (root / "slurm.conf").write_text(conf)
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={root}/munge.socket",
                               f"--key-file={key}", f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                               f"--seed-file={root}/munged.seed"])
        self._wait(lambda: (root / "munge.socket").exists(), timeout_s, "munged did not create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait(lambda: self.scontrol("ping").returncode == 0 and "UP" in self.scontrol("ping").stdout,
                   timeout_s, "slurmctld did not answer `scontrol ping`")
        for node in ("n1", "n2"):
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node])
        self._wait(self._nodes_idle, timeout_s, "nodes n1, n2 did not become idle")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.out", "wb")  # noqa: SIM115 -- lives as long as the daemon
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}: {self.tail(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} within {timeout_s:.0f} s: {self.tail()}")
            time.sleep(0.2)

    def _nodes_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"]).stdout.split()
        return dict(zip(out[::2], out[1::2], strict=True)) == {"n1": "idle", "n2": "idle"}

    def stop(self) -> None:
        """Cancel every job, stop the daemons (SIGTERM, then SIGKILL after 10 s) and kill stray job processes."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", f"--user={getpass.getuser()}"], timeout=10)
        for name in reversed(list(self.procs)):
            self._stop_one(self.procs[name])
        self.kill_marked()

    @staticmethod
    def _stop_one(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the daemon's own children too
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)

    def kill_marked(self) -> list[int]:
        """SIGKILL every process whose environment holds this cluster's marker (slurmstepd and job processes)."""
        needle = f"{MARKER_ENV}={self.root}".encode() + b"\0"
        killed = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes() + b"\0":
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed.append(int(entry.name))
            except (OSError, ProcessLookupError):
                continue
        return killed

    # ---- clients --------------------------------------------------------------------------------------------
    def run(self, cmd: list[str], timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster (text output captured, never raises on exit status)."""
        try:
            return subprocess.run(cmd, env=kwargs.pop("env", self.env), capture_output=True, text=True,
                                  timeout=timeout, check=False, **kwargs)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(cmd, 124, exc.stdout or "", f"timed out after {timeout} s")

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(["scontrol", *args])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o``: the job's fields (JobState, RestartCnt, ExitCode, ...); {} when unknown."""
        out = self.scontrol("show", "job", "-o", str(job_id)).stdout.strip()
        fields = {}
        for item in out.split():
            key, sep, value = item.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait_job(self, job_id: int, states: tuple[str, ...], timeout_s: float) -> dict[str, str]:
        """Poll until the job's state is one of ``states`` (e.g. COMPLETED, FAILED); raise after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {states} after {timeout_s:.0f} s: {info}")
            time.sleep(0.5)

    def tail(self, name: str | None = None, chars: int = 2000) -> str:
        """The end of a daemon's log (all of them when ``name`` is None), for error messages."""
        names = [name] if name else list(self.procs)
        parts = []
        for n in names:
            for path in (self.root / f"{n}.out", self.root / f"{n.removeprefix('slurmd-')}.log",
                         self.root / f"{n}.log"):
                if path.exists() and path.stat().st_size:
                    parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)
