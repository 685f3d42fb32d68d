"""tokenize_corpus: exact round trips, identical output in every parallel mode, resume, and bad input."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from c4_testdata import REPO, generate_docs, write_shard

from elas_megatron.data.indexed import check_indexed_dataset, is_complete, read_meta
from elas_megatron.prep import pipeline
from elas_megatron.prep.pipeline import TokenizeError, TokenizeOptions, output_prefix_for, tokenize_corpus
from elas_megatron.prep.sources import expand_inputs, iter_texts
from elas_megatron.prep.tokenizer_training import train_tokenizer


def _opts(**kw) -> TokenizeOptions:
    return TokenizeOptions(**{"workers": 1, "progress": False, **kw})


def _read_docs(prefix: str) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [np.array(dataset[i]) for i in range(len(dataset))]  # copies: the views die with its mmap


def _files(prefix: str) -> tuple[bytes, bytes]:
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


def test_output_names(c4_dir):
    (source, *_) = expand_inputs([str(c4_dir)])
    assert output_prefix_for("out/c4", source) == "out/c4_c4-train.00000-of-00003_text_document"
    assert output_prefix_for("out/tokens/", source) == "out/tokens/c4-train.00000-of-00003_text_document"


def test_round_trip_detokenizes_to_the_source_text(c4_dir, tmp_path, demo_tokenizer):
    sources = expand_inputs([str(c4_dir)])
    summary = tokenize_corpus(sources, f"{tmp_path}/tok/", demo_tokenizer, _opts(block_bytes=2048))
    assert len(summary.done) == 3 and summary.totals.documents == 180
    for source, outcome in zip(sources, summary.done, strict=True):
        texts = list(iter_texts([source]))
        docs = _read_docs(outcome.prefix)
        assert len(docs) == len(texts)
        for doc, text in zip(docs, texts, strict=True):
            assert doc[-1] == demo_tokenizer.eos_id and demo_tokenizer.eos_id not in doc[:-1]
            assert demo_tokenizer.decode(doc[:-1]) == text
        meta = read_meta(outcome.prefix)
        assert meta["tokenizer_sha256"] == demo_tokenizer.sha256 and meta["eos_id"] == demo_tokenizer.eos_id
        assert meta["documents"] == len(texts) and meta["max_token_id"] == max(int(d.max()) for d in docs)
    assert "documents 180" in summary.format() and "tokens/s" in summary.format()


def test_progress_without_a_terminal_is_a_log_line_per_tenth_in_the_common_style(c4_dir, tmp_path, demo_tokenizer,
                                                                                   caplog, monkeypatch):
    monkeypatch.setattr("elas_megatron.utils.progress.DELAY_S", 0.0)  # show it at once (normally after 10 s)
    caplog.set_level("INFO", logger="elas_megatron.utils.progress")
    tokenize_corpus(expand_inputs([str(c4_dir)]), f"{tmp_path}/tok/", demo_tokenizer,
                    _opts(block_bytes=2048, progress=True))
    lines = [r.getMessage() for r in caplog.records if r.name == "elas_megatron.utils.progress"]
    assert len(lines) >= 3, lines
    # e.g. "tokenize 30.7k/102k B (30%), elapsed 0:00:00, ETA 0:00:00, 9,114 docs/s, 2,310,112 tok/s, 8.02 MB/s text"
    assert all(line.startswith("tokenize ") and " B" in line and "docs/s, " in line and "MB/s text" in line
               for line in lines), lines
    assert "%), elapsed " in lines[0] and ", ETA " in lines[0]
    assert ", elapsed " in lines[-1] and "ETA" not in lines[-1]  # the closing line: the total time


def test_blocks_with_a_pool_write_the_same_bytes(c4_dir, tmp_path, demo_tokenizer):
    sources = expand_inputs([str(c4_dir)])
    one = tokenize_corpus(sources, f"{tmp_path}/one/", demo_tokenizer, _opts(block_bytes=4096))
    two = tokenize_corpus(sources, f"{tmp_path}/two/", demo_tokenizer,
                          _opts(workers=2, mode="blocks", block_bytes=4096))
    assert two.mode == "blocks" and two.workers == min(2, pipeline.usable_cores())
    for a, b in zip(one.done, two.done, strict=True):
        assert _files(a.prefix) == _files(b.prefix)


def test_workers_are_at_most_the_usable_cores(monkeypatch):
    monkeypatch.setattr(pipeline, "usable_cores", lambda: 2)
    assert [TokenizeOptions(workers=n).resolved_workers() for n in (0, 1, 2, 64)] == [2, 1, 2, 2]


def test_shards_mode_writes_the_same_bytes(c4_dir, tmp_path, demo_tokenizer):
    sources = expand_inputs([str(c4_dir)])
    one = tokenize_corpus(sources, f"{tmp_path}/one/", demo_tokenizer, _opts())
    many = tokenize_corpus(sources, f"{tmp_path}/many/", demo_tokenizer, _opts(workers=2, mode="shards"))
    assert many.mode == "shards"
    for a, b in zip(one.done, sorted(many.done, key=lambda o: o.prefix), strict=True):
        assert _files(a.prefix) == _files(b.prefix)


def test_resume_skips_complete_and_redoes_half_written(c4_dir, tmp_path, demo_tokenizer):
    sources = expand_inputs([str(c4_dir)])
    out = f"{tmp_path}/tok/"
    first = tokenize_corpus(sources, out, demo_tokenizer, _opts())
    done0, done1, done2 = (o.prefix for o in first.done)
    reference = {p: _files(p) for p in (done0, done1, done2)}
    stat0 = os.stat(done0 + ".bin")
    # Shard 1: killed mid-write -- only .partial files. Shard 2: killed between the renames -- a final .bin and
    # sidecar but no .idx yet. Neither may count as complete.
    for suffix in (".bin", ".idx", ".meta.json"):
        os.replace(done1 + suffix, done1 + ".partial" + suffix)
    with open(done1 + ".partial.bin", "r+b") as f:
        f.truncate(100)
    os.unlink(done2 + ".idx")
    with open(done2 + ".bin", "r+b") as f:
        f.truncate(50)
    assert is_complete(done0) and not is_complete(done1) and not is_complete(done2)

    second = tokenize_corpus(sources, out, demo_tokenizer, _opts())
    assert [o.prefix for o in second.skipped] == [done0]
    assert [o.prefix for o in second.done] == [done1, done2]
    assert os.stat(done0 + ".bin").st_mtime_ns == stat0.st_mtime_ns  # untouched
    for prefix, files in reference.items():
        assert _files(prefix) == files
    assert not any(".partial" in name for name in os.listdir(tmp_path / "tok"))
    third = tokenize_corpus(sources, out, demo_tokenizer, _opts(overwrite=True))
    assert len(third.done) == 3


def test_hard_kill_then_rerun_completes(tmp_path, demo_tokenizer):
    """A real SIGKILL in the middle of shard 2 (after its first block) -> rerun redoes only shards 2 and 3."""
    for k in range(3):
        write_shard(tmp_path / "in" / f"s{k}.json.gz", generate_docs(80, seed=k))
    script = textwrap.dedent(f"""
        import os, signal
        from elas_megatron.data import indexed
        from elas_megatron.prep.pipeline import TokenizeOptions, tokenize_corpus
        from elas_megatron.prep.sources import expand_inputs
        from elas_megatron.data.tokenizer import load_tokenizer

        add = indexed.ShardWriter.add_documents
        def add_then_die(self, tokens, lengths):
            add(self, tokens, lengths)
            if self.prefix.endswith("s1_text_document"):
                self._data.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        indexed.ShardWriter.add_documents = add_then_die
        tokenize_corpus(expand_inputs([{str(tmp_path / "in")!r}]), {f"{tmp_path}/out/"!r},
                        load_tokenizer({str(REPO / "data/demo/tokenizer.model")!r}),
                        TokenizeOptions(workers=1, progress=False, block_bytes=2048))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = sorted(os.listdir(tmp_path / "out"))
    assert "s0_text_document.idx" in left and "s1_text_document.partial.bin" in left
    assert not any(name.startswith(("s1_text_document.idx", "s2")) for name in left)
    assert os.path.getsize(tmp_path / "out" / "s1_text_document.partial.bin") > 0

    summary = tokenize_corpus(expand_inputs([str(tmp_path / "in")]), f"{tmp_path}/out/", demo_tokenizer,
                              _opts())
    assert [o.source.name for o in summary.skipped] == ["s0"]
    assert [o.source.name for o in summary.done] == ["s1", "s2"]
    for k in range(3):
        prefix = str(tmp_path / "out" / f"s{k}_text_document")
        assert [demo_tokenizer.decode(d[:-1]) for d in _read_docs(prefix)] == generate_docs(80, seed=k)


