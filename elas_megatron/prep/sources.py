"""Input corpora: finding the shards, reading them in blocks, and turning lines into documents.

C4 (``allenai/c4``, config ``en``) ships as gzip JSON lines ``{"text", "timestamp", "url"}``; any other JSON-lines
file (plain or ``.gz``) with a text field reads the same way, and so does a Hugging Face ``datasets`` dataset saved
with ``save_to_disk``. Reading is split in two so it parallelises: :func:`iter_blocks` cuts a shard into
multi-megabyte blocks of whole lines (cheap: decompression and ``bytes.count``), and :func:`parse_block` turns a
block into document texts (JSON parsing, done in the worker processes next to tokenization).

We read with a plain streaming reader (gzip + orjson/json) rather than ``datasets.load_dataset("json", ...)``:
it was faster in our measurement (docs/data.md) and it knows the file and line of every document, which the
error messages need.

Every problem names the file and line (1-based, in the decompressed file) and the fix.
"""
from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger(__name__)

__all__ = ["InputFormatError", "Source", "Block", "BlockResult", "expand_inputs", "iter_blocks", "parse_block",
           "iter_texts", "JSONL_SUFFIXES"]

try:  # orjson parses C4 lines ~3x faster than the standard library; it is optional.
    import orjson as _orjson

    _json_loads = _orjson.loads
    _JSON_ERRORS: tuple[type[Exception], ...] = (_orjson.JSONDecodeError, UnicodeDecodeError)
except ImportError:  # pragma: no cover - depends on the environment
    _json_loads = json.loads
    _JSON_ERRORS = (json.JSONDecodeError, UnicodeDecodeError)

JSONL_SUFFIXES = (".json.gz", ".jsonl.gz", ".json", ".jsonl")
"""File names a directory input is searched for (recursively)."""

BadLinePolicy = Literal["stop", "skip"]


class InputFormatError(ValueError):
    """An input file cannot be read as documents; the message names the file (and line) and the fix."""


@dataclass(frozen=True)
class Source:
    """One input shard: a JSON-lines file, or one split of a Hugging Face dataset saved to disk.

    Attributes:
        path: the file, or the dataset directory.
        kind: ``jsonl`` (plain or gzip JSON lines) or ``hf`` (``datasets.load_from_disk``).
        name: the shard's name in output file names (the file name without its JSON suffixes).
        split: for a saved ``DatasetDict``, the split to read.
    """
    path: str
    kind: Literal["jsonl", "hf"]
    name: str
    split: str | None = None

    @property
    def size_bytes(self) -> int:
        """Bytes on disk (what the progress bar counts)."""
        if self.kind == "jsonl":
            return os.path.getsize(self.path)
        return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(self.path) for f in files
                   if f.endswith(".arrow") and (self.split is None or os.path.basename(root) == self.split))

    def describe(self) -> str:
        return self.path if self.split is None else f"{self.path} (split {self.split})"


@dataclass
class Block:
    """Whole lines of one source: raw JSON-lines bytes, or already-extracted texts (``hf`` sources)."""
    source: Source
    first_line: int
    """1-based line (or row) number of the block's first line."""
    data: bytes | None = None
    texts: list[str] | None = None
    input_bytes: int = 0
    """Bytes of the file consumed by this block (compressed bytes for gzip), for progress."""


@dataclass
class BlockResult:
    """Documents of one block, and what was skipped."""
    texts: list[str]
    text_bytes: int = 0
    lines: int = 0
    skipped: int = 0
    empty: int = 0
    skip_examples: list[str] = field(default_factory=list)


def _strip_suffix(name: str) -> str:
    for suffix in JSONL_SUFFIXES + (".gz",):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _hf_sources(path: str) -> list[Source] | None:
    """Sources of a ``save_to_disk`` directory, or None when ``path`` is not one."""
    base = os.path.basename(os.path.normpath(path))
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        return [Source(path, "hf", f"{base}-{split}", split) for split in splits]
    if os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json")):
        return [Source(path, "hf", base)]
    return None


