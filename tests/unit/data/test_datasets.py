"""build_datasets: Megatron GPTDatasets with the right items, splits, blends, checks and a safe cache."""
from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from c4_testdata import REPO, generate_docs, write_shard

from elas_megatron.config.schema import DataConfig
from elas_megatron.data.datasets import build_datasets
from elas_megatron.data.indexed import CorruptDatasetError, ShardWriter
from elas_megatron.prep.pipeline import TokenizeOptions, tokenize_corpus
from elas_megatron.prep.sources import expand_inputs

SEQ = 32


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory, demo_tokenizer) -> list[str]:
    """Three tokenized shards of 150 documents each."""
    root = tmp_path_factory.mktemp("tokens")
    for k in range(3):
        write_shard(root / "in" / f"shard{k}.json.gz", generate_docs(150, seed=100 + k))
    summary = tokenize_corpus(expand_inputs([str(root / "in")]), f"{root}/out/", demo_tokenizer,
                              TokenizeOptions(workers=1, progress=False))
    return [o.prefix for o in summary.done]


def _cfg(prefixes, **kw) -> DataConfig:
    return DataConfig(tokenizer=str(REPO / "data/demo/tokenizer.model"), train_prefixes=list(prefixes), **kw)


def _build(cfg, cache, train_samples=200, valid_samples=20, vocab_size=4096, seed=1234):
    return build_datasets(cfg, seq_len=SEQ, seed=seed, train_samples=train_samples, valid_samples=valid_samples,
                          vocab_size=vocab_size, cache_dir=str(cache))


def test_items_are_megatron_dicts_of_seq_len(prefixes, tmp_path):
    train, valid = _build(_cfg(prefixes[:1]), tmp_path)
    assert type(train).__name__ == "GPTDataset" and len(train) >= 200 and len(valid) >= 20
    item = train[3]
    assert sorted(item) == ["labels", "loss_mask", "position_ids", "tokens"]
    assert all(v.shape == (SEQ,) for v in item.values())
    assert item["tokens"][1:].tolist() == item["labels"][:-1].tolist()
    assert item["position_ids"].tolist() == list(range(SEQ)) and bool((item["loss_mask"] == 1).all())
    assert int(item["tokens"].max()) < 4096


def test_split_gives_disjoint_document_ranges(prefixes, tmp_path):
    train, valid = _build(_cfg(prefixes[:1], split="90,10,0"), tmp_path)
    documents = 150
    assert train.indices.tolist() == list(range(135)) and valid.indices.tolist() == list(range(135, documents))
    assert set(np.unique(train.document_index)) <= set(range(135))
    assert set(np.unique(valid.document_index)) <= set(range(135, documents))
    # the same config and seed give the same samples; another seed shuffles differently
    again, _ = _build(_cfg(prefixes[:1], split="90,10,0"), tmp_path)
    assert train[5]["tokens"].tolist() == again[5]["tokens"].tolist()
    other, _ = _build(_cfg(prefixes[:1], split="90,10,0"), tmp_path, seed=7)
    assert [train[i]["tokens"][0] for i in range(20)] != [other[i]["tokens"][0] for i in range(20)]


def test_separate_validation_prefixes(prefixes, tmp_path):
    train, valid = _build(_cfg(prefixes[:2], valid_prefixes=[prefixes[2]], split="100,0,0"), tmp_path)
    assert type(train).__name__ == "BlendedDataset" and type(valid).__name__ == "GPTDataset"
    assert valid.dataset_path == prefixes[2] and valid.indices.tolist() == list(range(150))
    assert sorted(d.dataset_path for d in train.datasets) == sorted(prefixes[:2])
    assert all(d.indices.tolist() == list(range(150)) for d in train.datasets)  # no split carved out


def test_blend_follows_weights_and_draws_from_each_prefix(prefixes, tmp_path):
    train, _ = _build(_cfg(prefixes[:2], train_weights=[1.0, 3.0]), tmp_path, train_samples=4000)
    assert len(train) == 4000
    counts = Counter(train.dataset_index.tolist())
    assert abs(counts[0] / 4000 - 0.25) < 0.01 and abs(counts[1] / 4000 - 0.75) < 0.01
    for i in (0, 1, 2, 1234, 3999):
        source = train.datasets[train.dataset_index[i]]
        expected = source[train.dataset_sample_index[i]]["tokens"]
        assert train[i]["tokens"].tolist() == expected.tolist()
    assert {d.dataset_path for d in train.datasets} == set(prefixes[:2])


def test_blend_without_weights_is_proportional_to_size(prefixes, tmp_path):
    train, valid = _build(_cfg(prefixes), tmp_path, train_samples=300)
    assert type(train).__name__ == "BlendedDataset" and len(train) == 300
    sizes = [len(d) for d in train.datasets]
    counts = Counter(train.dataset_index.tolist())
    for k in range(3):
        assert abs(counts[k] / 300 - sizes[k] / sum(sizes)) < 0.02


