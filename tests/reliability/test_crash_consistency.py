"""Crash consistency: SIGKILL of one rank or of all ranks, mid-step or inside a checkpoint save (synchronous or
asynchronous), then --resume: the run continues from the last complete checkpoint and its per-step losses equal an
uninterrupted run's exactly. A full disk or an unwritable checkpoint directory stops the run with one clear line
and leaves the previous checkpoints intact. Plus the checkpoint directory's invariants, tested in one process."""
from __future__ import annotations

import json
import os

import pytest
from reliability_runs import launch, step_losses

from elas_megatron.training.checkpoint import META, CheckpointError, CheckpointManager

RUN = ["train.steps=6", "checkpoint.every=2", "checkpoint.save_final=false", "checkpoint.keep_last=1",
       "parallel.zero_stage=1", "train.density_check_every=2"]
ASYNC = ["checkpoint.async_save=true"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    """Per-step losses of RUN on two ranks without interruption (synchronous saves)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    reference = launch(run_dir, *RUN)
    assert reference.returncode == 0, reference.stderr[-3000:]
    losses = step_losses(run_dir / "metrics.jsonl")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    return losses


def _checkpoints(run_dir):
    ckpt = run_dir / "checkpoints"
    return sorted(p.name for p in ckpt.iterdir() if p.name != "latest"), (ckpt / "latest").read_text().strip()


@pytest.mark.distributed
@pytest.mark.slow
def test_kills_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted):
    """Two ranks, distributed optimizer. One chain of crashes, each followed by --resume:
    1. rank 1 is killed at the start of step 4 (checkpoint 2 exists);
    2. both ranks are killed inside the save of step 4, files written but not published;
    3. rank 0 is killed inside the save of step 4 after the rename, before ``latest`` moved;
    4. the run finishes. Its losses (resumed records superseding) equal the uninterrupted run's, bit for bit."""
    want = uninterrupted
    run = tmp_path / "run"
    killed = launch(run, *RUN, faults="kill@4:rank=1")
    assert killed.returncode != 0 and "exitcode  : -9" in killed.stderr, killed.stderr[-3000:]
    assert _checkpoints(run) == (["step_00000002"], "step_00000002"), killed.stderr[-3000:]

    killed = launch(run, *RUN, faults="kill_in_save@4:written", resume=True)
    assert killed.returncode != 0 and "resumed from" in killed.stderr, killed.stderr[-3000:]
    assert _checkpoints(run) == ([".step_00000004.tmp", "step_00000002"], "step_00000002"), killed.stderr[-3000:]

    killed = launch(run, *RUN, faults="kill_in_save@4:published:rank=0", resume=True)
    assert killed.returncode != 0, killed.stderr[-3000:]
    # the new checkpoint is in place, but latest still names the old one, which resuming trusts
    assert _checkpoints(run) == (["step_00000002", "step_00000004"], "step_00000002"), killed.stderr[-3000:]

    finished = launch(run, *RUN, resume=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "resumed from" in finished.stderr and "step_00000002 at step 2" in finished.stderr
    assert _checkpoints(run) == (["step_00000004"], "step_00000004")  # re-saved, pruned (keep_last=1), no leftovers
    assert step_losses(run / "metrics.jsonl") == want


@pytest.mark.distributed
@pytest.mark.slow
def test_kills_during_async_saves_then_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted):
    """The chain above with checkpoint.async_save=true:
    1. rank 1 is killed just after its background writer for checkpoint 4 started (training would go on);
    2. both ranks are killed once checkpoint 4's files are all written, before it is published;
    3. the run finishes. In every state ``latest`` names a complete checkpoint, and the losses equal the
       uninterrupted synchronous run's, bit for bit."""
    run = tmp_path / "run"
    killed = launch(run, *RUN, *ASYNC, faults="kill_in_save@4:scheduled:rank=1")
    assert killed.returncode != 0 and "exitcode  : -9" in killed.stderr, killed.stderr[-3000:]
    assert _checkpoints(run) == ([".step_00000004.tmp", "step_00000002"], "step_00000002"), killed.stderr[-3000:]

    killed = launch(run, *RUN, *ASYNC, faults="kill_in_save@4:written", resume=True)
    assert killed.returncode != 0 and "resumed from" in killed.stderr, killed.stderr[-3000:]
    assert _checkpoints(run) == ([".step_00000004.tmp", "step_00000002"], "step_00000002"), killed.stderr[-3000:]

    finished = launch(run, *RUN, *ASYNC, resume=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "step_00000002 at step 2" in finished.stderr
    assert _checkpoints(run) == (["step_00000004"], "step_00000004")
    assert step_losses(run / "metrics.jsonl") == uninterrupted


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_disk_full_during_a_save_stops_every_rank_and_keeps_the_previous_checkpoint(tmp_path, mode):
    """Rank 1's checkpoint files cannot be written (file size limit, as on a full disk) while saving step 4; with
    async saves the error surfaces when the save is finalised, as the same collective error."""
    result = launch(tmp_path / "run", *RUN, *(ASYNC if mode == "async" else []),
                    faults="disk_full_in_save@4:rank=1")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("elas-train: error:")]
    assert errors and all("checkpoint step_00000004 could not be written" in e and "previous checkpoints are "
                          "intact" in e and "failed on rank(s) [1]" in e for e in errors), errors
    # (rank 0 prints it; rank 1, over its file size limit, cannot even write to its log any more)
    assert _checkpoints(tmp_path / "run") == (["step_00000002"], "step_00000002")


def test_unwritable_checkpoint_dir_stops_before_training(tmp_path, capsys):
    from reliability_runs import DATA, REPO, TINY

    from elas_megatron.cli.train import main

    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the checkpoint directory should be")  # fails for root too, unlike chmod
    argv = [str(REPO / "configs/demo.yaml"), *TINY, *DATA, "train.steps=2", f"train.run_dir={tmp_path / 'run'}",
            f"checkpoint.dir={blocker / 'ckpt'}"]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("elas-train:")]
    assert len(err) == 1 and f"cannot write checkpoints to {blocker / 'ckpt'} (checkpoint.dir)" in err[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing was trained


# ------------------------------------------------------------------------------ the directory, one process
def _fake_checkpoint(directory, step):
    path = directory / CheckpointManager.step_name(step)
    path.mkdir(parents=True)
    (path / "data.bin").write_bytes(b"x" * 1000)
    (path / META).write_text(json.dumps({"step": step}))
    return path


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=0, global_rank=0)
    assert manager.latest() is None
    _fake_checkpoint(tmp_path, 2)
    four = _fake_checkpoint(tmp_path, 4)
    (tmp_path / ".step_00000006.tmp").mkdir()  # a save killed before publishing
    assert manager.latest() == four  # no pointer (killed between the first rename and the pointer)
    (tmp_path / "latest").write_text("step_00000002\n")
    assert manager.latest() == tmp_path / "step_00000002"  # a valid pointer wins (rolling back by hand works)
    (tmp_path / "latest").write_text("step_00000008\n")  # names a checkpoint that is gone
    assert manager.latest() == four and "names an incomplete or missing checkpoint" in caplog.text


