"""A token id outside the vocabulary in the data (a ``.bin`` changed after tokenizing; its sidecar, which the open
check trusts, still matches its size) stops training with one line naming the file, the document and token, the
sample and the step, before the optimizer step -- the bad ids never reach the model (clamped; the flag rides on
the numerical guard's all-reduce), so never an ``IndexError`` in the embedding (CPU) or a device-side assert
(CUDA)."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from reliability_runs import REPO, launch

from elas_megatron.config.loader import load_config
from elas_megatron.data.datasets import locate_token
from elas_megatron.data.loader import StepBatches
from elas_megatron.utils.errors import DataError

DEMO = REPO / "data/demo/tokens/demo_text_document"
VOCAB = 4096  # the demo tokenizer's
SHAPES = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.ffn_hidden_size=64",
          "model.rank=8", "train.seq_len=32", "train.global_batch=4", "train.micro_batch=2", "train.steps=4",
          "train.eval_iters=1", "checkpoint.save_final=false", "log.level=warning"]


@pytest.fixture
def demo_copy(tmp_path):
    """A copy of the demo dataset (``.bin``, ``.idx``, sidecar) that a test may damage."""
    prefix = tmp_path / "data" / "demo"
    prefix.parent.mkdir()
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(f"{DEMO}{suffix}", f"{prefix}{suffix}")
    return prefix


def _overrides(tmp_path, prefix):
    return [*SHAPES, f"data.tokenizer={REPO / 'data/demo/tokenizer.model'}", f"data.train_prefixes=[{prefix}]",
            f"data.cache_dir={tmp_path / 'cache'}", f"train.run_dir={tmp_path / 'run'}"]


def _corrupt(dataset, sample: int, position: int, value: int) -> tuple[str, int, int]:
    """Write ``value`` over token ``position`` of ``sample`` in the ``.bin``; returns (file, document, token)."""
    place = locate_token(dataset, sample, position)
    file, document, token = re.fullmatch(r"(.*), document (\d+) token (\d+)", place).groups()
    pointer = int(dataset.dataset.index.sequence_pointers[int(document)])
    data = np.memmap(file, dtype=np.uint16, mode="r+")
    data[pointer // 2 + int(token)] = value
    data.flush()
    return file, int(document), int(token)


def test_an_out_of_range_token_stops_before_the_model_sees_it(tmp_path, demo_copy):
    from elas_megatron.parallel.setup import destroy_parallel
    from elas_megatron.training.trainer import Trainer

    cfg = load_config(None, _overrides(tmp_path, demo_copy), world_size=1)
    try:
        trainer = Trainer(cfg)
        trainer.train_step()  # step 1: clean
        # step 2 reads samples 4..7; sample 5 is the second row of the first micro-batch
        file, document, token = _corrupt(trainer.train_batches.dataset, 5, 9, VOCAB + 7)
        with pytest.raises(DataError) as info:
            trainer.train_step()
    finally:
        destroy_parallel()
    assert str(info.value) == (
        f"token id {VOCAB + 7} outside the vocabulary [0, {VOCAB}) at step 2: {file}, document {document} token "
        f"{token}, train sample 5; re-tokenize that file with `elas-prep tokenize` (or re-copy it): its tokens "
        "changed after its .meta.json was written")
    assert trainer.step == 1  # step 2 did not update anything


def test_negative_ids_and_labels_are_checked_too():
    class Items:
        def __init__(self, bad_key, value):
            self.bad_key, self.value = bad_key, value

        def __len__(self):
            return 8

        def __getitem__(self, i):
            item = {"tokens": np.arange(4), "labels": np.arange(1, 5), "loss_mask": np.ones(4, np.float32),
                    "position_ids": np.arange(4)}
            if i == 3:
                item[self.bad_key] = item[self.bad_key].copy()
                item[self.bad_key][2] = self.value
            return item

    import torch

    for key, value, position in (("tokens", -3, 2), ("labels", 100, 3)):
        batches = StepBatches(Items(key, value), global_batch=4, micro_batch=2, dp_rank=0, dp_size=1,
                              device=torch.device("cpu"), vocab_size=100)
        with pytest.raises(DataError, match=rf"^token id {value} outside the vocabulary \[0, 100\) at step 1: train "
                                            rf"sample 3 \(position {position}\); check the dataset's token ids$"):
            batches.host_batches(0)
        assert len(batches.host_batches(1)) == 2  # samples 4..7 are clean


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.distributed)])
def test_elas_train_prints_one_line_and_exits_2(tmp_path, demo_copy, nproc):
    """Sample 17 is read at step 3 by the only rank, or by rank 1 of 2 (rank 0 reads samples 16..19 of the step's
    16..23 on one rank; of two, rank 1 reads 20..23): with 2 ranks every rank prints the same line."""
    from elas_megatron.data.datasets import build_datasets
    from elas_megatron.config.schema import DataConfig

    # the same datasets (same arguments, same index cache) as the launched run's: corrupt its step 3's sample 9
    run_args = ["train.steps=4", "train.seq_len=64", "train.global_batch=8"]
    train, _ = build_datasets(DataConfig(tokenizer=str(REPO / "data/demo/tokenizer.model"),
                                         train_prefixes=[str(demo_copy)]),
                              seq_len=64, seed=1234, train_samples=4 * 8, valid_samples=4 * nproc, vocab_size=VOCAB,
                              cache_dir=str(tmp_path / "data_cache"))
    sample = 17 if nproc == 1 else 21
    file, document, token = _corrupt(train, sample, 0, 60000)
    result = launch(tmp_path / "run", *run_args, f"data.train_prefixes=[{demo_copy}]", "checkpoint.every=0",
                    "checkpoint.save_final=false", "train.eval_iters=1", nproc=nproc, timeout_s=600)
    lines = [line for line in result.stderr.splitlines() if line.startswith("elas-train:")]
    if nproc == 1:
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    else:  # torchrun's agent prints its own ChildFailedError traceback; no frame of the ranks' code is shown
        # (the rank that exits second may be SIGTERMed by the agent first, after printing its line)
        assert result.stderr.count("exitcode  : 2") >= 1, result.stderr[-3000:]
        assert "elas_megatron/" not in result.stderr, result.stderr[-3000:]
    rank = "" if nproc == 1 else "rank 1: "
    assert lines == nproc * [
        f"elas-train: error: {rank}token id 60000 outside the vocabulary [0, {VOCAB}) at step 3: {file}, document "
        f"{document} token {token}, train sample {sample}; re-tokenize that file with `elas-prep tokenize` (or "
        "re-copy it): its tokens changed after its .meta.json was written"], lines
