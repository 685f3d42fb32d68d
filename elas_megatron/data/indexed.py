"""Megatron indexed datasets (``.bin``/``.idx``) on disk: written atomically, checked before use, merged.

The files are byte for byte what Megatron-Core's ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder``
writes (tests compare both), so ``GPTDataset`` and ``BlendedMegatronDatasetBuilder`` read them unchanged; we write
them with numpy so that tokenizer workers need not import Megatron-Core and torch (seconds and ~300 MB each),
and so that merging streams instead of holding every document length in Python lists. Three more things are ours:

* **Atomic, resumable output.** A shard is written under ``{prefix}.partial.*`` names and renamed when complete:
  ``.bin`` first, then the ``.meta.json`` sidecar, then ``.idx`` last. A prefix counts as complete only when its
  ``.idx`` exists *and* describes exactly the bytes of its ``.bin``, so a run killed at any point is never mistaken
  for a finished one, and a re-run redoes only what is missing.
* **A sidecar** ``{prefix}.meta.json`` with what Megatron's format does not record: the tokenizer (path, SHA-256,
  vocabulary size, EOS id), the largest token id, and counts (documents, tokens, text bytes, skipped lines).
  It lets training refuse data made with another vocabulary without scanning the tokens.
* **Checks at open** (:func:`check_indexed_dataset`): header, sizes and offsets of ``.idx`` against ``.bin``, so a
  truncated copy fails with a message naming the file instead of a crash deep inside a data loader.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["CorruptDatasetError", "DatasetInfo", "ShardStats", "ShardWriter", "check_indexed_dataset",
           "is_complete", "read_meta", "merge_datasets", "remove_partials", "token_dtype", "META_SUFFIX"]

META_SUFFIX = ".meta.json"
PARTIAL = ".partial"
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                8: np.uint16}  # megatron.core.datasets.indexed_dataset.DType
_CODE_OF_DTYPE = {np.dtype(t): code for code, t in _DTYPE_CODES.items()}
_META_VERSION = 1


class CorruptDatasetError(ValueError):
    """A ``.bin``/``.idx`` pair is missing, truncated or inconsistent; the message names the file and the fix."""


def token_dtype(vocab_size: int) -> type[np.number]:
    """The token dtype Megatron's writer picks (``DType.optimal_dtype``): uint16 below 65500 ids, else int32.

    Restated rather than imported: importing Megatron-Core costs seconds in every tokenizer worker process.
    A test pins it to Megatron's rule.
    """
    return np.uint16 if vocab_size < 65500 else np.int32


@dataclass
class ShardStats:
    """Counts of one tokenized shard (also the body of its ``.meta.json``)."""
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    lines: int = 0
    skipped_lines: int = 0
    empty_documents: int = 0
    max_token_id: int = -1
    skip_examples: list[str] = field(default_factory=list)

    def add(self, other: ShardStats) -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.text_bytes += other.text_bytes
        self.lines += other.lines
        self.skipped_lines += other.skipped_lines
        self.empty_documents += other.empty_documents
        self.max_token_id = max(self.max_token_id, other.max_token_id)
        self.skip_examples.extend(other.skip_examples[: max(0, 5 - len(self.skip_examples))])


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`check_indexed_dataset` learnt about a prefix."""
    prefix: str
    dtype: type[np.number]
    sequences: int
    documents: int
    tokens: int
    bin_bytes: int
    meta: dict | None


def _paths(prefix: str, partial: bool = False) -> tuple[str, str, str]:
    base = prefix + PARTIAL if partial else prefix
    return base + ".bin", base + ".idx", base + META_SUFFIX


def read_meta(prefix: str) -> dict | None:
    """The ``.meta.json`` sidecar of ``prefix``, or None when absent (e.g. data made by another tool)."""
    path = prefix + META_SUFFIX
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        logger.warning("ignoring unreadable metadata %s (%s)", path, err)
        return None


def _read_index_header(idx_path: str) -> tuple[type[np.number], int, int]:
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:9] != _INDEX_HEADER:
        raise CorruptDatasetError(f"{idx_path}: not a Megatron index file (bad or missing MMIDIDX header, {size} "
                                  "bytes); re-create it with `elas-prep tokenize`")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[9:])
    if version != 1 or code not in _DTYPE_CODES:
        raise CorruptDatasetError(f"{idx_path}: unsupported index version {version} / dtype code {code}; "
                                  "re-create it with `elas-prep tokenize`")
    return _DTYPE_CODES[code], sequences, documents


