"""Progress of a long loop (evaluation), in the style of data preparation's (:mod:`elas_megatron.prep.pipeline`).

On a terminal (stderr is a TTY) it is a tqdm bar, as ``elas-prep tokenize`` shows; otherwise (a SLURM log, a pipe)
a log line at every further tenth of the work and at least every ``interval_s`` seconds::

    eval 120/862 batches (13%), elapsed 0:01:20, ETA 0:08:15

Nothing is shown before ``delay_s`` seconds have passed, so a short loop prints nothing (and a loop that did show
progress ends with one line of its total time).
"""
from __future__ import annotations

import logging
import sys
import time

logger = logging.getLogger(__name__)

DELAY_S = 10.0
"""Seconds before any progress is shown."""
INTERVAL_S = 60.0
"""Longest gap between two progress lines (no TTY)."""


def hms(seconds: float) -> str:
    """``H:MM:SS`` (hours unbounded)."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressMeter:
    """Counts ``total`` units of work named ``desc``; :meth:`update` after each, :meth:`close` at the end.

    Args:
        total: units of work (e.g. micro-batches).
        desc: what is done (``eval``); ``unit``: what is counted (``batches``).
        enabled: False shows nothing (e.g. on ranks other than the logging rank).
        bar: True/False forces a tqdm bar or log lines; None (default) takes a bar when stderr is a TTY.
        delay_s / interval_s: defaults :data:`DELAY_S` / :data:`INTERVAL_S` (read at construction).
    """

    def __init__(self, total: int, desc: str, unit: str = "batches", *, enabled: bool = True, bar: bool | None = None,
                 delay_s: float | None = None, interval_s: float | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled = enabled and total > 0
        self.delay_s = DELAY_S if delay_s is None else delay_s
        self.interval_s = INTERVAL_S if interval_s is None else interval_s
        self.done = 0
        self.start = time.perf_counter()
        self._last_line: float | None = None  # perf_counter of the last progress line (None: none yet)
        self._next_tenth = 1
        self.bar = None
        if self.enabled and (bar if bar is not None else sys.stderr.isatty()):
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is a declared dependency
                pass
            else:
                self.bar = tqdm(total=total, unit=f" {unit}", desc=desc, mininterval=0.5, dynamic_ncols=True,
                                delay=self.delay_s, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        elapsed = now - self.start
        tenth = self.done * 10 // self.total
        since = now - (self._last_line if self._last_line is not None else self.start)
        due = tenth >= self._next_tenth or since >= self.interval_s
        if elapsed < self.delay_s or self.done >= self.total or not due:
            if tenth >= self._next_tenth:
                self._next_tenth = tenth + 1
            return
        self._next_tenth = tenth + 1
        self._last_line = now
        eta = elapsed / self.done * (self.total - self.done)
        logger.info("%s %d/%d %s (%d%%), elapsed %s, ETA %s", self.desc, self.done, self.total, self.unit,
                    100 * self.done // self.total, hms(elapsed), hms(eta))

    def close(self) -> None:
        """Ends the bar; after progress lines, one line with the total time."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self._last_line is not None:
            logger.info("%s %d/%d %s, elapsed %s", self.desc, self.done, self.total, self.unit,
                        hms(time.perf_counter() - self.start))
            self._last_line = None

    def __enter__(self) -> "ProgressMeter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