def test_bad_shard_stops_and_keeps_finished_ones(tmp_path, demo_tokenizer):
    write_shard(tmp_path / "in" / "a.json.gz", generate_docs(20, 1))
    bad = write_shard(tmp_path / "in" / "b.json.gz", generate_docs(20, 2), extra_lines={9: "{oops"})
    write_shard(tmp_path / "in" / "c.json.gz", generate_docs(20, 3))
    out = f"{tmp_path}/out/"
    with pytest.raises(TokenizeError, match=r"b\.json\.gz:10: not valid JSON") as err:
        tokenize_corpus(expand_inputs([str(tmp_path / "in")]), out, demo_tokenizer, _opts())
    summary = err.value.summary
    assert [o.source.name for o in summary.done] == ["a"] and [o.source.name for o in summary.failed] == ["b"]
    assert "FAILED" in summary.format() and f"{bad}:10" in summary.format()
    assert sorted(os.listdir(tmp_path / "out")) == ["a_text_document.bin", "a_text_document.idx",
                                                    "a_text_document.meta.json"]
    # skip-and-count mode gets through, and says what it skipped
    summary = tokenize_corpus(expand_inputs([str(tmp_path / "in")]), out, demo_tokenizer, _opts(bad_lines="skip"))
    assert [o.source.name for o in summary.skipped] == ["a"] and len(summary.done) == 2
    assert summary.totals.skipped_lines == 1 and "b.json.gz:10: not valid JSON" in summary.format()
    assert read_meta(out + "b_text_document")["skipped_lines"] == 1
    assert check_indexed_dataset(out + "b_text_document").documents == 20