def test_token_ids_beyond_the_vocabulary_are_refused(prefixes, tmp_path):
    with pytest.raises(ValueError, match=rf"{prefixes[0]}\.bin \(data\.train_prefixes\) holds token id (\d+) >= "
                                         r"vocab_size 1000"):
        _build(_cfg(prefixes[:1]), tmp_path, vocab_size=1000)
    # the sidecar's tokenizer vocabulary is checked too, even when the ids present happen to fit
    small = str(tmp_path / "small")
    with ShardWriter(small, vocab_size=4096, meta={"vocab_size": 4096, "tokenizer": "big.model"}) as w:
        w.add_documents(np.arange(500) % 50, np.full(10, 50))
        w.stats.max_token_id = 49
        w.commit()
    with pytest.raises(ValueError, match=r"small \(data\.train_prefixes\) was tokenized with a 4096-piece tokenizer "
                                         r"\(big\.model\) but vocab_size is 100"):
        _build(_cfg([small]), tmp_path, vocab_size=100)


def test_truncated_data_is_caught_at_open(prefixes, tmp_path):
    broken = tmp_path / "broken"
    for suffix in (".bin", ".idx", ".meta.json"):
        (tmp_path / f"broken{suffix}").write_bytes(Path(prefixes[0] + suffix).read_bytes())
    with open(f"{broken}.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CorruptDatasetError, match=r"broken\.bin: is 1000 bytes but .*broken\.idx describes"):
        _build(_cfg([str(broken)]), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nothere\.idx does not exist"):
        _build(_cfg([str(tmp_path / "nothere")]), tmp_path)


def test_split_without_validation_documents(prefixes, tmp_path):
    with pytest.raises(ValueError, match=r"data\.split='100,0,0' leaves no validation document"):
        _build(_cfg(prefixes[:1], split="100,0,0"), tmp_path)


def test_default_cache_dir_is_not_next_to_the_data(prefixes, tmp_path, monkeypatch):
    monkeypatch.setenv("ELAS_CACHE_DIR", str(tmp_path / "elas-cache"))
    build_datasets(_cfg(prefixes[:1]), seq_len=SEQ, seed=1, train_samples=10, valid_samples=2, vocab_size=4096,
                   cache_dir=None)
    assert any((tmp_path / "elas-cache" / "dataset_indices").glob("*-GPTDataset-train-shuffle_index.npy"))
    assert not os.path.exists(os.path.join(os.path.dirname(prefixes[0]), "cache"))


def test_torn_cache_files_are_rebuilt(prefixes, tmp_path):
    cache = tmp_path / "cache"
    train, _ = _build(_cfg(prefixes[:1]), cache)
    expected = [train[i]["tokens"].tolist() for i in range(5)]
    (victim,) = cache.glob("*-GPTDataset-train-sample_index.npy")
    with open(victim, "r+b") as f:  # a crash in the middle of numpy.save
        f.truncate(victim.stat().st_size // 2)
    train, _ = _build(_cfg(prefixes[:1]), cache)
    assert [train[i]["tokens"].tolist() for i in range(5)] == expected
    assert victim.stat().st_size > 0 and len(list(cache.glob("*-GPTDataset-train-*"))) == 4


def test_concurrent_builders_share_one_cache(prefixes, tmp_path):
    """Two builders racing on an empty cache (threads here: flock locks conflict across open files, even in one
    process) both get complete, identical indices."""
    results, errors = {}, []

    def run(name):
        try:
            train, valid = _build(_cfg(prefixes[:2], train_weights=[1, 1]), tmp_path / "cache", train_samples=500)
            results[name] = [train[i]["tokens"].tolist() for i in range(0, 500, 50)]
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results["a"] == results["b"]


def test_cache_build_waits_for_a_builder_holding_the_lock(prefixes, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    done = threading.Event()

    def run():
        _build(_cfg(prefixes[:1]), cache)
        done.set()

    with open(cache / ".build.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another job is building
        thread = threading.Thread(target=run)
        thread.start()
        assert not done.wait(1.0)
        assert not list(cache.glob("*.npy"))
    thread.join(60)
    assert done.is_set() and len(list(cache.glob("*-GPTDataset-*.npy"))) == 6  # train + valid indices


@pytest.mark.distributed
def test_torchrun_ranks_build_the_same_datasets(prefixes, tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import torch.distributed as dist
        from elas_megatron.config.schema import DataConfig
        from elas_megatron.data.datasets import build_datasets
        dist.init_process_group("gloo")
        cfg = DataConfig(tokenizer={str(REPO / "data/demo/tokenizer.model")!r}, train_prefixes={prefixes[:2]!r},
                         train_weights=[1.0, 2.0])
        train, valid = build_datasets(cfg, seq_len={SEQ}, seed=3, train_samples=300, valid_samples=16,
                                      vocab_size=4096, cache_dir={str(tmp_path / "cache")!r})
        got = (len(train), len(valid), train[17]["tokens"].tolist(), valid[3]["tokens"].tolist())
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, got)
        assert out[0] == out[1], out
        print("RANKS AGREE", dist.get_rank(), flush=True)
        dist.barrier()  # gloo aborts ("terminate called ...") when one rank tears down while the other still talks
        dist.destroy_process_group()
    """))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                             "127.0.0.1", "--master-port", str(port), str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)  # failure path only; 220 s beside two CPU hogs
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks: a hang must not outlive the test
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert stdout.count("RANKS AGREE") == 2
