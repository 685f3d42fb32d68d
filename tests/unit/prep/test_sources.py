"""Finding input shards and reading them: blocks keep line numbers, every bad input names file and line."""
from __future__ import annotations

import gzip
import json
import sys

import pytest
from c4_testdata import generate_docs, write_shard

from elas_megatron.prep.sources import InputFormatError, expand_inputs, iter_blocks, iter_texts, parse_block


def _texts(source, **kw):
    return [t for b in iter_blocks(source, **{k: v for k, v in kw.items() if k == "block_bytes"})
            for t in parse_block(b, **{k: v for k, v in kw.items() if k != "block_bytes"}).texts]


def test_expand_directory_glob_and_file(tmp_path):
    docs = generate_docs(5)
    a = write_shard(tmp_path / "en" / "c4-train.00000-of-00002.json.gz", docs)
    b = write_shard(tmp_path / "en" / "nested" / "c4-train.00001-of-00002.json.gz", docs)
    c = write_shard(tmp_path / "other.jsonl", docs)
    (tmp_path / "en" / "shard_text_document.meta.json").write_text("{}")  # our own sidecars are not inputs
    (tmp_path / "en" / "notes.txt").write_text("ignored")
    names = [s.name for s in expand_inputs([str(tmp_path / "en")])]
    assert names == ["c4-train.00000-of-00002", "c4-train.00001-of-00002"]
    assert [s.path for s in expand_inputs([str(tmp_path / "en" / "*.json.gz")])] == [str(a)]
    both = expand_inputs([str(a), str(a), str(b), str(c)])  # duplicates collapse
    assert [s.name for s in both] == ["c4-train.00000-of-00002", "c4-train.00001-of-00002", "other"]


