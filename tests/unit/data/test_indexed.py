"""Indexed datasets on disk: Megatron reads what we write, broken files are caught, merge equals Megatron's."""
from __future__ import annotations

import os

import numpy as np
import pytest

from elas_megatron.data.indexed import (
    CorruptDatasetError,
    ShardWriter,
    check_indexed_dataset,
    is_complete,
    max_token_id,
    merge_datasets,
    read_meta,
    token_dtype,
)


def _write(prefix, docs: list[list[int]], vocab_size: int = 1000, meta: dict | None = None) -> str:
    with ShardWriter(str(prefix), vocab_size=vocab_size, meta=meta or {"tokenizer_sha256": "abc"}) as writer:
        tokens = np.array([t for d in docs for t in d], dtype=np.int64)
        writer.add_documents(tokens, np.array([len(d) for d in docs]))
        writer.stats.documents = len(docs)
        writer.stats.max_token_id = int(tokens.max())
        writer.commit()
    return str(prefix)


def _docs(n: int, seed: int, high: int = 1000) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=int(rng.integers(1, 50))).tolist() for _ in range(n)]


@pytest.mark.parametrize("vocab_size", [2, 4096, 32000, 65499, 65500, 65536, 128256])
def test_token_dtype_is_megatrons_rule(vocab_size):
    from megatron.core.datasets.indexed_dataset import DType

    assert token_dtype(vocab_size) == DType.optimal_dtype(vocab_size)


@pytest.mark.parametrize("vocab_size", [1000, 100_000])
def test_writer_bytes_equal_megatrons_builder(tmp_path, vocab_size):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = _docs(40, 4, high=vocab_size)
    prefix = _write(tmp_path / "ours", docs, vocab_size=vocab_size)
    reference = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=token_dtype(vocab_size))
    for doc in docs:
        reference.add_document(np.array(doc), [len(doc)])
    reference.finalize(str(tmp_path / "ref.idx"))
    for suffix in (".bin", ".idx"):
        assert open(prefix + suffix, "rb").read() == open(tmp_path / f"ref{suffix}", "rb").read()


def test_written_dataset_reads_back_through_megatron(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = _docs(25, 0)
    prefix = _write(tmp_path / "out" / "a_text_document", docs, meta={"tokenizer_sha256": "abc", "vocab_size": 1000})
    dataset = IndexedDataset(prefix)
    assert len(dataset) == 25 and dataset.index.dtype == np.uint16
    assert [dataset[i].tolist() for i in range(25)] == docs
    info = check_indexed_dataset(prefix)
    assert (info.documents, info.tokens) == (25, sum(map(len, docs)))
    assert read_meta(prefix)["vocab_size"] == 1000 and read_meta(prefix)["bin_bytes"] == info.bin_bytes
    assert max_token_id(info) == max(max(d) for d in docs)
    assert is_complete(prefix)
    assert sorted(os.listdir(tmp_path / "out")) == ["a_text_document.bin", "a_text_document.idx",
                                                    "a_text_document.meta.json"]  # no partials, no lock


def test_uncommitted_writer_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "x")
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(prefix, vocab_size=100, meta={}) as writer:
        writer.add_documents(np.arange(10), np.array([4, 6]))
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_truncated_bin_is_caught_with_sizes(tmp_path):
    prefix = _write(tmp_path / "t", _docs(20, 1))
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(size - 6)
    with pytest.raises(CorruptDatasetError, match=rf"t\.bin: is {size - 6} bytes but .*t\.idx describes {size} bytes: "
                                                  r"the data file is truncated"):
        check_indexed_dataset(prefix)
    assert not is_complete(prefix)


def test_truncated_idx_and_bad_header(tmp_path):
    prefix = _write(tmp_path / "t", _docs(20, 2))
    data = open(prefix + ".idx", "rb").read()
    with open(prefix + ".idx", "wb") as f:
        f.write(data[:-5])
    with pytest.raises(CorruptDatasetError, match=r"t\.idx: index is \d+ bytes but its header describes \d+"):
        check_indexed_dataset(prefix)
    with open(prefix + ".idx", "wb") as f:
        f.write(b"GARBAGE!" + data[8:])
    with pytest.raises(CorruptDatasetError, match="not a Megatron index file"):
        check_indexed_dataset(prefix)


def test_missing_files_hint_at_prefix_mistakes(tmp_path):
    prefix = _write(tmp_path / "t", _docs(3, 3))
    with pytest.raises(FileNotFoundError, match=r"a prefix is the path without \.bin/\.idx: use .*/t\)"):
        check_indexed_dataset(prefix + ".bin")
    os.rename(prefix + ".idx", prefix + ".partial.idx")
    with pytest.raises(FileNotFoundError, match=r"t\.idx does not exist \(only an unfinished \.partial file"):
        check_indexed_dataset(prefix)


def test_merge_equals_megatrons_builder(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    parts = [_write(tmp_path / f"p{i}", _docs(10 + i, 10 + i)) for i in range(3)]
    merged = merge_datasets(parts, str(tmp_path / "merged" / "all"))
    reference = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for part in parts:
        reference.add_index(part)
    reference.finalize(str(tmp_path / "ref.idx"))
    for suffix in (".bin", ".idx"):
        assert open(merged.prefix + suffix, "rb").read() == open(tmp_path / f"ref{suffix}", "rb").read()
    assert len(IndexedDataset(merged.prefix)) == 33
    meta = read_meta(merged.prefix)
    assert meta["documents"] == 33 and meta["merged_from"] == ["../p0", "../p1", "../p2"]
    assert meta["tokenizer_sha256"] == "abc"


def test_merge_refuses_mixed_inputs(tmp_path):
    a = _write(tmp_path / "a", _docs(3, 0), meta={"tokenizer_sha256": "one"})
    b = _write(tmp_path / "b", _docs(3, 1), meta={"tokenizer_sha256": "two"})
    c = _write(tmp_path / "c", _docs(3, 2), vocab_size=70000)
    with pytest.raises(ValueError, match="different tokenizers"):
        merge_datasets([a, b], str(tmp_path / "m"))
    with pytest.raises(ValueError, match=r"different token dtypes \['int32', 'uint16'\]"):
        merge_datasets([a, c], str(tmp_path / "m"))
    with pytest.raises(ValueError, match="is also an input"):
        merge_datasets([a], a)
    assert not os.path.exists(tmp_path / "m.bin")


def test_max_token_id_scans_without_sidecar(tmp_path):
    prefix = _write(tmp_path / "s", [[1, 2, 3], [999, 4]])
    os.unlink(prefix + ".meta.json")
    info = check_indexed_dataset(prefix)
    assert info.meta is None and max_token_id(info, chunk_tokens=2) == 999
