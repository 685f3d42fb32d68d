"""Logging set-up for entry points: one formatted root logger, quiet on non-logging ranks, and per-rank log files."""
from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

_FORMAT = "%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"
_FILE_FORMAT = "%(asctime)s.%(msecs)03d [rank{rank}] %(levelname)s %(name)s: %(message)s"


def rank_log_path(log_dir: str | Path, rank: int) -> Path:
    """``{log_dir}/rank{rank}.log``."""
    return Path(log_dir) / f"rank{rank}.log"


def init_logging(level: str = "info", *, rank: int = 0, verbose_ranks: bool = False,
                 log_dir: str | Path | None = None) -> None:
    """Configure the root logger; ranks other than 0 only report warnings on the console unless ``verbose_ranks``.

    With ``log_dir`` every rank also appends everything at ``level`` (for all ranks alike) to
    ``{log_dir}/rank{rank}.log`` (:func:`rank_log_path`), dated to the millisecond, so each rank of a multi-node
    run can be read on its own.
    """
    lvl = getattr(logging, level.upper())
    console_lvl = lvl if rank == 0 or verbose_ranks else max(lvl, logging.WARNING)
    console = logging.StreamHandler()
    console.setLevel(console_lvl)
    console.setFormatter(logging.Formatter(_FORMAT.format(rank=rank), datefmt="%H:%M:%S"))
    handlers: list[logging.Handler] = [console]
    if log_dir is not None:
        # Held in memory until open_rank_log: the run directory may belong to another job until the trainer has
        # locked it, and nothing may be written there before that.
        buffer = _RankLogBuffer(Path(log_dir), rank)
        buffer.setLevel(lvl)
        handlers.append(buffer)
    logging.basicConfig(level=lvl if log_dir is not None else console_lvl, handlers=handlers, force=True)
    # Megatron-Core logs every bucket and parameter at INFO: keep it to warnings unless debugging.
    logging.getLogger("megatron").setLevel(logging.DEBUG if lvl == logging.DEBUG else logging.WARNING)


class _RankLogBuffer(logging.handlers.MemoryHandler):
    """The records of this rank until its log file may be opened (:func:`open_rank_log`)."""

    def __init__(self, log_dir: Path, rank: int) -> None:
        super().__init__(capacity=100_000, flushLevel=logging.CRITICAL + 1, target=None, flushOnClose=False)
        self.log_dir, self.rank = log_dir, rank

    def shouldFlush(self, record: logging.LogRecord) -> bool:  # never on its own: only open_rank_log writes
        return False


def open_rank_log() -> Path | None:
    """Start writing this rank's log file (``init_logging(log_dir=...)``), with everything logged so far; call it
    once the run directory is this job's (the trainer has locked it). Returns the file, None without ``log_dir``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _RankLogBuffer):
            path = rank_log_path(handler.log_dir, handler.rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            file = logging.FileHandler(path, mode="a", encoding="utf-8")
            file.setLevel(handler.level)
            file.setFormatter(logging.Formatter(_FILE_FORMAT.format(rank=handler.rank), datefmt="%Y-%m-%d %H:%M:%S"))
            for record in handler.buffer:
                if record.levelno >= file.level:
                    file.handle(record)
            root.removeHandler(handler)
            handler.buffer.clear()
            root.addHandler(file)
            return path
    return None


def log_to_file_only(message: str, level: int = logging.ERROR) -> None:
    """Write ``message`` to this process's rank log file(s) only (for lines the entry point prints itself)."""
    record = logging.LogRecord("elas_megatron", level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler | _RankLogBuffer) and record.levelno >= handler.level:
            handler.handle(record)
