"""Tokenize a corpus into one Megatron indexed dataset per input shard, on all cores, resumably.

Two ways to spread the work over ``workers`` processes, picked per run (``mode="auto"``):

* **shards** -- when there are many more shards than workers (C4's 1024 on a node): every worker takes whole
  shards, reading, tokenizing and writing each on its own. Nothing crosses process boundaries but progress
  counts, so it scales with the cores.
* **blocks** -- when there are few shards (C4's 8 validation shards, the demo corpus, one big file): the main
  process reads each shard in ~4 MB blocks of lines and writes the output; the workers parse and tokenize the
  blocks. Order is kept, so the output is identical to a single-process run.

With ``workers=1`` everything runs inline in the calling process (no pool), the easiest mode to debug.

Resumability comes from :class:`elas_megatron.data.indexed.ShardWriter`: outputs appear atomically, a complete one
is skipped on the next run, an unfinished ``.partial`` one is redone. The first shard that fails (bad gzip, a bad
line under ``bad_lines="stop"``) stops the run; shards completed before it stay valid.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Literal

import numpy as np

from elas_megatron.data.indexed import ShardStats, ShardWriter, is_complete, read_meta, token_dtype
from elas_megatron.prep.sources import BadLinePolicy, Block, InputFormatError, Source, iter_blocks, parse_block
from elas_megatron.data.tokenizer import Tokenizer, tokenizer_from_bytes
from elas_megatron.utils.progress import ProgressMeter

logger = logging.getLogger(__name__)

__all__ = ["TokenizeOptions", "ShardOutcome", "TokenizeSummary", "TokenizeError", "output_prefix_for",
           "tokenize_corpus", "encode_documents"]

Mode = Literal["auto", "shards", "blocks"]


@dataclass(kw_only=True)
class TokenizeOptions:
    """How :func:`tokenize_corpus` reads and parallelises."""
    workers: int = 0
    """Processes (0 = all cores). 1 runs inline, without a pool."""
    text_key: str = "text"
    """JSON field (or dataset column) holding the document."""
    bad_lines: BadLinePolicy = "stop"
    """stop at the first line that is not JSON or has no text field, or skip and count such lines."""
    overwrite: bool = False
    """Re-tokenize shards that are already complete (otherwise they are skipped)."""
    mode: Mode = "auto"
    """Parallelise over whole shards, over blocks of one shard, or pick (shards when >= 4 per worker)."""
    block_bytes: int = 4 << 20
    """Decompressed bytes per block of lines."""
    progress: bool = True
    """Show progress after 10 s (bytes read, docs/s, tokens/s): a tqdm bar on a terminal, else a log line every
    tenth (:class:`~elas_megatron.utils.progress.ProgressMeter`)."""

    def resolved_workers(self) -> int:
        """``workers``, at most the CPU cores this process may use (0 = all of them): more processes than cores
        only add start-up time (``--workers 64`` on 2 cores took a minute for 60 kB)."""
        cores = usable_cores()
        return min(self.workers, cores) if self.workers > 0 else cores


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass
class ShardOutcome:
    """What happened to one input shard."""
    source: Source
    prefix: str
    status: Literal["done", "skipped", "failed"]
    stats: ShardStats = field(default_factory=ShardStats)
    seconds: float = 0.0
    error: str | None = None


@dataclass
class TokenizeSummary:
    """The result of a run, for the closing report."""
    outcomes: list[ShardOutcome]
    seconds: float
    workers: int
    mode: str

    def _with(self, status: str) -> list[ShardOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def done(self) -> list[ShardOutcome]:
        return self._with("done")

    @property
    def skipped(self) -> list[ShardOutcome]:
        return self._with("skipped")

    @property
    def failed(self) -> list[ShardOutcome]:
        return self._with("failed")

    @property
    def totals(self) -> ShardStats:
        total = ShardStats()
        for outcome in self.done:
            total.add(outcome.stats)
        return total

    def bin_bytes(self) -> int:
        return sum(os.path.getsize(o.prefix + ".bin") for o in self.done if os.path.exists(o.prefix + ".bin"))

    def format(self) -> str:
        """A few human-readable lines: counts, sizes, throughput, problems."""
        t = self.totals
        secs = max(self.seconds, 1e-9)
        lines = [f"tokenized {len(self.done)} shard(s), skipped {len(self.skipped)} already complete, "
                 f"{len(self.failed)} failed, in {self.seconds:.1f} s ({self.mode}, {self.workers} worker(s))",
                 f"  documents {t.documents:,}  tokens {t.tokens:,}  text {t.text_bytes / 1e6:,.1f} MB  "
                 f"-> .bin {self.bin_bytes() / 1e6:,.1f} MB",
                 f"  throughput {t.documents / secs:,.0f} docs/s  {t.tokens / secs:,.0f} tokens/s  "
                 f"{t.text_bytes / secs / 1e6:.2f} MB/s of text ({t.text_bytes / secs / 1e6 / self.workers:.2f} "
                 "MB/s per worker)"]
        if t.skipped_lines:
            lines.append(f"  skipped {t.skipped_lines:,} bad line(s), e.g. " + " | ".join(t.skip_examples[:3]))
        if t.empty_documents:
            lines.append(f"  dropped {t.empty_documents:,} document(s) with empty text")
        for o in self.failed:
            lines.append(f"  FAILED {o.source.describe()}: {o.error}")
        return "\n".join(lines)


class TokenizeError(RuntimeError):
    """At least one shard failed; ``summary`` has the details, completed shards are kept."""

    def __init__(self, summary: TokenizeSummary) -> None:
        self.summary = summary
        first = summary.failed[0]
        more = f" (and {len(summary.failed) - 1} more)" if len(summary.failed) > 1 else ""
        super().__init__(f"{first.error}{more}")


def output_prefix_for(output_prefix: str, source: Source) -> str:
    """Output prefix of one shard, Megatron-style: ``{output_prefix}_{shard}_text_document``.

    An ``output_prefix`` ending in ``/`` names a directory: ``{output_prefix}{shard}_text_document``.
    """
    if output_prefix.endswith(("/", os.sep)):
        return f"{output_prefix}{source.name}_text_document"
    return f"{output_prefix}_{source.name}_text_document"


@dataclass
class _Encoded:
    """A tokenized block: concatenated tokens (EOS after each document), lengths, counts."""
    tokens: np.ndarray
    lengths: np.ndarray
    stats: ShardStats
    input_bytes: int


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str], dtype: type[np.number] = np.int32
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents and append EOS to each.

    Returns:
        ``(tokens, lengths)``: all documents concatenated, and each document's length including its EOS.
    """
    ids = tokenizer.encode_batch(texts)
    eos = tokenizer.eos_id
    for doc in ids:
        doc.append(eos)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return tokens, lengths


