"""Helpers of the reliability tests: launch elas-train (1 process, or 2 under torchrun) on the shipped demo corpus
with tiny shapes and injected faults (``fault_train.py``), per-step losses from metrics.jsonl (read as
docs/reliability.md defines, by :func:`elas_megatron.training.metrics.read_metrics`), and a tiny in-memory dataset
for in-process trainers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np

from elas_megatron.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.ffn_hidden_size=128",
        "model.rank=16", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=4", "train.eval_iters=1",
        "log.every=1", "model.dense_warmup_steps=2", "optim.warmup_steps=2", "log.level=info"]
DATA = [f"data.tokenizer={REPO / 'data/demo/tokenizer.model'}",
        f"data.train_prefixes=[{REPO / 'data/demo/tokens/demo_text_document'}]"]
FAULTS_ENV = "ELAS_TEST_FAULTS"
FAULT_TRAIN = Path(__file__).with_name("fault_train.py")
"""elas-train with the faults of ``$FAULTS_ENV`` injected."""


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
"""torchrun on one node; --standalone picks a free rendezvous port itself (no race with other jobs' ports)."""


def launch(run_dir: Path, *overrides: str, nproc: int = 2, faults: str | None = None, resume: bool = False,
           timeout_s: int = 600, script: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``elas-train configs/demo.yaml`` (under torchrun when ``nproc > 1``) and wait for it.

    ``faults``: injected by :class:`faults.FaultInjector` (``fault_train.py`` runs instead of elas-train).
    ``script``: a file to run instead of ``-m elas_megatron.cli.train`` that takes the same arguments (e.g.
    ``dropout_train.py``; it then installs the faults itself). Whatever of the job is left afterwards -- a killed
    rank leaves dist_checkpointing's helper processes behind, in the rank's own session -- is found by a marker in
    its environment and killed by pid (only processes this call started).
    """
    cmd = launch_command(run_dir, *overrides, nproc=nproc, script=script if script or not faults else FAULT_TRAIN,
                         resume=resume)
    env = {**({FAULTS_ENV: faults} if faults else {}), **(env or {})}
    log = run_dir.parent / f"{run_dir.name}.launch{len(list(run_dir.parent.glob(run_dir.name + '.launch*')))}"
    return run(cmd, log, timeout_s, env)


def launch_command(run_dir: Path, *overrides: str, nproc: int = 2, script: Path | None = None,
                   resume: bool = False) -> list[str]:
    """The command :func:`launch` runs."""
    cmd = TORCHRUN + ["--nproc-per-node", str(nproc)] if nproc > 1 else [sys.executable, "-u"]
    cmd += ["-m", "elas_megatron.cli.train"] if script is None else [str(script)]
    cmd += [str(REPO / "configs/demo.yaml"), *TINY, *DATA, f"train.run_dir={run_dir}",
            f"data.cache_dir={run_dir.parent / 'data_cache'}", *overrides]
    if resume:
        cmd.append("--resume")
    return cmd


def run(cmd: list[str], log: Path, timeout_s: int, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` (output to ``log``.out/.err), wait, then kill whatever it left behind (see :func:`launch`)."""
    marker = f"{os.getpid()}-{uuid.uuid4().hex}"
    # PYTHONPATH: scripts outside the repository root import this checkout's elas_megatron, installed or not
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    full_env = dict(os.environ, OMP_NUM_THREADS="1", ELAS_TEST_LAUNCH=marker, PYTHONPATH=python_path)
    full_env.pop(FAULTS_ENV, None)
    full_env.update(env or {})
    # Output goes to files, not pipes: helper processes of killed ranks would keep pipes open until killed.
    with open(f"{log}.out", "w") as out_f, open(f"{log}.err", "w") as err_f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out_f, stderr=err_f)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout_s} s; see {log}.err") from None
        finally:
            _kill_marked(marker)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, Path(f"{log}.out").read_text(),
                                       Path(f"{log}.err").read_text())


def _kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment has ``ELAS_TEST_LAUNCH=marker`` (Linux /proc)."""
    needle = f"ELAS_TEST_LAUNCH={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):  # gone meanwhile, or not ours to read
            pass


def step_losses(path: Path) -> dict[int, float]:
    records = [r for r in read_metrics(path) if "loss" in r]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order after superseding: {steps}"
    return {r["step"]: r["loss"] for r in records}


class RandomTokens:
    """``n`` samples of ``seq_len`` random tokens in GPTDataset's item format (deterministic per index)."""

    def __init__(self, n: int, seq_len: int, vocab_size: int) -> None:
        self.n, self.seq_len, self.vocab_size = n, seq_len, vocab_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        seq = np.random.default_rng(i).integers(0, self.vocab_size, self.seq_len + 1)
        return {"tokens": seq[:-1], "labels": seq[1:], "loss_mask": np.ones(self.seq_len, dtype=np.float32),
                "position_ids": np.arange(self.seq_len)}