def check_indexed_dataset(prefix: str) -> DatasetInfo:
    """Check that ``prefix.bin``/``prefix.idx`` form a complete, consistent Megatron indexed dataset.

    Reads the index header, its size, the first and last offsets and the document boundaries -- not the tokens --
    so it is cheap even for C4-sized files.

    Raises:
        FileNotFoundError: a file is missing.
        CorruptDatasetError: truncated or inconsistent files; the message names the file and both sizes.
    """
    bin_path, idx_path, _ = _paths(prefix)
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            hint = ""
            if prefix.endswith((".bin", ".idx")):
                hint = f" (a prefix is the path without .bin/.idx: use {prefix[:-4]})"
            elif os.path.isfile(prefix + PARTIAL + path[-4:]):
                hint = " (only an unfinished .partial file exists: re-run `elas-prep tokenize` to complete it)"
            raise FileNotFoundError(f"dataset file {path} does not exist{hint}; create it with `elas-prep "
                                    "tokenize` or fix the prefix in data.train_prefixes/valid_prefixes")
    dtype, sequences, documents = _read_index_header(idx_path)
    itemsize = np.dtype(dtype).itemsize
    idx_size = os.path.getsize(idx_path)
    expected_idx = _HEADER_BYTES + sequences * (4 + 8) + documents * 8
    if idx_size != expected_idx:
        raise CorruptDatasetError(f"{idx_path}: index is {idx_size} bytes but its header describes {expected_idx} "
                                  f"({sequences} sequences, {documents} document boundaries): the file is truncated "
                                  "or corrupt; re-run `elas-prep tokenize` (or re-copy it)")
    bin_size = os.path.getsize(bin_path)
    if sequences == 0 or documents < 2:
        raise CorruptDatasetError(f"{idx_path}: the dataset holds no documents; check the input of `elas-prep "
                                  "tokenize` (were all lines skipped or empty?)")
    index = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(index, dtype=np.int32, count=sequences, offset=_HEADER_BYTES)
    pointers = np.frombuffer(index, dtype=np.int64, count=sequences, offset=_HEADER_BYTES + 4 * sequences)
    doc_idx = np.frombuffer(index, dtype=np.int64, count=documents, offset=_HEADER_BYTES + 12 * sequences)
    expected_bin = int(pointers[-1]) + int(lengths[-1]) * itemsize
    first_doc, last_doc = int(doc_idx[0]), int(doc_idx[-1])
    first_ptr = int(pointers[0])
    del lengths, pointers, doc_idx, index
    if first_ptr != 0 or first_doc != 0 or last_doc != sequences:
        raise CorruptDatasetError(f"{idx_path}: inconsistent index (first offset {first_ptr}, document boundaries "
                                  f"{first_doc}..{last_doc} for {sequences} sequences); re-run `elas-prep tokenize`")
    if bin_size != expected_bin:
        raise CorruptDatasetError(f"{bin_path}: is {bin_size} bytes but {idx_path} describes {expected_bin} bytes: "
                                  f"the {'data file is truncated' if bin_size < expected_bin else 'files do not match'}"
                                  "; re-run `elas-prep tokenize` for this shard (or re-copy both files)")
    return DatasetInfo(prefix=prefix, dtype=dtype, sequences=sequences, documents=documents - 1,
                       tokens=bin_size // itemsize, bin_bytes=bin_size, meta=read_meta(prefix))


def max_token_id(info: DatasetInfo, chunk_tokens: int = 1 << 26) -> int:
    """Largest token id of a dataset: from its sidecar when that matches the ``.bin``, else by a scan."""
    meta = info.meta
    if meta and meta.get("bin_bytes") == info.bin_bytes and isinstance(meta.get("max_token_id"), int):
        return int(meta["max_token_id"])
    logger.info("scanning %s.bin for its largest token id (no matching %s sidecar)", info.prefix, META_SUFFIX)
    tokens = np.memmap(info.prefix + ".bin", mode="r", dtype=info.dtype)
    best = -1
    for start in range(0, tokens.shape[0], chunk_tokens):
        best = max(best, int(tokens[start:start + chunk_tokens].max()))
    return best


def is_complete(prefix: str) -> bool:
    """True when ``prefix`` is a finished, consistent dataset (its ``.idx`` is written last, on completion)."""
    bin_path, idx_path, meta_path = _paths(prefix)
    if not (os.path.isfile(idx_path) and os.path.isfile(bin_path) and os.path.isfile(meta_path)):
        return False
    try:
        check_indexed_dataset(prefix)
    except (CorruptDatasetError, FileNotFoundError) as err:
        logger.warning("%s looks complete but is not (%s); it will be rewritten", prefix, err)
        return False
    return True


def remove_partials(prefix: str) -> None:
    """Delete the ``.partial`` files an interrupted run left behind."""
    for path in _paths(prefix, partial=True):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def _exclusive(prefix: str) -> Iterator[None]:
    # Two runs writing one prefix would interleave bytes in the same .partial file; refuse the second.
    lock_path = prefix + PARTIAL + ".lock"
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another process is writing {prefix} (lock {lock_path} is held); wait for it or "
                               "use another --output-prefix") from None
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)


