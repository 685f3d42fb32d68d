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


C4_7B = [str(REPO / f) for f in ("configs/c4.yaml", "configs/model/7b.yaml", "configs/variant/elas.yaml",
                                 "configs/layout/tp4-pp2.yaml")]


def test_elas_train_plans_without_data_for_a_given_world_size(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert train_main([*C4_7B, "--dry-run", "--world-size", "32", "--no-data-check"]) == 0
    out = capsys.readouterr().out
    assert "on 32 GPU(s): OK" in out and "world 32 = dp 4 x tp 4 x pp 2" in out
    assert "vocab 32000 (model.vocab_size)" in out and "estimate for GPU bf16" in out
    assert train_main([*C4_7B, "--dry-run", "--world-size", "32", "--no-data-check", "--vocab-size", "32768"]) == 0
    assert "vocab 32768 (--vocab-size)" in capsys.readouterr().out


def test_an_unknown_vocabulary_without_data_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    assert train_main([*C4_1B, "model.vocab_size=null", "--dry-run", "--world-size", "8", "--no-data-check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the vocabulary size is unknown" in err[0] and "--vocab-size" in err[0]


def test_planning_flags_need_dry_run(capsys):
    with pytest.raises(SystemExit) as exc:
        train_main([DEMO, "--no-data-check"])
    assert exc.value.code == 2 and "--no-data-check is for planning: add --dry-run" in capsys.readouterr().err


def test_the_estimate_states_the_device_and_dtype_it_assumes(capsys):
    assert dryrun.main([DEMO, *DATA, "train.device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "on 1 CPU(s): OK" in out and "estimate for CPU fp32 (train.device=cpu, train.dtype=auto)" in out
    assert dryrun.main([DEMO, *DATA]) == 0
    assert "estimate for GPU bf16 (train.device=auto, train.dtype=auto: a GPU run" in capsys.readouterr().out


def test_memory_warning_suggests_only_what_the_layout_lacks(capsys):
    assert dryrun.main([*C4_7B, "--world-size", "32", "--no-data-check", "--gpu-memory-gib", "1"]) == 0
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING")]
    assert len(warning) == 1 and "zero_stage" not in warning[0] and "parallel.recompute=full" in warning[0]


def test_print_config_prints_every_key(capsys):
    import yaml

    from elas_megatron.config.loader import config_to_dict

    assert train_main([DEMO, "train.steps=7", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == config_to_dict(load_config(DEMO, ["train.steps=7"]))
    assert printed["train"]["steps"] == 7 and "zero_stage" in printed["parallel"]
    assert train_main([DEMO, "model.num_heads=3", "--print-config"]) == 2
    with pytest.raises(SystemExit):
        train_main(["--help"])
    assert "--print-config" in capsys.readouterr().out


def _demo_data_with_sidecar_vocab(tmp_path, vocab: int) -> list[str]:
    import json
    import shutil

    src = REPO / "data/demo/tokens/demo_text_document"
    prefix = tmp_path / "other_text_document"
    for ext in (".bin", ".idx"):
        shutil.copy(str(src) + ext, str(prefix) + ext)
    meta = json.loads(Path(str(src) + ".meta.json").read_text())
    meta.update(vocab_size=vocab, tokenizer="data/other/tokenizer.model")
    Path(str(prefix) + ".meta.json").write_text(json.dumps(meta))
    return [f"data.tokenizer={REPO / 'data/demo/tokenizer.model'}", f"data.train_prefixes=[{prefix}]"]


def test_data_of_another_vocabulary_is_refused_at_dry_run_and_at_start(tmp_path, capsys):
    from elas_megatron.data import datasets

    data = _demo_data_with_sidecar_vocab(tmp_path, 5000)
    assert dryrun.main([DEMO, *data]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "records a 5000-piece tokenizer (data/other/tokenizer.model) but data.tokenizer=" in err[0]
    assert "has 4096 pieces; re-tokenize the data with data.tokenizer" in err[0]
    cfg = load_config(DEMO, data)
    infos = datasets.check_prefixes(cfg.data.train_prefixes, vocab_size=8192, what="data.train_prefixes")
    with pytest.raises(ValueError, match=r"records a 5000-piece tokenizer .* has 4096 pieces"):
        datasets._eod_id(cfg.data, infos)
    ok = _demo_data_with_sidecar_vocab(tmp_path, 4096)
    assert dryrun.main([DEMO, *ok]) == 0
