"""SIGTERM (preemption) during training: the run saves a checkpoint, exits 0, and --resume finishes with the same
per-step losses as an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import subprocs

from elas_megatron.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
ARGS = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.ffn_hidden_size=128",
        "model.rank=16", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=4", "train.eval_iters=2",
        "log.every=1", "train.steps=40", "optim.warmup_steps=2", "model.dense_warmup_steps=2",
        f"data.tokenizer={REPO / 'data/demo/tokenizer.model'}",
        f"data.train_prefixes=[{REPO / 'data/demo/tokens/demo_text_document'}]"]


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step training losses as the run finally went (read_metrics applies the resume events)."""
    return {rec["step"]: rec["loss"] for rec in read_metrics(run_dir / "metrics.jsonl") if "loss" in rec}


def cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "elas_megatron.cli.train", str(REPO / "configs/demo.yaml"), *ARGS,
            f"train.run_dir={run_dir}", *extra]


def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = tmp_path / "full"
    # the bounds below stop a hang only: beside two CPU hogs a process in its own session took minutes to start
    assert subprocs.run(cmd(full), cwd=REPO, env=env, capture_output=True, timeout=900).returncode == 0
    part = tmp_path / "part"
    proc = subprocess.Popen(cmd(part), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        metrics = part / "metrics.jsonl"
        deadline = time.monotonic() + 900
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
            assert proc.poll() is None, f"exited with {proc.returncode} before step 5: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no 5 steps logged in 900 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        subprocs.kill_group(proc)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped by SIGTERM" in stdout and "--resume" in stdout
    stopped_at = max(losses(part))
    assert stopped_at < 40
    assert (part / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    resumed = subprocs.run(cmd(part, "--resume"), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(1, 41))
    for step in range(1, 41):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