def _encode_block(tokenizer: Tokenizer, block: Block, options: TokenizeOptions) -> _Encoded:
    parsed = parse_block(block, text_key=options.text_key, bad_lines=options.bad_lines)
    dtype = token_dtype(tokenizer.vocab_size)
    tokens, lengths = encode_documents(tokenizer, parsed.texts, dtype)
    stats = ShardStats(documents=len(parsed.texts), tokens=int(tokens.size), text_bytes=parsed.text_bytes,
                       lines=parsed.lines, skipped_lines=parsed.skipped, empty_documents=parsed.empty,
                       max_token_id=int(tokens.max()) if tokens.size else -1, skip_examples=parsed.skip_examples)
    return _Encoded(tokens, lengths, stats, block.input_bytes)


def _shard_meta(source: Source, tokenizer: Tokenizer, options: TokenizeOptions) -> dict:
    return {"source": source.describe(), "source_bytes": source.size_bytes, "text_key": options.text_key,
            "tokenizer": tokenizer.path, "tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id}


def _write_shard(source: Source, prefix: str, encoded: Iterator[_Encoded], tokenizer: Tokenizer,
                 options: TokenizeOptions, progress: Callable[[_Encoded], None]) -> ShardStats:
    with ShardWriter(prefix, vocab_size=tokenizer.vocab_size, meta=_shard_meta(source, tokenizer, options)) as writer:
        for enc in encoded:
            writer.add_documents(enc.tokens, enc.lengths)
            writer.stats.add(enc.stats)
            progress(enc)
        if writer.stats.documents == 0:
            raise InputFormatError(f"{source.describe()}: holds no documents ({writer.stats.lines} lines, "
                                   f"{writer.stats.skipped_lines} skipped, {writer.stats.empty_documents} empty); "
                                   "check the file and --text-key")
        writer.commit()
        return writer.stats


# ----------------------------------------------------------------------------------------- worker processes
_WORKER: dict = {}


def _init_worker(model_bytes: bytes, tokenizer_path: str, options: TokenizeOptions, progress_queue) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _WORKER["tokenizer"] = tokenizer_from_bytes(model_bytes, tokenizer_path)
    _WORKER["options"] = options
    _WORKER["queue"] = progress_queue


def _worker_encode_block(block: Block) -> _Encoded:
    return _encode_block(_WORKER["tokenizer"], block, _WORKER["options"])


def _worker_run_shard(source: Source, prefix: str) -> ShardOutcome:
    tokenizer, options, progress_queue = _WORKER["tokenizer"], _WORKER["options"], _WORKER["queue"]
    start = time.perf_counter()

    def report(enc: _Encoded) -> None:
        progress_queue.put((enc.input_bytes, enc.stats.documents, enc.stats.tokens, enc.stats.text_bytes))

    try:
        encoded = (_encode_block(tokenizer, b, options) for b in iter_blocks(source, block_bytes=options.block_bytes,
                                                                              text_key=options.text_key))
        stats = _write_shard(source, prefix, encoded, tokenizer, options, report)
    except (InputFormatError, ImportError, OSError, RuntimeError, ValueError) as err:
        return ShardOutcome(source, prefix, "failed", seconds=time.perf_counter() - start, error=str(err))
    return ShardOutcome(source, prefix, "done", stats, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ progress
class _Progress:
    """Bytes read (the amount of work) with docs/s, tokens/s and text MB/s as postfix, shown by
    :class:`~elas_megatron.utils.progress.ProgressMeter` (the style of every progress display: a tqdm bar on a
    terminal, else a log line every tenth; nothing in the first 10 s)."""

    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.docs = self.tokens = self.text_bytes = 0
        self._last_postfix = 0.0
        self.meter = ProgressMeter(total_bytes, "tokenize", "B", enabled=enabled, unit_scale=True)

    def update(self, input_bytes: int, docs: int, tokens: int, text_bytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.text_bytes += text_bytes
        if not self.meter.enabled:
            return
        now = time.perf_counter()
        if now - self._last_postfix > 0.5:
            secs = max(now - self.meter.start, 1e-9)
            self.meter.set_postfix(f"{self.docs / secs:,.0f} docs/s, {self.tokens / secs:,.0f} tok/s, "
                                   f"{self.text_bytes / secs / 1e6:.2f} MB/s text")
            self._last_postfix = now
        self.meter.update(input_bytes)

    def close(self) -> None:
        self.meter.close()


# --------------------------------------------------------------------------------------------- the runners
def _run_blocks(tasks: list[tuple[Source, str]], tokenizer: Tokenizer, options: TokenizeOptions, workers: int,
                bar: _Progress) -> list[ShardOutcome]:
    """Main process reads and writes; a pool (or this process, for one worker) tokenizes blocks in order."""
    pool = None
    if workers > 1:
        ctx = mp.get_context("spawn")
        pool = ctx.Pool(workers, initializer=_init_worker,
                        initargs=(tokenizer.model_bytes, tokenizer.path, options, None))
    window = 2 * workers + 2

    def items() -> Iterator[tuple[int, str, object]]:
        # (task index, "block" | "end" | "error", payload), in input order, with up to `window` blocks in flight.
        inflight: deque = deque()

        def produce() -> Iterator[tuple[int, str, object]]:
            for i, (source, _) in enumerate(tasks):
                try:
                    for block in iter_blocks(source, block_bytes=options.block_bytes, text_key=options.text_key):
                        if pool is None:
                            yield i, "block", _encode_block(tokenizer, block, options)
                        else:
                            yield i, "block", pool.apply_async(_worker_encode_block, (block,))
                except (InputFormatError, ImportError, OSError) as err:
                    yield i, "error", err
                    continue
                yield i, "end", None

        for item in produce():
            inflight.append(item)
            while len(inflight) > window or (pool is None and inflight):
                yield inflight.popleft()
        while inflight:
            yield inflight.popleft()

    outcomes: list[ShardOutcome] = []
    stream = items()
    pending_item: tuple[int, str, object] | None = None

    def shard_blocks(index: int) -> Iterator[_Encoded]:
        nonlocal pending_item
        for i, kind, payload in stream:
            assert i == index, "blocks arrive in input order"
            if kind == "end":
                return
            if kind == "error":
                raise payload  # type: ignore[misc]
            yield payload.get() if pool is not None else payload  # type: ignore[union-attr]

    def report(enc: _Encoded) -> None:
        bar.update(enc.input_bytes, enc.stats.documents, enc.stats.tokens, enc.stats.text_bytes)

    try:
        for index, (source, prefix) in enumerate(tasks):
            start = time.perf_counter()
            try:
                stats = _write_shard(source, prefix, shard_blocks(index), tokenizer, options, report)
            except (InputFormatError, ImportError, OSError, RuntimeError, ValueError) as err:
                outcomes.append(ShardOutcome(source, prefix, "failed", seconds=time.perf_counter() - start,
                                             error=str(err)))
                break  # stop at the first failure; what is complete stays complete
            outcomes.append(ShardOutcome(source, prefix, "done", stats, time.perf_counter() - start))
    finally:
        stream.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return outcomes


def _run_shards(tasks: list[tuple[Source, str]], tokenizer: Tokenizer, options: TokenizeOptions, workers: int,
                bar: _Progress) -> list[ShardOutcome]:
    """Each worker tokenizes whole shards; the main process only schedules and shows progress."""
    ctx = mp.get_context("spawn")
    progress_queue = ctx.Queue()
    pool = ctx.Pool(workers, initializer=_init_worker,
                    initargs=(tokenizer.model_bytes, tokenizer.path, options, progress_queue))
    todo = deque(tasks)
    inflight: list = []
    outcomes: list[ShardOutcome] = []
    stop = False

    def drain(timeout: float) -> None:
        try:
            bar.update(*progress_queue.get(timeout=timeout))
            while True:
                bar.update(*progress_queue.get_nowait())
        except queue_mod.Empty:
            pass

    try:
        while todo or inflight:
            while todo and not stop and len(inflight) < workers:
                source, prefix = todo.popleft()
                inflight.append(pool.apply_async(_worker_run_shard, (source, prefix)))
            if stop:
                todo.clear()
            drain(0.2)
            for result in [r for r in inflight if r.ready()]:
                inflight.remove(result)
                outcome = result.get()
                outcomes.append(outcome)
                if outcome.status == "failed":
                    stop = True  # finish what is running, start nothing new
        drain(0.0)
    finally:
        pool.terminate()
        pool.join()
        progress_queue.close()
    return outcomes


def tokenize_corpus(sources: Sequence[Source], output_prefix: str, tokenizer: Tokenizer,
                    options: TokenizeOptions | None = None) -> TokenizeSummary:
    """Tokenize every source into its own indexed dataset ``output_prefix_for(output_prefix, source)``.

    Args:
        sources: input shards (see :func:`elas_megatron.prep.sources.expand_inputs`).
        output_prefix: ``PATH/name`` (outputs ``PATH/name_{shard}``) or ``PATH/`` (outputs ``PATH/{shard}``).
        tokenizer: the sentencepiece tokenizer; EOS is appended to every document.
        options: parallelism, bad-line policy, resume behaviour.

    Returns:
        The summary (documents, tokens, bytes, throughput, skipped shards).

    Raises:
        TokenizeError: a shard failed (its message names the file and line); shards finished before it are kept.
        ValueError: a complete output was made with another tokenizer (use ``overwrite`` or another prefix).
    """
    options = options or TokenizeOptions()
    workers = options.resolved_workers()
    if workers < options.workers:
        logger.info("%d workers asked for, %d CPU cores usable: %d workers", options.workers, workers, workers)
    start = time.perf_counter()
    outcomes: list[ShardOutcome] = []
    tasks: list[tuple[Source, str]] = []
    for source in sources:
        prefix = output_prefix_for(output_prefix, source)
        if not options.overwrite and is_complete(prefix):
            meta = read_meta(prefix) or {}
            if meta.get("tokenizer_sha256") not in (None, tokenizer.sha256):
                raise ValueError(f"{prefix} is complete but was tokenized with another tokenizer "
                                 f"({meta.get('tokenizer')}, vocab {meta.get('vocab_size')}) than {tokenizer.path} "
                                 f"(vocab {tokenizer.vocab_size}); use another --output-prefix or pass --overwrite")
            logger.info("skipping %s: %s is complete", source.describe(), prefix)
            outcomes.append(ShardOutcome(source, prefix, "skipped"))
        else:
            tasks.append((source, prefix))
    mode = options.mode
    if mode == "auto":
        mode = "shards" if workers > 1 and len(tasks) >= 4 * workers else "blocks"
    workers = min(workers, len(tasks)) if mode == "shards" else workers
    if tasks:
        logger.info("tokenizing %d shard(s) with %d worker(s), parallel over %s", len(tasks), workers, mode)
        bar = _Progress(sum(s.size_bytes for s, _ in tasks), options.progress)
        try:
            runner = _run_shards if mode == "shards" and workers > 1 else _run_blocks
            outcomes.extend(runner(tasks, tokenizer, options, workers, bar))
        finally:
            bar.close()
    summary = TokenizeSummary(outcomes, time.perf_counter() - start, max(workers, 1), mode)
    if summary.failed:
        raise TokenizeError(summary)
    return summary