def test_prune_never_leaves_a_loadable_half_deleted_checkpoint(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=1, global_rank=0)
    old, new = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    monkeypatch.setattr("shutil.rmtree", lambda path, ignore_errors=False: None)  # "killed" before deleting
    manager._prune(keep=new)
    assert not old.exists() and (tmp_path / ".step_00000002.old").is_dir()
    assert manager.complete_steps() == [new]


def test_publish_flushes_files_and_directories_before_renaming(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=0, global_rank=0)
    tmp = tmp_path / ".step_00000002.tmp"
    tmp.mkdir()
    (tmp / "shard.distcp").write_bytes(b"x")
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (synced.append(f"rename {a}"), real_replace(a, b)))
    manager._publish(tmp, tmp_path / "step_00000002", {"step": 2})
    first_rename = next(i for i, s in enumerate(synced) if s.startswith("rename"))
    before = synced[:first_rename]
    assert {str(tmp / "shard.distcp"), str(tmp / META), str(tmp)} <= set(before)
    assert synced[first_rename + 1] == str(tmp_path)  # the rename itself is made durable
    assert (tmp_path / "latest").read_text() == "step_00000002\n"


def test_a_save_is_refused_up_front_without_room_for_it(tmp_path, monkeypatch, make_trainer):
    trainer = make_trainer(f"checkpoint.dir={tmp_path / 'ckpt'}")
    trainer.train_step()
    first = trainer.save()
    trainer.train_step()
    free = type("usage", (), {"free": 100})()
    monkeypatch.setattr("shutil.disk_usage", lambda path: free)
    with pytest.raises(CheckpointError, match=r"checkpoint step_00000002 could not be written .* previous checkpoints "
                                              r"are intact.*rank 0: OSError: \[Errno 28\] 0\.00 GiB free, but the "
                                              r"previous checkpoint \(step_00000001\) took"):
        trainer.save()
    assert trainer.ckpt.complete_steps() == [first] and trainer.ckpt.latest() == first
    assert not list((tmp_path / "ckpt").glob(".step_*"))  # the temporary directory was removed