def _publish(prefix: str) -> None:
    """Flush the ``.partial`` files and rename them: ``.bin``, sidecar, then ``.idx`` -- the commit point."""
    partial, final = _paths(prefix, partial=True), _paths(prefix)
    for path in partial:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    with contextlib.suppress(FileNotFoundError):
        os.unlink(final[1])  # an old, complete .idx must not vouch for the new .bin while files are swapped
    for i in (0, 2, 1):
        os.replace(partial[i], final[i])


def _index_header(dtype: type[np.number], sequences: int, documents: int) -> bytes:
    return (_INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", _CODE_OF_DTYPE[np.dtype(dtype)])
            + struct.pack("<Q", sequences) + struct.pack("<Q", documents))


class ShardWriter:
    """Writes one indexed dataset under ``.partial`` names and publishes it atomically on :meth:`commit`.

    The bytes are those of Megatron's ``IndexedDatasetBuilder`` with one sequence per document (a test compares
    them), written with numpy instead: importing Megatron-Core pulls in torch, which costs every tokenizer worker
    seconds of start-up and ~300 MB of memory, and its builder keeps per-document Python lists.

    Use as a context manager: leaving the block without :meth:`commit` (an exception) deletes the ``.partial``
    files; a kill leaves them, and the next run removes them. Complete outputs are never touched before commit.
    """

    def __init__(self, prefix: str, *, vocab_size: int, meta: dict) -> None:
        self.prefix = prefix
        self.dtype = token_dtype(vocab_size)
        self.meta = dict(meta)
        self.stats = ShardStats()
        self._lock: contextlib.AbstractContextManager | None = None
        self._data = None
        self._lengths: list[np.ndarray] = []

    def __enter__(self) -> ShardWriter:
        os.makedirs(os.path.dirname(os.path.abspath(self.prefix)), exist_ok=True)
        self._lock = _exclusive(self.prefix)
        self._lock.__enter__()
        remove_partials(self.prefix)
        self._data = open(_paths(self.prefix, partial=True)[0], "wb")  # noqa: SIM115 (closed in commit/__exit__)
        return self

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one concatenated token array and their lengths (EOS included)."""
        assert self._data is not None, "use ShardWriter as a context manager"
        lengths = np.asarray(lengths, dtype=np.int32)
        assert int(lengths.sum()) == len(tokens), "lengths must add up to the token count"
        self._data.write(np.asarray(tokens, dtype=self.dtype).tobytes(order="C"))
        self._lengths.append(lengths)

    def commit(self) -> None:
        """Finish the index, write the sidecar and rename ``.bin`` -> sidecar -> ``.idx`` (the commit point)."""
        assert self._data is not None
        self._data.close()
        self._data = None
        bin_tmp, idx_tmp, meta_tmp = _paths(self.prefix, partial=True)
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(self.dtype).itemsize, out=pointers[1:])
        with open(idx_tmp, "wb") as f:
            f.write(_index_header(self.dtype, len(lengths), len(lengths) + 1))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes(order="C"))  # one sequence per document
        meta = {"format": "elas-megatron indexed dataset", "meta_version": _META_VERSION,
                **self.meta, **asdict(self.stats), "dtype": np.dtype(self.dtype).name,
                "bin_bytes": os.path.getsize(bin_tmp), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(meta_tmp, "w") as f:
            json.dump(meta, f, indent=1)
        _publish(self.prefix)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._data is not None:  # not committed: drop the half-written files (a kill leaves them .partial)
            self._data.close()
            self._data = None
            remove_partials(self.prefix)
        if self._lock is not None:
            self._lock.__exit__(exc_type, exc, tb)
            self._lock = None


def _index_arrays(info: DatasetInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Memory-mapped (lengths, pointers, document boundaries) of a checked dataset."""
    index = np.memmap(info.prefix + ".idx", mode="r", dtype=np.uint8)
    n, d = info.sequences, info.documents + 1
    return (np.frombuffer(index, dtype=np.int32, count=n, offset=_HEADER_BYTES),
            np.frombuffer(index, dtype=np.int64, count=n, offset=_HEADER_BYTES + 4 * n),
            np.frombuffer(index, dtype=np.int64, count=d, offset=_HEADER_BYTES + 12 * n))


