"""Asynchronous checkpoint saves (``checkpoint.async_save``), in one process: training goes on while the files are
written from a snapshot of the save's step; the run's losses and checkpoints equal a synchronous run's; async and
sync checkpoints load through the same code; a preemption waits for the pending save. Kills and write errors
during async saves, on two ranks: ``test_crash_consistency.py``."""
from __future__ import annotations

import os
import signal

import pytest
import torch
from reliability_runs import step_losses

from elas_megatron.training.checkpoint import META, CheckpointError


def _run(make_trainer, tmp_path, name: str, *overrides: str, resume: bool = False):
    return make_trainer("train.steps=6", "checkpoint.every=3", "checkpoint.save_final=true",
                        f"train.run_dir={tmp_path / name}", f"checkpoint.dir={tmp_path / name / 'checkpoints'}",
                        *overrides, resume=resume)


def _files(step_dir) -> list[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*"))


def test_async_runs_save_and_resume_like_sync_runs(make_trainer, tmp_path):
    sync = _run(make_trainer, tmp_path, "sync")
    sync.train()
    asynchronous = _run(make_trainer, tmp_path, "async", "checkpoint.async_save=true")
    asynchronous.train()
    assert asynchronous.ckpt.pending is None  # the end of training waited for the final save
    want = step_losses(tmp_path / "sync" / "metrics.jsonl")
    assert step_losses(tmp_path / "async" / "metrics.jsonl") == want
    for name in ("sync", "async"):
        ckpt = tmp_path / name / "checkpoints"
        assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000003", "step_00000006"]
        assert (ckpt / "latest").read_text() == "step_00000006\n"
    assert _files(tmp_path / "sync/checkpoints/step_00000003") == _files(tmp_path / "async/checkpoints/step_00000003")
    # one loader for both: each checkpoint resumed by a trainer of the other mode continues identically
    for saved_by, loaded_by in (("sync", "async"), ("async", "sync")):
        trainer = _run(make_trainer, tmp_path, f"{saved_by}_loaded", f"checkpoint.async_save={loaded_by == 'async'}")
        trainer.load(tmp_path / saved_by / "checkpoints" / "step_00000003")
        assert [trainer.train_step()[0] for _ in range(3)] == [want[4], want[5], want[6]], (saved_by, loaded_by)


def test_training_goes_on_while_an_async_save_writes_the_state_of_its_step(make_trainer, tmp_path):
    trainer = _run(make_trainer, tmp_path, "run", "checkpoint.async_save=true")
    trainer.train_step()
    weights = [p.detach().clone() for p in trainer.model[0].parameters()]
    path = trainer.save()
    assert trainer.ckpt.pending == path and not path.exists() and trainer.ckpt.latest() is None
    trainer.train_step()  # changes the weights in place while the writer runs
    assert trainer.ckpt.pending == path  # published only by poll()/wait(), never behind the loop's back
    trainer.wait_for_checkpoint()
    assert trainer.ckpt.pending is None and trainer.ckpt.latest() == path and (path / META).is_file()
    resumed = _run(make_trainer, tmp_path, "run", resume=True)
    assert resumed.step == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, resumed.model[0].parameters()))


def test_preemption_waits_for_async_saves(make_trainer, tmp_path):
    """SIGTERM after step 4 (checkpoint 3 written in the background): the stop waits for it, saves step 4, waits
    again and returns; --resume then repeats the uninterrupted run's losses."""
    args = ("checkpoint.async_save=true", "checkpoint.save_final=false")
    _run(make_trainer, tmp_path, "full", *args).train()
    part = _run(make_trainer, tmp_path, "part", *args)
    step = part.train_step

    def step_then_sigterm():
        out = step()
        if part.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    part.train_step = step_then_sigterm
    part.train()
    assert part.stopped_by == "SIGTERM" and part.step == 4 and part.ckpt.pending is None
    ckpt = tmp_path / "part" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000004\n" and (ckpt / "step_00000003" / META).is_file()
    _run(make_trainer, tmp_path, "part", *args, resume=True).train()
    assert step_losses(tmp_path / "part" / "metrics.jsonl") == step_losses(tmp_path / "full" / "metrics.jsonl")


def test_background_writers_that_cannot_start_are_a_checkpoint_error(make_trainer, tmp_path, monkeypatch):
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    trainer = _run(make_trainer, tmp_path, "run", "checkpoint.async_save=true")
    trainer.train_step()
    first = trainer.save()
    trainer.train_step()

    def cannot_fork(self, request):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(AsyncCallsQueue, "schedule_async_request", cannot_fork)
    with pytest.raises(CheckpointError, match=r"checkpoint step_00000002 could not be written .* previous checkpoints "
                                              r"are intact.*rank 0: OSError: \[Errno 12\] Cannot allocate memory"):
        trainer.save()  # (waits for the first save, which is published)
    assert trainer.ckpt.pending is None and trainer.ckpt.latest() == first and (first / META).is_file()
    assert not list((tmp_path / "run" / "checkpoints").glob(".step_*"))
