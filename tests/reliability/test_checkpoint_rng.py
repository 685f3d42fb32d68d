"""Per-rank RNG states in checkpoints: with dropout on (every step draws random numbers), a resumed run repeats an
uninterrupted run's per-step losses exactly, in one process and on two ranks under torchrun; the states of every
generator come back; a checkpoint of another layout resumes without them and says so once."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from dropout_train import enable_dropout
from reliability_runs import launch, step_losses

from elas_megatron.training.checkpoint import get_rng_state

DROPOUT_TRAIN = Path(__file__).parent / "dropout_train.py"
NOT_RESTORED = "RNG states were not restored from"


def _losses(trainer, steps: int) -> list[float]:
    return [trainer.train_step()[0] for _ in range(steps)]


def test_a_dropout_run_resumes_exactly_in_one_process(make_trainer, monkeypatch, caplog):
    enable_dropout(monkeypatch)
    want = _losses(make_trainer("train.steps=6"), 6)
    first = make_trainer("train.steps=6")
    got = _losses(first, 3)
    first.save()
    resumed = make_trainer("train.steps=6", resume=True)
    assert resumed.step == 3
    got += _losses(resumed, 3)
    assert got == want  # bit for bit
    assert NOT_RESTORED not in caplog.text
    # the test can fail: without the restored states the dropout masks after the resume are other ones
    monkeypatch.setattr("elas_megatron.training.trainer.set_rng_state", lambda state: True)
    assert _losses(make_trainer("train.steps=6", resume=True), 1)[0] != want[3]


def test_every_generator_comes_back(make_trainer):
    from megatron.core import tensor_parallel

    trainer = make_trainer()
    trainer.train_step()
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = tracker.get_states()  # (on CPU the tracker's streams are stand-in CPU generators)
    assert states, "megatron's RNG tracker has no streams"
    tracker.set_states({name: torch.Generator().manual_seed(700 + i).get_state() for i, name in enumerate(states)})
    saved = get_rng_state()
    trainer.save()
    random.seed(0)
    np.random.seed(0)  # a new Trainer re-seeds torch and the tracker itself
    make_trainer(resume=True)
    now = get_rng_state()
    assert now["random"] == saved["random"]
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(now["numpy"], saved["numpy"]))
    assert torch.equal(now["torch"], saved["torch"])
    assert now["tracker"].keys() == saved["tracker"].keys()
    assert all(torch.equal(now["tracker"][k], saved["tracker"][k]) for k in saved["tracker"])


@pytest.mark.distributed
@pytest.mark.slow
def test_a_dropout_run_resumes_exactly_on_two_ranks_and_a_new_layout_warns(tmp_path):
    """Two data-parallel ranks, dropout on: rank 1 is killed at the start of step 5 (checkpoint 3 exists), --resume
    finishes with the uninterrupted run's losses bit for bit. Then the same checkpoint directory resumed by one
    process (dp 2 -> 1) trains on, logging once that the RNG states were not restored."""
    run_args = ["train.steps=6", "checkpoint.every=3", "checkpoint.save_final=false", "checkpoint.keep_last=0"]
    reference = launch(tmp_path / "reference", *run_args, script=DROPOUT_TRAIN)
    assert reference.returncode == 0, reference.stderr[-3000:]
    want = step_losses(tmp_path / "reference" / "metrics.jsonl")
    assert sorted(want) == [1, 2, 3, 4, 5, 6]

    run = tmp_path / "run"
    killed = launch(run, *run_args, faults="kill@5:rank=1", script=DROPOUT_TRAIN)
    assert killed.returncode != 0 and (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    resumed = launch(run, *run_args, resume=True, script=DROPOUT_TRAIN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000003 at step 3" in resumed.stderr and NOT_RESTORED not in resumed.stderr
    assert step_losses(run / "metrics.jsonl") == want

    (run / "checkpoints" / "latest").write_text("step_00000003\n")
    reshaped = launch(run, "train.steps=6", "checkpoint.save_final=false", nproc=1, resume=True, script=DROPOUT_TRAIN)
    assert reshaped.returncode == 0, reshaped.stderr[-3000:]
    warnings = [line for line in reshaped.stderr.splitlines() if NOT_RESTORED in line]
    assert len(warnings) == 1 and ("step_00000003: the layout changed (saved with pp=1 tp=1 dp=2, this run has pp=1 "
                                   "tp=1 dp=1)") in warnings[0], reshaped.stderr[-3000:]
    assert sorted(step_losses(run / "metrics.jsonl")) == [1, 2, 3, 4, 5, 6]  # it trained steps 4-6 again
