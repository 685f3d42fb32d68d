"""End to end: elas-train on the shipped demo corpus -- loss falls for every variant, resume continues exactly,
and bad configs stop with one line. Tiny shapes so the whole file runs in well under a minute on 2 cores."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from elas_megatron.cli.train import main

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.ffn_hidden_size=128",
        "model.rank=16", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=4", "train.eval_iters=2",
        "log.every=1", "checkpoint.save_final=false"]


DATA = [f"data.tokenizer={REPO / 'data/demo/tokenizer.model'}",
        f"data.train_prefixes=[{REPO / 'data/demo/tokens/demo_text_document'}]"]


def run(tmp_path: Path, *overrides: str, resume: bool = False) -> list[dict]:
    argv = [str(REPO / "configs/demo.yaml"), *TINY, *DATA, f"train.run_dir={tmp_path}", *overrides]
    assert main(argv + (["--resume"] if resume else [])) == 0
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("variant", ["dense", "cola", "elas"])
def test_loss_falls(tmp_path, variant):
    records = run(tmp_path, f"model.variant={variant}", "train.steps=30", "optim.lr=1e-2",
                  "model.dense_warmup_steps=0", "optim.warmup_steps=3")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(steps[0])
    first, last = sum(r["loss"] for r in steps[:3]) / 3, sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 0.5, (first, last)
    evals = [r for r in records if "val_loss" in r]
    assert evals and evals[-1]["step"] == 30 and evals[-1]["val_ppl"] > 1
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))  # configs/demo.yaml turns TensorBoard on


def test_resume_continues_the_step_count_and_the_losses(tmp_path):
    overrides = ["model.variant=elas", "train.steps=6", "checkpoint.every=3", "model.dense_warmup_steps=2",
                 "optim.warmup_steps=2"]
    full = [r for r in run(tmp_path / "full", *overrides) if "loss" in r]
    # Interrupt after step 3: run 3 steps of the same schedule, then resume to 6.
    part = tmp_path / "part"
    run(part, *overrides)  # saves step 3 only (no final save), as if killed after step 5
    assert (part / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    (part / "metrics.jsonl").unlink()
    resumed = [r for r in run(part, *overrides, resume=True) if "loss" in r]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(full[3:], resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)
        assert a["lr"] == pytest.approx(b["lr"])


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    run(tmp_path, "model.variant=cola", "train.steps=2", "checkpoint.save_final=true")
    argv = [str(REPO / "configs/demo.yaml"), *TINY, *DATA, "model.variant=elas", "train.steps=4",
            f"train.run_dir={tmp_path}", "--resume"]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("elas-train:")]
    assert len(err) == 1 and "different model" in err[0] and "model.variant: checkpoint 'cola' vs config 'elas'" in err[0]


@pytest.mark.parametrize("override, fragment", [
    ("model.variant=moe", "model.variant='moe' is invalid: choose one of 'dense', 'cola', 'elas'"),
    ("train.stepz=3", "unknown key train.stepz"),
    ("model.ffn_hidden_size=130", "model.ffn_hidden_size=130 is invalid for elas"),
])
def test_bad_config_is_one_line_and_exit_2(override, fragment, capsys):
    assert main([str(REPO / "configs/demo.yaml"), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]  # config errors come before logging starts: nothing else printed


def test_console_script_runs_and_prints_validation_perplexity(tmp_path):
    cmd = [sys.executable, "-m", "elas_megatron.cli.train", str(REPO / "configs/demo.yaml"), *TINY, *DATA,
           "train.steps=2", f"train.run_dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "validation perplexity" in out.stdout