def test_expand_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_inputs([str(tmp_path / "missing-*.json.gz")])
    with pytest.raises(FileNotFoundError, match="does not exist|matches no file"):
        expand_inputs([str(tmp_path / "missing.json.gz")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        expand_inputs([str(tmp_path / "empty")])
    write_shard(tmp_path / "train" / "c4.json.gz", ["x"])
    write_shard(tmp_path / "valid" / "c4.json.gz", ["y"])
    with pytest.raises(InputFormatError, match="both map to the output name 'c4'"):
        expand_inputs([str(tmp_path / "train" / "c4.json.gz"), str(tmp_path / "valid" / "c4.json.gz")])


@pytest.mark.parametrize("name", ["s.json.gz", "s.jsonl", "s.json"])
def test_small_blocks_keep_documents_and_line_numbers(tmp_path, name):
    docs = generate_docs(40, seed=3)
    path = write_shard(tmp_path / name, docs)
    (source,) = expand_inputs([str(path)])
    blocks = list(iter_blocks(source, block_bytes=700))  # many blocks, documents longer than a block too
    assert len(blocks) > 5
    assert [t for b in blocks for t in parse_block(b).texts] == docs
    line = 1
    for block in blocks:
        assert block.first_line == line
        line += block.data.count(b"\n")
    assert sum(b.input_bytes for b in blocks) == path.stat().st_size


def test_non_json_line_stops_with_file_and_line(tmp_path):
    path = write_shard(tmp_path / "bad.json.gz", generate_docs(10), extra_lines={6: '{"text": "unterminated'})
    (source,) = expand_inputs([str(path)])
    with pytest.raises(InputFormatError, match=r"bad\.json\.gz:7: not valid JSON.*--bad-lines skip"):
        _texts(source)


def test_non_json_line_skip_and_count(tmp_path):
    docs = generate_docs(10)
    path = write_shard(tmp_path / "bad.json.gz", docs, extra_lines={2: "not json at all", 6: "[1, 2]"})
    (source,) = expand_inputs([str(path)])
    results = [parse_block(b, bad_lines="skip") for b in iter_blocks(source)]
    assert [t for r in results for t in r.texts] == docs
    assert sum(r.skipped for r in results) == 2
    examples = [e for r in results for e in r.skip_examples]
    assert any("bad.json.gz:3: not valid JSON" in e for e in examples)
    assert any("bad.json.gz:7: a JSON list, not an object" in e for e in examples)


def test_missing_text_field_stop_and_skip(tmp_path):
    docs = generate_docs(8)
    extra = {3: json.dumps({"content": "x", "url": "u"}), 5: json.dumps({"text": None})}
    path = write_shard(tmp_path / "c4-validation.00000-of-00008.json.gz", docs, extra_lines=extra)
    (source,) = expand_inputs([str(path)])
    with pytest.raises(InputFormatError, match=r"00008\.json\.gz:4: no 'text' field \(keys: \['content', 'url'\]\)"):
        _texts(source)
    results = [parse_block(b, bad_lines="skip") for b in iter_blocks(source)]
    assert [t for r in results for t in r.texts] == docs
    assert sum(r.skipped for r in results) == 2
    assert any(":6: 'text' is NoneType, not a string" in e for r in results for e in r.skip_examples)
    # --text-key reads another field
    assert _texts(source, text_key="content", bad_lines="skip") == ["x"]


def test_blank_lines_ignored_empty_texts_counted(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('\n{"text": "a"}\n\n{"text": ""}\n   \n{"text": "b"}')  # no final newline either
    (source,) = expand_inputs([str(path)])
    results = [parse_block(b) for b in iter_blocks(source)]
    assert [t for r in results for t in r.texts] == ["a", "b"]
    assert sum(r.empty for r in results) == 1 and sum(r.lines for r in results) == 3


def test_truncated_gzip_names_file_and_line(tmp_path):
    path = write_shard(tmp_path / "c4-train.00007-of-01024.json.gz", generate_docs(300))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    (source,) = expand_inputs([str(path)])
    with pytest.raises(InputFormatError, match=r"c4-train\.00007-of-01024\.json\.gz:\d+: unreadable gzip data, the "
                                               r"file is truncated.*re-download"):
        _texts(source, block_bytes=4096)


def test_gzip_crc_mismatch_names_file(tmp_path):
    path = write_shard(tmp_path / "c.json.gz", generate_docs(300))
    data = bytearray(path.read_bytes())
    data[-8:-4] = bytes(4)  # the CRC-32 trailer: the data inflates fine but does not check out
    path.write_bytes(bytes(data))
    (source,) = expand_inputs([str(path)])
    with pytest.raises(InputFormatError, match=r"c\.json\.gz:\d+: unreadable gzip data, the file is corrupt.*CRC"):
        _texts(source, block_bytes=4096)


def test_corrupt_gzip_stream_is_never_accepted(tmp_path):
    path = write_shard(tmp_path / "c.json.gz", generate_docs(300))
    data = bytearray(path.read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = bytes(64)  # zero a stretch of the deflate stream
    path.write_bytes(bytes(data))
    (source,) = expand_inputs([str(path)])
    # Garbled text may still parse as lines; either a bad line or the gzip error stops it -- even when skipping.
    for policy in ("stop", "skip"):
        with pytest.raises(InputFormatError, match=r"c\.json\.gz:\d+: (unreadable gzip data|not valid JSON)"):
            _texts(source, block_bytes=4096, bad_lines=policy)


def test_gz_name_without_gzip_data(tmp_path):
    path = tmp_path / "plain.json.gz"
    path.write_text('{"text": "not compressed"}\n')
    (source,) = expand_inputs([str(path)])
    with pytest.raises(InputFormatError, match=r"plain\.json\.gz:1: unreadable gzip data.*not gzip"):
        _texts(source)


def test_iter_texts_over_sources(tmp_path):
    a = write_shard(tmp_path / "a.json.gz", ["one", "two"])
    b = write_shard(tmp_path / "b.jsonl", ["three"])
    assert list(iter_texts(expand_inputs([str(a), str(b)]))) == ["one", "two", "three"]


def test_gzip_concatenated_members(tmp_path):
    path = tmp_path / "multi.json.gz"
    with open(path, "wb") as f:
        for text in ("first", "second"):
            f.write(gzip.compress((json.dumps({"text": text}) + "\n").encode()))
    assert list(iter_texts(expand_inputs([str(path)]))) == ["first", "second"]


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = generate_docs(30, seed=5)
    datasets.Dataset.from_dict({"text": docs, "url": ["u"] * 30}).save_to_disk(str(tmp_path / "single"))
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:20]}),
                               "validation": datasets.Dataset.from_dict({"text": docs[20:]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    (single,) = expand_inputs([str(tmp_path / "single")])
    assert single.kind == "hf" and single.name == "single"
    assert list(iter_texts([single])) == docs
    splits = expand_inputs([str(tmp_path / "dict")])
    assert [s.name for s in splits] == ["dict-train", "dict-validation"]
    assert list(iter_texts(splits)) == docs[:20] + docs[20:]
    with pytest.raises(InputFormatError, match="has no 'body' column"):
        list(iter_texts([single], text_key="body"))


def test_hf_input_without_datasets_installed(tmp_path, monkeypatch):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    (saved / "dataset_info.json").write_text("{}")
    (source,) = expand_inputs([str(saved)])  # recognising the layout needs no `datasets`
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"needs the `datasets` package: pip install 'elas-megatron\[data\]'"):
        list(iter_blocks(source))
