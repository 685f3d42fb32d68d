"""``checkpoint.fallback_to_verified``: when the newest checkpoint fails verification, ``--resume`` refuses by
default, naming the file (and the option); with the option it resumes from the newest checkpoint that verifies,
logging which one it skipped and why, and the losses after the resume equal an uninterrupted run's from that step."""
from __future__ import annotations

import logging

import pytest

from elas_megatron.training.checkpoint import CheckpointError


def _flip(step_dir):
    """Flip bytes in the middle of the largest data file (same size: only the sha256 can tell)."""
    shard = max(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    shard.write_bytes(bytes(data))
    return shard


def test_a_corrupt_newest_checkpoint_is_refused_or_skipped(make_trainer, caplog):
    reference = make_trainer("checkpoint.every=2")  # steps 1..8, checkpoints at 2, 4, 6
    losses = {}
    while not reference.should_stop():
        loss, _ = reference.train_step()
        losses[reference.step] = loss
        if reference.step % 2 == 0 and reference.step < 8:
            reference.save()
    step_dir = reference.ckpt.latest()
    assert step_dir.name == "step_00000006"
    shard = _flip(step_dir)

    with pytest.raises(CheckpointError) as info:  # the default: refuse, naming the file and the way out
        make_trainer(resume=True)
    message = str(info.value)
    assert f"{shard} does not match the sha256" in message and "checkpoint.fallback_to_verified=true" in message
    assert "\n" not in message

    with caplog.at_level(logging.WARNING, logger="elas_megatron.training.checkpoint"):
        resumed = make_trainer("checkpoint.fallback_to_verified=true", resume=True)
    assert resumed.step == 4
    warnings = [r.getMessage() for r in caplog.records if "fallback_to_verified" in r.getMessage()]
    assert warnings[0] == (f"checkpoint.fallback_to_verified: skipping step_00000006: checkpoint refused: rank 0: "
                           f"checkpoint {step_dir} failed verification: {shard} does not match the sha256 in "
                           "manifest.json"), warnings
    assert warnings[1] == ("checkpoint.fallback_to_verified: resuming from step_00000004 instead of step_00000006, "
                           "which failed verification (see above)")
    after = {}
    while not resumed.should_stop():
        loss, _ = resumed.train_step()
        after[resumed.step] = loss
    assert after == {s: losses[s] for s in (5, 6, 7, 8)}  # bit for bit


def test_when_no_checkpoint_verifies_every_one_is_listed(make_trainer):
    first = make_trainer()
    for _ in range(2):
        first.train_step()
        first.save()
    for step_dir in first.ckpt.complete_steps():
        _flip(step_dir)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* passes verification \(2 tried: step_00000002: "
                                              r".* \| step_00000001: .*\); start without --resume"):
        make_trainer("checkpoint.fallback_to_verified=true", resume=True)
