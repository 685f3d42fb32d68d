"""elas-prep end to end: tokenize -> merge -> inspect, train-tokenizer, exit codes and one-line errors."""
from __future__ import annotations

import os

import pytest
from c4_testdata import REPO, generate_docs, write_shard

from elas_megatron.cli.prep import main
from elas_megatron.data.indexed import check_indexed_dataset, read_meta

TOKENIZER = str(REPO / "data" / "demo" / "tokenizer.model")


def test_tokenize_merge_inspect(c4_dir, tmp_path, capsys):
    out = f"{tmp_path}/tok/shards/"
    assert main(["tokenize", "--input", f"{c4_dir}/*.json.gz", "--tokenizer", TOKENIZER, "--output-prefix", out,
                 "--workers", "1", "--no-progress"]) == 0
    report = capsys.readouterr().out
    assert "tokenized 3 shard(s), skipped 0 already complete, 0 failed" in report
    assert "documents 180" in report and "tokens/s" in report and "MB/s of text" in report
    # a second run resumes: everything is complete already
    assert main(["tokenize", "--input", str(c4_dir), "--tokenizer", TOKENIZER, "--output-prefix", out,
                 "--workers", "2", "--no-progress"]) == 0
    assert "tokenized 0 shard(s), skipped 3 already complete" in capsys.readouterr().out

    merged = str(tmp_path / "tok" / "c4-train")
    assert main(["merge", "--input", f"{out}*.idx", "--output-prefix", merged]) == 0
    info = check_indexed_dataset(merged)
    assert info.documents == 180 and read_meta(merged)["tokenizer_sha256"]
    assert main(["inspect", merged, "--tokenizer", TOKENIZER, "--show", "1"]) == 0
    shown = capsys.readouterr().out
    assert "180 documents" in shown and "--- document 0" in shown


def test_merge_remove_inputs(c4_dir, tmp_path):
    out = f"{tmp_path}/s/"
    assert main(["tokenize", "--input", str(c4_dir), "--tokenizer", TOKENIZER, "--output-prefix", out,
                 "--workers", "1", "--no-progress"]) == 0
    assert main(["merge", "--input", out, "--output-prefix", str(tmp_path / "all"), "--remove-inputs"]) == 0
    assert os.listdir(tmp_path / "s") == []
    assert check_indexed_dataset(str(tmp_path / "all")).documents == 180


def test_bad_line_exits_1_with_file_and_line(tmp_path, capsys):
    write_shard(tmp_path / "c4-validation.00000-of-00008.json.gz", generate_docs(6),
                extra_lines={4: '{"url": "no text here"}'})
    code = main(["tokenize", "--input", str(tmp_path / "c4-validation.00000-of-00008.json.gz"), "--tokenizer",
                 TOKENIZER, "--output-prefix", f"{tmp_path}/o/", "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert "elas-prep: error: " in err and "c4-validation.00000-of-00008.json.gz:5: no 'text' field" in err
    assert "--bad-lines skip" in err
    assert main(["tokenize", "--input", str(tmp_path), "--tokenizer", TOKENIZER, "--output-prefix",
                 f"{tmp_path}/o/", "--workers", "1", "--no-progress", "--bad-lines", "skip"]) == 0
    assert "skipped 1 bad line(s)" in capsys.readouterr().out


def test_missing_tokenizer_and_input(tmp_path, capsys):
    assert main(["tokenize", "--input", str(tmp_path / "x.json.gz"), "--tokenizer", str(tmp_path / "none.model"),
                 "--output-prefix", str(tmp_path / "o")]) == 1
    assert "none.model" in capsys.readouterr().err
    assert main(["tokenize", "--input", str(tmp_path / "nothing-*.json.gz"), "--tokenizer", TOKENIZER,
                 "--output-prefix", str(tmp_path / "o")]) == 1
    assert "matches no file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["tokenize", "--tokenizer", TOKENIZER])
    assert usage.value.code == 2


def test_config_vocab_mismatch_is_refused(c4_dir, tmp_path, capsys):
    config = tmp_path / "small.yaml"
    config.write_text("model:\n  vocab_size: 1024\n")
    code = main(["tokenize", "--input", str(c4_dir), "--tokenizer", TOKENIZER, "--output-prefix", f"{tmp_path}/o/",
                 "--config", str(config)])
    assert code == 1
    assert "has 4096 pieces but model.vocab_size=1024" in capsys.readouterr().err
    other = tmp_path / "other.yaml"
    other.write_text(f"data:\n  tokenizer: {tmp_path / 'x.model'}\n")
    # the config's own tokenizer is the default --tokenizer (missing here -> a clear error)
    assert main(["tokenize", "--input", str(c4_dir), "--output-prefix", f"{tmp_path}/o/", "--config", str(other)]) == 1
    assert "x.model" in capsys.readouterr().err


def test_train_tokenizer_cli(c4_dir, tmp_path, capsys):
    prefix = str(tmp_path / "tok" / "c4-sp")
    assert main(["train-tokenizer", "--input", str(c4_dir), "--model-prefix", prefix, "--vocab-size", "400",
                 "--sample-docs", "100", "--threads", "1"]) == 0
    assert "400 pieces, unk 0, bos 1, eos 2" in capsys.readouterr().out
    assert os.path.isfile(prefix + ".model")
    assert main(["train-tokenizer", "--input", str(c4_dir), "--model-prefix", prefix, "--vocab-size", "90000",
                 "--sample-docs", "50", "--threads", "1"]) == 1
    assert "too large for this corpus sample" in capsys.readouterr().err