def _write_merged_index(idx_path: str, infos: Sequence[DatasetInfo]) -> None:
    # The same bytes Megatron's IndexedDatasetBuilder.add_index + finalize produce (a test compares them), but
    # streamed one section and one input at a time: Megatron's builder holds every document length of the merge
    # in Python lists (~80 bytes per document, ~30 GB for all of C4) and computes offsets in a Python loop.
    sequences = sum(i.sequences for i in infos)
    documents = sum(i.documents for i in infos) + 1
    with open(idx_path, "wb") as f:
        f.write(_index_header(infos[0].dtype, sequences, documents))
        for info in infos:
            f.write(_index_arrays(info)[0].tobytes(order="C"))
        byte_offset = 0
        for info in infos:
            f.write((_index_arrays(info)[1] + np.int64(byte_offset)).tobytes(order="C"))
            byte_offset += info.bin_bytes
        f.write(np.zeros(1, dtype=np.int64).tobytes())
        sequence_offset = 0
        for info in infos:
            f.write((_index_arrays(info)[2][1:] + np.int64(sequence_offset)).tobytes(order="C"))
            sequence_offset += info.sequences


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> DatasetInfo:
    """Concatenate several indexed datasets into one, atomically (like a tokenized shard).

    The ``.bin`` files are concatenated and the ``.idx`` written section by section, so memory stays small even
    for all of C4. All inputs must be complete and share a token dtype and (when they have sidecars) a tokenizer.

    Raises:
        CorruptDatasetError / FileNotFoundError: an input is incomplete.
        ValueError: the inputs disagree on dtype or tokenizer, or the output is one of the inputs.
    """
    if not prefixes:
        raise ValueError("merge needs at least one input prefix")
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise ValueError(f"merge output {output_prefix} is also an input; choose another --output-prefix")
    infos = [check_indexed_dataset(p) for p in prefixes]
    dtypes = {np.dtype(i.dtype).name for i in infos}
    if len(dtypes) > 1:
        raise ValueError(f"cannot merge datasets with different token dtypes {sorted(dtypes)}: "
                         f"{[(i.prefix, np.dtype(i.dtype).name) for i in infos]}")
    by_tokenizer: dict[str, str] = {}
    for info in infos:
        sha = (info.meta or {}).get("tokenizer_sha256")
        if sha is not None:
            by_tokenizer.setdefault(sha, info.prefix)
    if len(by_tokenizer) > 1:
        first, second = list(by_tokenizer.values())[:2]
        raise ValueError(f"cannot merge datasets tokenized with different tokenizers ({first} and {second}); "
                         "re-tokenize them with one --tokenizer")
    first_meta = next((i.meta for i in infos if i.meta), None) or {}
    stats = ShardStats()
    for info in infos:
        m = info.meta or {}
        stats.add(ShardStats(documents=info.documents, tokens=info.tokens, text_bytes=m.get("text_bytes", 0),
                             lines=m.get("lines", 0), skipped_lines=m.get("skipped_lines", 0),
                             empty_documents=m.get("empty_documents", 0), max_token_id=max_token_id(info)))
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    with _exclusive(output_prefix):
        remove_partials(output_prefix)
        bin_tmp, idx_tmp, meta_tmp = _paths(output_prefix, partial=True)
        try:
            with open(bin_tmp, "wb") as out:
                for info in infos:
                    with open(info.prefix + ".bin", "rb") as f:
                        shutil.copyfileobj(f, out, 16 << 20)
            _write_merged_index(idx_tmp, infos)
            meta = {"format": "elas-megatron indexed dataset", "meta_version": _META_VERSION,
                    **{k: first_meta[k] for k in ("tokenizer", "tokenizer_sha256", "vocab_size", "eos_id", "text_key")
                       if k in first_meta},
                    "merged_from": [os.path.relpath(os.path.abspath(i.prefix), out_dir) for i in infos],
                    **asdict(stats), "dtype": np.dtype(infos[0].dtype).name, "bin_bytes": os.path.getsize(bin_tmp),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            with open(meta_tmp, "w") as f:
                json.dump(meta, f, indent=1)
            _publish(output_prefix)
        except BaseException:
            remove_partials(output_prefix)
            raise
    return check_indexed_dataset(output_prefix)