def expand_inputs(patterns: Sequence[str]) -> list[Source]:
    """Turn files, directories and globs into a sorted, duplicate-free list of sources.

    A directory is either a Hugging Face dataset saved to disk (one source per split) or searched recursively for
    ``*.json.gz``, ``*.jsonl.gz``, ``*.json`` and ``*.jsonl`` files. A glob may match any files.

    Raises:
        FileNotFoundError: a pattern matches nothing.
        InputFormatError: two inputs would write the same output name.
    """
    sources: list[Source] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            hf = _hf_sources(pattern)
            if hf is not None:
                sources.extend(hf)
                continue
            files = sorted(p for suffix in JSONL_SUFFIXES
                           for p in glob.glob(os.path.join(pattern, "**", f"*{suffix}"), recursive=True)
                           if not p.endswith(".meta.json"))  # our own dataset sidecars, when outputs sit inside
            if not files:
                raise FileNotFoundError(f"input directory {pattern} holds no {', '.join(JSONL_SUFFIXES)} files and "
                                        "is not a Hugging Face dataset saved with save_to_disk")
        else:
            files = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
            if not files or not os.path.exists(files[0]):
                raise FileNotFoundError(f"input {pattern} matches no file; pass C4 shards such as "
                                        "'c4/en/c4-train.*.json.gz', a directory or a saved dataset")
        for path in files:
            if os.path.isdir(path):
                hf = _hf_sources(path)
                if hf is None:
                    raise InputFormatError(f"input {path} is a directory; pass the directory itself (searched "
                                           "for JSON-lines files) rather than a glob that matches it")
                sources.extend(hf)
            else:
                sources.append(Source(os.path.normpath(path), "jsonl", _strip_suffix(os.path.basename(path))))
    unique: dict[tuple[str, str | None], Source] = {}
    for src in sources:
        unique.setdefault((os.path.realpath(src.path), src.split), src)
    by_name: dict[str, Source] = {}
    for src in unique.values():
        if src.name in by_name:
            raise InputFormatError(f"inputs {by_name[src.name].describe()} and {src.describe()} both map to the output "
                                   f"name {src.name!r}; tokenize them in separate runs with different --output-prefix")
        by_name[src.name] = src
    return sorted(unique.values(), key=lambda s: (s.name, s.path))


def _iter_jsonl_blocks(source: Source, block_bytes: int) -> Iterator[Block]:
    path = source.path
    try:
        raw = open(path, "rb")
    except OSError as err:
        raise InputFormatError(f"{path}: cannot open ({err.strerror}); check the path and its permissions") from None
    with raw:
        is_gzip = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        if path.endswith(".gz") and not is_gzip and os.path.getsize(path) > 0:
            raise InputFormatError(f"{path}:1: unreadable gzip data, the file is named .gz but is not gzip "
                                   "(wrong magic bytes); re-download this shard")
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw
        line = 1
        consumed = 0
        carry = b""
        while True:
            try:
                chunk = stream.read(block_bytes)
            except (OSError, EOFError, zlib.error) as err:
                at_line = line + carry.count(b"\n")
                if not is_gzip:
                    raise InputFormatError(f"{path}:{at_line}: read error ({err}); check the disk or re-copy the "
                                           "file") from None
                kind = "truncated" if isinstance(err, EOFError) else "corrupt"
                raise InputFormatError(
                    f"{path}:{at_line}: unreadable gzip data, the file is {kind} ({err}); "
                    "re-download this shard (compare its size/checksum with the source)") from None
            if not chunk:
                break
            data = carry + chunk
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a block: keep reading
                carry = data
                continue
            block, carry = data[:cut], data[cut:]
            position = raw.tell()
            yield Block(source, line, data=block, input_bytes=position - consumed)
            consumed = position
            line += block.count(b"\n")
        if carry:
            yield Block(source, line, data=carry, input_bytes=raw.tell() - consumed)


