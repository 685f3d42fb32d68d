"""The shipped demo data: C4's format, reproducible tokens, and enough of them for the demo run."""
from __future__ import annotations

import gzip
import json
import platform
import re
import subprocess
import sys

import pytest
from c4_testdata import REPO

from elas_megatron.config.schema import DataConfig
from elas_megatron.data.indexed import check_indexed_dataset, read_meta
from elas_megatron.prep.pipeline import TokenizeOptions, tokenize_corpus
from elas_megatron.prep.sources import expand_inputs

DEMO = REPO / "data" / "demo"
PREFIX = DEMO / "tokens" / "demo_text_document"


def test_corpus_is_in_c4_format():
    with gzip.open(DEMO / "demo.json.gz", "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert len(records) > 400
    for record in records:
        assert list(record) == ["text", "timestamp", "url"]
        assert record["text"].strip() and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["timestamp"])


def test_shipped_tokens_equal_a_fresh_tokenization(tmp_path, demo_tokenizer):
    summary = tokenize_corpus(expand_inputs([str(DEMO / "demo.json.gz")]), f"{tmp_path}/", demo_tokenizer,
                              TokenizeOptions(workers=1, progress=False))
    (fresh,) = summary.done
    assert fresh.prefix == f"{tmp_path}/demo_text_document"
    for suffix in (".bin", ".idx"):
        assert (PREFIX.parent / f"demo_text_document{suffix}").read_bytes() == open(fresh.prefix + suffix, "rb").read()
    assert read_meta(str(PREFIX))["tokenizer_sha256"] == demo_tokenizer.sha256


def test_demo_is_big_enough_and_small_enough():
    info = check_indexed_dataset(str(PREFIX))
    assert info.tokens >= 300_000
    shipped = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert shipped < 3_000_000


def test_default_config_builds_the_demo_run(tmp_path, monkeypatch):
    from elas_megatron.data.datasets import build_datasets

    monkeypatch.chdir(REPO)  # the defaults are relative paths
    cfg = DataConfig()
    train, valid = build_datasets(cfg, seq_len=128, seed=1234, train_samples=300 * 16, valid_samples=8 * 8,
                                  vocab_size=4096, cache_dir=str(tmp_path))
    assert len(train) >= 4800 and len(valid) >= 64
    assert len({tuple(valid[i]["tokens"].tolist()) for i in range(64)}) == 64  # 64 distinct validation samples


def test_readme_names_source_and_license():
    text = (DEMO / "README.md").read_text()
    assert "Python Software Foundation License" in text and "pydoc_data" in text


def test_corpus_regenerates_identically():
    text = (DEMO / "README.md").read_text()
    version = re.search(r"CPython (\d+\.\d+\.\d+)", text).group(1)
    if platform.python_implementation() != "CPython" or platform.python_version() != version:
        pytest.skip(f"the corpus was generated with CPython {version} (docstrings differ between releases)")
    # A fresh interpreter: libraries imported by other tests (torch) monkeypatch stdlib functions such as
    # inspect.getfile, which changes which docstrings a module owns.
    code = "import json; from elas_megatron.prep.demo import demo_documents; print(json.dumps(demo_documents()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                          timeout=300)
    with gzip.open(DEMO / "demo.json.gz", "rt", encoding="utf-8") as f:
        shipped = [json.loads(line) for line in f]
    assert json.loads(proc.stdout) == shipped
