"""The dry run: validation against the world size, data checks, the report, and `elas-train --dry-run`."""
from __future__ import annotations

from pathlib import Path

import pytest

from elas_megatron.cli import dryrun
from elas_megatron.cli.train import main as train_main
from elas_megatron.config import load_config
from elas_megatron.training.memory import estimate_memory

REPO = Path(__file__).resolve().parents[3]
DEMO = str(REPO / "configs/demo.yaml")
DATA = [f"data.tokenizer={REPO / 'data/demo/tokenizer.model'}",
        f"data.train_prefixes=[{REPO / 'data/demo/tokens/demo_text_document'}]"]
C4_1B = [str(REPO / f) for f in ("configs/c4.yaml", "configs/model/1b.yaml", "configs/variant/elas.yaml",
                                 "configs/layout/dp8.yaml")]


def test_demo_report(capsys):
    assert dryrun.main([DEMO, *DATA, "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "world 2 = dp 2 x tp 1 x pp 1" in out
    assert "global 16 sequences = micro 8 x dp 2 x 1 micro-batches; 128 tokens each; 2,048 tokens/step" in out
    assert "300 steps = 614K tokens" in out
    assert "vocab 4096" in out and "memory/GPU" in out and "activations by recompute: none" in out


def test_memory_lines_are_the_estimate(capsys):
    assert dryrun.main([*C4_1B, "--world-size", "8", "--no-data-check", "--vocab-size", "32000"]) == 0
    out = capsys.readouterr().out
    peak = estimate_memory(load_config(C4_1B, world_size=8), world_size=8, vocab_size=32000).peak
    assert f"total       {peak.total / 2**30:7.2f} GiB" in out
    assert f"optimizer   {peak.optimizer / 2**30:7.2f} GiB  (1.5 B/param)" in out   # 12 bytes / dp 8


@pytest.mark.parametrize("args, fragment", [
    (["--world-size", "3", "parallel.tp=2"], "world size 3 is not divisible by parallel.tp * parallel.pp = 2"),
    (["--world-size", "4"], "train.global_batch=16 is not divisible by train.micro_batch * data-parallel size = 8 * 4"),
    (["--nnodes", "2", "--nproc-per-node", "2"], "data-parallel size = 8 * 4"),
    (["model.num_heads=3"], "model.hidden_size=128 is invalid: expected a multiple of model.num_heads=3"),
])
def test_layout_and_config_errors_are_one_line_and_exit_2(args, fragment, capsys):
    assert dryrun.main([DEMO, *DATA, *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and captured.out == ""


def test_missing_data_is_reported_per_file(capsys):
    assert dryrun.main([*C4_1B, "--world-size", "8"]) == 2
    err = capsys.readouterr().err
    assert "data.tokenizer='data/c4/t5-spiece.model' does not exist" in err
    assert "data.train_prefixes: data/c4/tokens/c4-train.bin/.idx does not exist" in err
    assert "data.valid_prefixes" in err


def test_quiet_prints_nothing_when_valid(capsys):
    assert dryrun.main([DEMO, *DATA, "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_elas_train_dry_run_uses_world_size_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    assert train_main([DEMO, *DATA, "--dry-run"]) == 0
    assert "world 2 = dp 2" in capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert train_main([DEMO, *DATA, "--dry-run"]) == 2


@pytest.mark.parametrize("size, layout, world", [("60m", "dp8", 8), ("350m", "dp8", 8), ("3b", "tp2", 8),
                                                 ("7b", "tp4-pp2", 32)])
@pytest.mark.parametrize("variant", ["dense", "cola", "elas"])
def test_every_shipped_composition_passes_on_its_layout(size, layout, world, variant):
    files = [str(REPO / f) for f in ("configs/c4.yaml", f"configs/model/{size}.yaml",
                                     f"configs/variant/{variant}.yaml", f"configs/layout/{layout}.yaml")]
    assert dryrun.dry_run(files, world_size=world, vocab_size=32000, check_files=False, quiet=True) == 0