def _iter_hf_blocks(source: Source, block_docs: int, text_key: str) -> Iterator[Block]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {source.path} (a Hugging Face dataset saved to disk) needs the `datasets` "
                          "package: pip install 'elas-megatron[data]'") from None
    ds = datasets.load_from_disk(source.path)
    if source.split is not None:
        ds = ds[source.split]
    if text_key not in ds.column_names:
        raise InputFormatError(f"{source.describe()}: has no {text_key!r} column (columns: {ds.column_names}); "
                               "pass --text-key with the right column")
    size = max(source.size_bytes, 1)
    num_rows = max(len(ds), 1)
    row = 1
    for batch in ds.select_columns([text_key]).iter(batch_size=block_docs):
        texts = batch[text_key]
        yield Block(source, row, texts=list(texts), input_bytes=size * len(texts) // num_rows)
        row += len(texts)


def iter_blocks(source: Source, *, block_bytes: int = 4 << 20, text_key: str = "text") -> Iterator[Block]:
    """Blocks of whole lines of ``source``, in order.

    Args:
        source: what to read.
        block_bytes: decompressed bytes per block (JSON lines); ``hf`` sources use ``block_bytes // 2048`` rows.
        text_key: the text column (``hf`` sources check it here; JSON lines in :func:`parse_block`).

    Raises:
        InputFormatError: the file cannot be opened, or its gzip stream is corrupt or truncated.
    """
    if source.kind == "hf":
        yield from _iter_hf_blocks(source, max(block_bytes // 2048, 1), text_key)
    else:
        yield from _iter_jsonl_blocks(source, block_bytes)


def _bad_line(examples: list[str], policy: BadLinePolicy, where: str, problem: str, fix: str) -> None:
    if policy == "stop":
        raise InputFormatError(f"{where}: {problem}; {fix}, or pass --bad-lines skip to skip and count such lines")
    if len(examples) < 5:
        examples.append(f"{where}: {problem}")


def _add_text(result: BlockResult, text: object, *, where: str, text_key: str, bad_lines: BadLinePolicy, fix: str,
              record: dict | None = None) -> None:
    """The tail every reader shares: a non-string text is a bad line, an empty one is counted, the rest is kept.

    ``record``: the JSON object the text came from, so that a missing ``text_key`` is reported as such.
    """
    if not isinstance(text, str):
        result.skipped += 1
        if record is not None and text_key not in record:
            problem = f"no {text_key!r} field (keys: {sorted(record)[:6]})"
        else:
            problem = f"{text_key!r} is {type(text).__name__}, not a string"
        _bad_line(result.skip_examples, bad_lines, where, problem, fix)
        return
    if not text:
        result.empty += 1
        return
    result.texts.append(text)
    result.text_bytes += len(text.encode("utf-8"))


def parse_block(block: Block, *, text_key: str = "text", bad_lines: BadLinePolicy = "stop") -> BlockResult:
    """Extract the document texts of a block.

    Blank lines are ignored; documents with empty text are dropped and counted (``empty``). A line that is not
    JSON, not a JSON object, or has no string ``text_key`` is a bad line: with ``bad_lines="stop"`` it raises,
    with ``"skip"`` it is skipped and counted (``skipped``, the first few in ``skip_examples``).

    Raises:
        InputFormatError: a bad line under ``bad_lines="stop"``; the message is ``file:line: problem; fix``.
    """
    path = block.source.describe()
    result = BlockResult(texts=[])
    if block.texts is not None:  # hf rows: the column exists; values may still be null
        for i, text in enumerate(block.texts):
            result.lines += 1
            _add_text(result, text, where=f"{path}: row {block.first_line + i}", text_key=text_key,
                      bad_lines=bad_lines, fix="fix or filter the dataset")
        return result
    assert block.data is not None
    for i, line in enumerate(block.data.split(b"\n")):
        if not line.strip():
            continue
        result.lines += 1
        where = f"{path}:{block.first_line + i}"
        try:
            record = _json_loads(line)
        except _JSON_ERRORS as err:
            result.skipped += 1
            preview = line[:60].decode("utf-8", "replace")
            _bad_line(result.skip_examples, bad_lines, where, f"not valid JSON ({err}; line starts {preview!r})",
                      "every line must be one JSON object such as {\"text\": \"...\"}")
            continue
        if not isinstance(record, dict):
            result.skipped += 1
            _bad_line(result.skip_examples, bad_lines, where, f"a JSON {type(record).__name__}, not an object",
                      "every line must be one JSON object such as {\"text\": \"...\"}")
            continue
        _add_text(result, record.get(text_key), where=where, text_key=text_key, bad_lines=bad_lines,
                  fix="pass --text-key if the text lives under another key", record=record)
    return result


def iter_texts(sources: Sequence[Source], *, text_key: str = "text",
               bad_lines: BadLinePolicy = "skip") -> Iterator[str]:
    """Every document text of ``sources`` in order (for tokenizer training and tests)."""
    for source in sources:
        for block in iter_blocks(source, text_key=text_key):
            yield from parse_block(block, text_key=text_key, bad_lines=bad_lines).texts
