"""Numerical guards: NaN/Inf in a gradient or an activation is detected by every rank together; the step is skipped
(weights, optimizer, LR schedule untouched) within train.max_skipped_steps, else the run stops naming the step,
rank and layer; the ELAS activation density in training (the guard's and the check's own rules:
tests/unit/training/test_numerics.py, tests/unit/sparsity/test_density.py)."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from reliability_runs import TORCHRUN, launch, run

from elas_megatron.training.metrics import read_metrics
from elas_megatron.training.numerics import NumericalError


def _weights(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model[0].parameters()]


def _adam_state(trainer) -> list[torch.Tensor]:
    opt = trainer.optimizer
    inner = getattr(opt, "chained_optimizers", [opt])[0].optimizer
    return [v.clone() for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def test_a_skipped_step_changes_nothing_and_training_goes_on(make_trainer, caplog):
    trainer = make_trainer("train.max_skipped_steps=1", faults="nan_grad@3:decoder.layers.1.mlp")
    for _ in range(2):
        trainer.train_step()
    weights, adam, lr_steps = _weights(trainer), _adam_state(trainer), trainer.scheduler.num_steps
    with caplog.at_level(logging.WARNING, logger="elas_megatron.training.numerics"):
        loss, grad_norm = trainer.train_step()
    assert grad_norm is None and trainer.step == 3 and trainer.guard.skipped_steps == 1
    assert "non-finite values at step 3" in caplog.text and "decoder.layers.1.mlp.linear_fc1.A" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(weights, _weights(trainer)))
    assert all(torch.equal(a, b) for a, b in zip(adam, _adam_state(trainer)))
    assert trainer.scheduler.num_steps == lr_steps
    loss, grad_norm = trainer.train_step()  # the next batch trains normally
    assert grad_norm is not None and torch.isfinite(torch.tensor(loss))
    assert not all(torch.equal(a, b) for a, b in zip(weights, _weights(trainer)))


def test_without_budget_the_run_stops_naming_step_rank_and_layer(make_trainer):
    trainer = make_trainer(faults="nan_act@2:decoder.layers.1.self_attention")
    trainer.train_step()
    with pytest.raises(NumericalError, match=r"non-finite values at step 2 \(loss nan\): rank 0: first non-finite "
                                             r"activation: output of decoder\.layers\.1\.self_attention; .*"
                                             r"train\.max_skipped_steps=0"):
        trainer.train_step()


def test_elas_train_prints_one_line_and_exits_3(tmp_path, capsys):
    from faults import FaultInjector
    from reliability_runs import DATA, REPO, TINY

    from elas_megatron.cli.train import EXIT_NUMERICAL, main

    argv = [str(REPO / "configs/demo.yaml"), *TINY, *DATA, "train.steps=3", f"train.run_dir={tmp_path / 'run'}",
            "checkpoint.save_final=false"]
    assert main(argv, callbacks=[FaultInjector.parse("nan_grad@2:output_layer")]) == EXIT_NUMERICAL == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("elas-train:")]
    assert len(err) == 1 and err[0].startswith("elas-train: numerical error: non-finite values at step 2 (loss "), err


def test_the_skip_budget_survives_a_resume(make_trainer):
    trainer = make_trainer("train.max_skipped_steps=1", faults="nan_grad@2:output_layer")
    for _ in range(3):
        trainer.train_step()
    trainer.save()
    resumed = make_trainer("train.max_skipped_steps=1", faults="nan_grad@5:output_layer", resume=True)
    assert resumed.step == 3 and resumed.guard.skipped_steps == 1
    resumed.train_step()
    with pytest.raises(NumericalError, match="2 bad step"):
        resumed.train_step()


def test_density_is_measured_and_logged_in_training(make_trainer):
    trainer = make_trainer("model.variant=elas", "train.density_check_every=2", "train.steps=4", "train.eval_iters=1")
    trainer.train()
    records = [r for r in read_metrics(trainer.run_dir / "metrics.jsonl") if "loss" in r]
    densities = {r["step"]: r.get("sparsity/act_density") for r in records}
    assert densities[1] is None and densities[3] is None
    assert 0.2 < densities[2] <= 0.5 and 0.2 < densities[4] <= 0.5


@pytest.mark.distributed
def test_two_ranks_agree_skip_then_stop(tmp_path):
    """Rank 1's NaN gradient at step 3 is skipped by both ranks (they stay in lockstep); rank 0's NaN activation
    at step 5 exceeds train.max_skipped_steps=1 and both stop naming step 5, rank 0 and the layer."""
    result = launch(tmp_path / "run", "train.steps=6", "train.max_skipped_steps=1", "checkpoint.save_final=false",
                    faults="nan_grad@3:rank=1:decoder.layers.1.mlp,nan_act@5:rank=0:decoder.layers.0.self_attention")
    assert result.returncode != 0 and "exitcode  : 3" in result.stderr, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"[rank{rank}] WARNING elas_megatron.training.numerics: non-finite values at step 3 " in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("elas-train:")]
    assert errors and all(line.startswith("elas-train: numerical error: non-finite values at step 5 (loss nan): "
                                          "rank 0: first non-finite activation: output of "
                                          "decoder.layers.0.self_attention") for line in errors), errors
    assert "NumericalError" not in result.stderr, result.stderr[-3000:]  # a line, not a traceback
    assert "rank 1: non-finite gradient in 1 of" in result.stderr
    steps = {r["step"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r}
    assert sorted(steps) == [1, 2, 3, 4]
    assert steps[3]["grad_norm"] is None and steps[3]["skipped_steps"] == 1
    assert steps[4]["lr"] == steps[3]["lr"] and steps[4]["grad_norm"] is not None  # the schedule did not advance


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_a_skipped_step_leaves_every_optimizer_backend_clean(tmp_path):
    out = tmp_path / "losses.json"
    cmd = TORCHRUN + ["--nproc-per-node", "2", str(Path(__file__).parent / "skip_backends.py"), str(out)]
    result = run(cmd, tmp_path / "skip", timeout_s=600)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = json.loads(out.read_text())
    want = losses.pop("megatron")
    assert all(torch.isfinite(torch.tensor(want))) and want[3] != want[2]
    for backend, got in losses.items():
        assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-5, (backend, got, want)
