"""Train/validation datasets for the trainer: Megatron-Core ``GPTDataset``s built from ``DataConfig``.

Everything goes through Megatron's ``BlendedMegatronDatasetBuilder`` + ``GPTDatasetConfig``, so sampling,
document packing, blending and the on-disk index cache are exactly Megatron's. Around it we add what a run needs
to fail early and never corrupt a shared cache:

* every prefix is checked before Megatron opens it (truncated or inconsistent ``.bin``/``.idx``), and refused
  when its largest token id does not fit the model's vocabulary;
* the index cache always lives in ``cache_dir`` (Megatron's default is a ``cache/`` folder inside the data
  directory, which may be read-only or shared by unrelated runs);
* cache writes are serialised across jobs: Megatron lets global rank 0 build a missing index and makes the other
  ranks wait at a barrier, but its ``numpy.save`` writes are not atomic, so a second job (or a crashed first one)
  could see half-written files. Rank 0 -- or the single process -- holds an exclusive lock on ``cache_dir``
  while building, and first deletes index files a crash left truncated;
* a single process without ``torch.distributed`` can blend datasets: Megatron 0.16's ``BlendedDataset`` asks for
  the process rank when its cache misses, which raises outside a process group, so there the blend's small
  index is rebuilt in memory instead of cached.

Megatron's C++ index helpers are checked (and compiled if missing) by :func:`ensure_helpers`.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from elas_megatron.config.schema import DataConfig
from elas_megatron.data.helpers import ensure_helpers
from elas_megatron.data.indexed import DatasetInfo, check_indexed_dataset, max_token_id
from elas_megatron.data.vocab import vocabulary_mismatch

logger = logging.getLogger(__name__)

__all__ = ["build_datasets", "check_prefixes", "default_cache_dir", "locate_token"]


def default_cache_dir() -> str:
    """``$ELAS_CACHE_DIR/dataset_indices``, else ``~/.cache/elas-megatron/dataset_indices``."""
    root = os.environ.get("ELAS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "elas-megatron")
    return os.path.join(root, "dataset_indices")


class _EodTokenizer:
    """The part of a Megatron tokenizer GPTDataset uses: vocabulary size, EOD id and cache identifiers."""

    def __init__(self, vocab_size: int, eod: int) -> None:
        self.vocab_size = vocab_size
        self.eod = eod
        self.eos = eod
        # NOTE: part of every cache key (MegatronDataset.unique_description); no pad id -> Megatron uses -1.
        self.unique_identifiers = OrderedDict(**{"class": type(self).__name__, "vocab_size": vocab_size, "eod": eod})


def _dist_rank() -> int | None:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


def check_prefixes(prefixes: Sequence[str], *, vocab_size: int, what: str) -> list[DatasetInfo]:
    """Check every prefix for completeness and token ids ``< vocab_size``.

    Raises:
        FileNotFoundError / CorruptDatasetError: a missing, truncated or inconsistent file.
        ValueError: a token id that does not fit the vocabulary (names the file and both numbers).
    """
    infos = []
    for prefix in prefixes:
        info = check_indexed_dataset(prefix)
        largest = max_token_id(info)
        if largest >= vocab_size:
            raise ValueError(f"{prefix}.bin ({what}) holds token id {largest} >= vocab_size {vocab_size}: it was "
                             f"tokenized with a larger vocabulary than the model's; re-tokenize it with data.tokenizer "
                             f"or set model.vocab_size >= {largest + 1}")
        meta_vocab = (info.meta or {}).get("vocab_size")
        if isinstance(meta_vocab, int) and meta_vocab > vocab_size:
            raise ValueError(f"{prefix} ({what}) was tokenized with a {meta_vocab}-piece tokenizer "
                             f"({(info.meta or {}).get('tokenizer')}) but vocab_size is {vocab_size}; re-tokenize it "
                             f"with data.tokenizer or set model.vocab_size >= {meta_vocab}")
        infos.append(info)
    return infos


def locate_token(dataset, sample: int, position: int) -> str | None:
    """Where token ``position`` of sample ``sample`` of a Megatron ``GPTDataset`` / ``BlendedDataset`` comes from:
    ``"FILE.bin, document D token T"``; None for other datasets. Follows the dataset's own indices (blend, shuffle,
    sample and document index) as its ``__getitem__`` does; only called once a bad token was found."""
    if hasattr(dataset, "dataset_index") and hasattr(dataset, "datasets"):  # BlendedDataset
        dataset[sample]  # loads its indices if they are still lazy
        part = int(dataset.dataset_index[sample])
        return locate_token(dataset.datasets[part], int(dataset.dataset_sample_index[sample]), position)
    if not all(hasattr(dataset, a) for a in ("shuffle_index", "sample_index", "document_index", "dataset")):
        return None
    if dataset.shuffle_index is None:
        dataset[sample]  # loads the lazily memory-mapped indices
    extra = int(getattr(dataset.config, "add_extra_token_to_sequence", True))
    j = int(dataset.shuffle_index[sample])
    beg, beg_offset = (int(v) for v in dataset.sample_index[j])
    end, end_offset = (int(v) for v in dataset.sample_index[j + 1])
    lengths = dataset.dataset.sequence_lengths
    left = position
    for i in range(beg, end + 1):
        document = int(dataset.document_index[i])
        offset = beg_offset if i == beg else 0
        count = (end_offset + extra - offset) if i == end else int(lengths[document]) - offset
        if left < count:
            return f"{dataset.dataset.path_prefix}.bin, document {document} token {offset + left}"
        left -= count
    return None


def _eod_id(data_cfg: DataConfig, infos: Sequence[DatasetInfo]) -> int:
    """EOS id from the configured tokenizer (checked against the data's sidecars), else from the sidecars.

    Raises:
        ValueError: a sidecar records another vocabulary size than the tokenizer's.
    """
    meta_eos = {(i.meta or {}).get("eos_id") for i in infos} - {None}
    meta_sha = {(i.meta or {}).get("tokenizer_sha256") for i in infos} - {None}
    if os.path.isfile(data_cfg.tokenizer):
        from elas_megatron.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(data_cfg.tokenizer)
        for info in infos:  # another vocabulary: different pieces behind the same ids (docs/data.md)
            what = "data.train_prefixes" if info.prefix in data_cfg.train_prefixes else "data.valid_prefixes"
            problem = vocabulary_mismatch(info.prefix, what, info.meta, data_cfg.tokenizer, tokenizer.vocab_size)
            if problem:
                raise ValueError(problem)
        if meta_sha and tokenizer.sha256 not in meta_sha:
            odd = next(i for i in infos if (i.meta or {}).get("tokenizer_sha256") not in (None, tokenizer.sha256))
            logger.warning("%s was tokenized with %s, not with data.tokenizer=%s (different model files); the "
                           "model will learn that tokenizer's ids", odd.prefix, (odd.meta or {}).get("tokenizer"),
                           data_cfg.tokenizer)
        return tokenizer.eos_id
    if len(meta_eos) == 1:
        return int(next(iter(meta_eos)))
    logger.warning("data.tokenizer=%s not found and the data has no single EOS id in its metadata; using 0 "
                   "(only matters for eod masking, which is off)", data_cfg.tokenizer)
    return 0


def _sweep_torn_cache(cache_dir: str) -> None:
    """Delete index files a crashed build left truncated (Megatron would treat them as a cache hit)."""
    for path in Path(cache_dir).glob("*.npy"):
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    continue  # numpy.save writes 1.0 (2.0 for huge headers); leave anything else alone
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
                expected = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            ok = path.stat().st_size == expected
        except (OSError, ValueError, EOFError):
            ok = False
        if not ok:
            group = path.name.rsplit("-", 1)[0]  # {hash}-{Class}-{split}
            logger.warning("removing truncated dataset index cache %s (and its siblings); it is rebuilt", path)
            for sibling in Path(cache_dir).glob(f"{group}-*"):
                with contextlib.suppress(FileNotFoundError):
                    sibling.unlink()


@contextlib.contextmanager
def _cache_lock(cache_dir: str, rank: int | None) -> Iterator[None]:
    # Only the process that may write (rank 0, or a lone process) locks; the other ranks of a job read after
    # Megatron's barrier, i.e. after rank 0 finished writing, so they need no lock (and must not take one:
    # they would wait for rank 0 while rank 0 waits for them in the barrier).
    if rank not in (None, 0):
        yield
        return
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, ".build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _sweep_torn_cache(cache_dir)
        before = set(os.listdir(cache_dir))
        try:
            yield
        except BaseException:  # an error or a stop signal (utils/interrupts.py) mid-build: drop what it wrote
            for name in set(os.listdir(cache_dir)) - before:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(os.path.join(cache_dir, name))
            raise


def _builder_class():
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    class _Builder(BlendedMegatronDatasetBuilder):
        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            if cls is BlendedDataset and _dist_rank() is None:
                # BlendedDataset calls torch.distributed.get_rank() on a cache miss, which raises without a
                # process group: build its (small) index in memory instead.
                *head, config = args
                config = copy.copy(config)
                config.path_to_cache = None
                args = (*head, config)
            return BlendedMegatronDatasetBuilder.build_generic_dataset(cls, is_built_on_rank, synchronize_ranks,
                                                                       *args)

    return _Builder


def _valid_documents(info: DatasetInfo, split: str) -> int:
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    bookends = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[1]
    if bookends is None:
        return 0
    return int(round(bookends[1] * info.sequences)) - int(round(bookends[0] * info.sequences))


def build_datasets(data_cfg: DataConfig, *, seq_len: int, seed: int, train_samples: int, valid_samples: int,
                   vocab_size: int, cache_dir: str | None):
    """Build the train and validation datasets of a run.

    Args:
        data_cfg: prefixes, blend weights, split and tokenizer (``DataConfig``).
        seq_len: tokens per sample (items have ``seq_len`` tokens and ``seq_len`` shifted labels).
        seed: shuffling seed (Megatron's ``random_seed``).
        train_samples: samples the train dataset must provide (epochs repeat as needed).
        valid_samples: samples the validation dataset must provide.
        vocab_size: the model's vocabulary; data with a token id ``>= vocab_size`` is refused.
        cache_dir: where Megatron's index cache goes (None = :func:`default_cache_dir`). In a multi-node job it
            must be on a filesystem all nodes share (rank 0 builds, the others read).

    Returns:
        ``(train, valid)``: Megatron ``GPTDataset``s (``BlendedDataset`` for several prefixes) whose items are dicts
        of ``tokens``, ``labels``, ``loss_mask``, ``position_ids``, each of length ``seq_len``.

    Raises:
        FileNotFoundError / CorruptDatasetError / ValueError: a missing or broken prefix, a vocabulary mismatch,
        or a split that leaves no validation documents.
    """
    ensure_helpers()
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    train_prefixes = list(data_cfg.train_prefixes)
    valid_prefixes = list(data_cfg.valid_prefixes) if data_cfg.valid_prefixes else None
    infos = check_prefixes(train_prefixes, vocab_size=vocab_size, what="data.train_prefixes")
    if valid_prefixes:
        infos += check_prefixes(valid_prefixes, vocab_size=vocab_size, what="data.valid_prefixes")
    elif valid_samples > 0:
        for info in infos:
            if _valid_documents(info, data_cfg.split) < 1:
                raise ValueError(f"data.split={data_cfg.split!r} leaves no validation document in {info.prefix} "
                                 f"({info.documents} documents); give the valid part more weight or set "
                                 "data.valid_prefixes")
    weights = list(data_cfg.train_weights) if data_cfg.train_weights else None
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    common = dict(random_seed=seed, sequence_length=seq_len, path_to_cache=cache_dir,
                  tokenizer=_EodTokenizer(vocab_size, _eod_id(data_cfg, infos)), reset_position_ids=False,
                  reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False, mmap_bin_files=True)
    if valid_prefixes:
        config = GPTDatasetConfig(blend_per_split=[(train_prefixes, weights), (valid_prefixes, None), None],
                                  **common)
    else:
        config = GPTDatasetConfig(blend=(train_prefixes, weights), split=data_cfg.split, **common)
    sizes = [train_samples, valid_samples, 0]
    rank = _dist_rank()
    with _cache_lock(cache_dir, rank):
        train, valid, _ = _builder_class()(GPTDataset, sizes, lambda: True, config).build()
    if train is None or len(train) == 0:
        raise ValueError(f"no training samples from {train_prefixes} with seq_len={seq_len}; the data holds fewer "
                         f"than seq_len + 1 tokens -- add data or lower train.seq_len")
    if valid is None or (valid_samples > 0 and len(valid) == 0):
        raise ValueError(f"no validation samples (data.split={data_cfg.split!r}, data.valid_prefixes="
                         f"{valid_prefixes}); the valid part holds fewer than seq_len + 1 = {seq_len + 1} tokens -- "
                         "give it more weight in data.split or set data.valid_prefixes")
    logger.info("datasets: %d train samples, %d valid samples of %d tokens (cache %s)", len(train), len(valid),
                seq_len, cache_dir)
    return train, valid
