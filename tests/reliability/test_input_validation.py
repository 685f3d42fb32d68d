"""Input validation that the other suites do not already cover: the config fields the schema used to let through,
a checkpoint of another model (every mismatch listed), and a checkpoint damaged after it was written.

Covered elsewhere: unknown keys / wrong types / literals (tests/unit/config, incl. hypothesis properties), parallel
layout vs world size before any model is built (tests/unit/training/test_bad_layouts.py), dataset vocabulary and
truncated / corrupt ``.bin``/``.idx`` at open (tests/unit/data/test_datasets.py, test_indexed.py)."""
from __future__ import annotations

import pytest

from elas_megatron.config.loader import load_config
from elas_megatron.config.schema import ConfigError
from elas_megatron.training.checkpoint import CheckpointError


@pytest.mark.parametrize("overrides, message", [
    (["optim.lr=.inf"], "optim.lr=inf is invalid: expected a finite number"),
    (["model.init_std=.nan"], "model.init_std=nan is invalid: expected a finite number"),
    (["train.loss_spike_factor=.inf"], "train.loss_spike_factor=inf is invalid: expected a finite number"),
    (["model.rope_base=0"], "model.rope_base=0.0 is invalid: expected > 0"),
    (["optim.eps=0"], "optim.eps=0.0 is invalid: expected > 0"),
    (["train.seed=-1"], "train.seed=-1 is invalid: expected in [0, 2**32)"),
    (["data.split=0,0,0"], "data.split='0,0,0' is invalid: expected three comma-separated non-negative numbers"),
    (["parallel.first_stage_layers=2"], "parallel.first_stage_layers=2 is invalid: expected null when parallel.pp=1"),
    (["parallel.pp=2", "parallel.last_stage_layers=0"], "parallel.last_stage_layers=0 is invalid: expected a positive"),
    (["parallel.pp=2", "parallel.first_stage_layers=8", "model.num_layers=8"],
     "model.num_layers=8 is invalid: expected the first/last stage layers (8/None) plus a multiple of the 1 other"),
    (["train.max_skipped_steps=-1"], "train.max_skipped_steps=-1 is invalid: expected >= 0"),
    (["train.loss_spike_factor=0.5"], "train.loss_spike_factor=0.5 is invalid: expected 0 (off) or a factor > 1"),
    (["train.density_warn=0.6"], "train.density_warn=0.6 is invalid: expected in [0, 0.5]"),
    (["train.density_check_every=-1"], "train.density_check_every=-1 is invalid: expected >= 0"),
    (["parallel.optimizer=deepspeed", "parallel.zero_stage=1", "checkpoint.async_save=true"],
     ("checkpoint.async_save=true is not supported with parallel.optimizer=deepspeed (DeepSpeed writes its ZeRO "
      "optimizer partitions itself, synchronously); set checkpoint.async_save=false or use parallel.optimizer=megatron")),
])
def test_config_values_that_used_to_pass(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides, world_size=2)
    assert message in str(info.value)


def test_uneven_pipeline_stages_that_fit_are_accepted():
    load_config(None, ["parallel.pp=4", "parallel.first_stage_layers=2", "parallel.last_stage_layers=2",
                       "model.num_layers=8"], world_size=4)


def test_a_checkpoint_of_another_model_lists_every_mismatch(make_trainer):
    first = make_trainer("model.variant=cola")
    first.train_step()
    first.save()
    with pytest.raises(CheckpointError) as info:
        make_trainer("model.variant=elas", "model.hidden_size=64", "model.vocab_size=256", resume=True)
    message = str(info.value)
    assert "was saved from a different model" in message
    for part in ("model.variant: checkpoint 'cola' vs config 'elas'", "model.hidden_size: checkpoint 32 vs config 64",
                 "vocab_size: checkpoint 128 vs this run 256"):
        assert part in message


def test_a_damaged_checkpoint_is_refused_with_the_way_out(make_trainer):
    first = make_trainer()
    first.train_step()
    path = first.save()
    shard = max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} failed verification: {shard} has .* bytes, the "
                                              r"manifest says .*resume from an older checkpoint: write its step_\* "
                                              r"name into"):
        make_trainer(resume=True)
    (path / "manifest.json").unlink()  # a checkpoint of an older version: unverified, megatron's error is caught
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} could not be loaded \(failed on rank\(s\) \[0\], "
                                              r"e\.g\. rank 0: EOFError: \); if it was damaged after it was written, "
                                              r"resume from an older one: write its step_\* name into"):
        make_trainer(resume=True)