def test_bad_gzip_fails_in_a_pool_too(tmp_path, demo_tokenizer):
    write_shard(tmp_path / "in" / "a.json.gz", generate_docs(200, 1))
    bad = write_shard(tmp_path / "in" / "b.json.gz", generate_docs(200, 2))
    bad.write_bytes(bad.read_bytes()[:-2000])
    with pytest.raises(TokenizeError, match=r"b\.json\.gz:\d+: unreadable gzip data, the file is truncated"):
        tokenize_corpus(expand_inputs([str(tmp_path / "in")]), f"{tmp_path}/out/", demo_tokenizer,
                        _opts(workers=2, mode="blocks", block_bytes=4096))
    assert sorted(os.listdir(tmp_path / "out")) == ["a_text_document.bin", "a_text_document.idx",
                                                    "a_text_document.meta.json"]


def test_missing_text_field_stop_mode_through_the_pipeline(tmp_path, demo_tokenizer):
    write_shard(tmp_path / "in.jsonl", generate_docs(5), extra_lines={2: '{"body": "x"}'})
    with pytest.raises(TokenizeError, match=r"in\.jsonl:3: no 'text' field.*--bad-lines skip"):
        tokenize_corpus(expand_inputs([str(tmp_path / "in.jsonl")]), f"{tmp_path}/o/", demo_tokenizer, _opts())


def test_shard_without_documents_is_an_error(tmp_path, demo_tokenizer):
    (tmp_path / "empty.jsonl").write_text('\n{"text": ""}\n\n')
    with pytest.raises(TokenizeError, match=r"empty\.jsonl: holds no documents"):
        tokenize_corpus(expand_inputs([str(tmp_path / "empty.jsonl")]), f"{tmp_path}/o/", demo_tokenizer,
                        _opts())


def test_resume_with_another_tokenizer_is_refused(c4_dir, tmp_path, demo_tokenizer):
    from elas_megatron.data.tokenizer import load_tokenizer

    sources = expand_inputs([str(c4_dir)])
    tokenize_corpus(sources, f"{tmp_path}/tok/", demo_tokenizer, _opts())
    other = load_tokenizer(train_tokenizer(generate_docs(200), str(tmp_path / "other"), vocab_size=400,
                                           num_threads=1))
    with pytest.raises(ValueError, match=r"was tokenized with another tokenizer .*vocab 4096.*--overwrite"):
        tokenize_corpus(sources, f"{tmp_path}/tok/", other, _opts())
    summary = tokenize_corpus(sources, f"{tmp_path}/tok/", other, _opts(overwrite=True))
    assert all(read_meta(o.prefix)["vocab_size"] == 400 for o in summary.done)
