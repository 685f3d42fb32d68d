"""Fixtures of the data tests: generated C4-format shards and the shipped demo tokenizer."""
from __future__ import annotations

from pathlib import Path

import pytest
from c4_testdata import DEMO_TOKENIZER, generate_docs, write_shard


@pytest.fixture(scope="session")
def demo_tokenizer():
    from elas_megatron.data.tokenizer import load_tokenizer

    return load_tokenizer(DEMO_TOKENIZER)


@pytest.fixture
def c4_dir(tmp_path: Path) -> Path:
    """Three small C4-format train shards (60 documents each) under tmp_path/c4/en."""
    for k in range(3):
        write_shard(tmp_path / "c4" / "en" / f"c4-train.{k:05d}-of-00003.json.gz", generate_docs(60, seed=k))
    return tmp_path / "c4" / "en"
