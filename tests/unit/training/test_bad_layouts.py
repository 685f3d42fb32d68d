"""Bad parallel layouts stop ``elas-train`` at start-up with exit code 2 and one clear line (no traceback).

The CLI is run as a subprocess with the torchrun environment of an N-process job (RANK/WORLD_SIZE): every
layout rule is checked before a process group is created, so one process is enough to see what each rank of
the real job would print.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["model.hidden_size=32", "model.num_layers=4", "model.num_heads=4", "model.ffn_hidden_size=64",
        "model.rank=8", "model.vocab_size=128", "train.seq_len=16", "train.global_batch=8", "train.micro_batch=2",
        "train.steps=1"]


def _run_cli(tmp_path: Path, overrides: list[str], world_size: int, extra_env: dict | None = None):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"train:\n  run_dir: {tmp_path / 'run'}\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(world_size),
               MASTER_ADDR="127.0.0.1", MASTER_PORT="29599", **(extra_env or {}))
    proc = subprocess.run([sys.executable, "-m", "elas_megatron.cli.train", str(config), *TINY, *overrides],
                          env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("elas-train:")]
    return proc, lines


BAD_LAYOUTS = {
    "heads-not-divisible-by-tp": (["model.num_heads=4", "parallel.tp=8"], 8,
                                  "model.num_heads=4 is invalid: expected divisible by parallel.tp=8"),
    "layers-not-divisible-by-pp-x-vpp": (["model.num_layers=6", "parallel.pp=2", "parallel.vpp=2"], 2,
                                         "model.num_layers=6 is invalid: expected divisible by parallel.pp * "
                                         "parallel.vpp = 4"),
    "dff-per-tp-not-multiple-of-4": (["model.variant=elas", "model.ffn_hidden_size=100", "parallel.tp=2"], 2,
                                     "model.ffn_hidden_size=100 is invalid for elas with parallel.tp=2"),
    "global-batch-not-divisible": (["train.global_batch=12", "train.micro_batch=4"], 2,
                                   "train.global_batch=12 is not divisible by train.micro_batch * data-parallel "
                                   "size = 4 * 2"),
    "zero2-with-pp": (["parallel.optimizer=deepspeed", "parallel.zero_stage=2", "parallel.pp=2"], 2,
                      "parallel.zero_stage=2 is invalid: expected 0 or 1 with pipeline parallelism"),
    "world-not-divisible-by-tp-x-pp": (["parallel.tp=2", "parallel.pp=2"], 6,
                                       "world size 6 is not divisible by parallel.tp * parallel.pp = 4"),
}


@pytest.mark.parametrize("name", sorted(BAD_LAYOUTS))
def test_bad_layout_stops_with_one_line(tmp_path, name):
    overrides, world_size, expected = BAD_LAYOUTS[name]
    proc, lines = _run_cli(tmp_path, overrides, world_size)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "run").exists(), "nothing should be written before the layout is accepted"


def test_deepspeed_zero3_is_refused_before_any_process_group(tmp_path):
    proc, lines = _run_cli(tmp_path, ["parallel.optimizer=deepspeed", "parallel.zero_stage=3"], 1)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and "parallel.zero_stage=3 is invalid with parallel.optimizer=deepspeed" in lines[0]


def test_missing_deepspeed_gives_the_install_line(tmp_path):
    """Without DeepSpeed the framework runs; asking for it names the install command in one line."""
    shim = tmp_path / "shim" / "deepspeed"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named deepspeed (hidden by the test)')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")])}
    proc, lines = _run_cli(tmp_path, ["parallel.optimizer=deepspeed", "parallel.zero_stage=1"], 1, env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "needs DeepSpeed" in lines[0] and "pip install --no-deps deepspeed==0.19.8" in lines[0], lines[0]
