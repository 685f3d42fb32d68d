"""Progress of a long loop, one style for every tool: evaluation (``elas-eval``, the trainer's validation) and data
preparation (``elas-prep tokenize``, :mod:`elas_megatron.prep.pipeline`).

On a terminal (stderr is a TTY) it is a tqdm bar; otherwise (a SLURM log, a pipe) a log line at every further tenth
of the work and at least every ``interval_s`` seconds, with an optional postfix (rates)::

    eval 120/862 batches (13%), elapsed 0:01:20, ETA 0:08:15
    tokenize 1.21G/4.03G B (30%), elapsed 0:00:41, ETA 0:01:35, 2,950 docs/s, 1,480,112 tok/s, 6.02 MB/s text

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


def si(n: float) -> str:
    """``n`` with an SI prefix, 3 significant digits (``1.21G``), as tqdm's ``unit_scale`` shows amounts."""
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 999.5:
            return f"{n:.3g}{prefix}"
        n /= 1000
    return f"{n:.3g}P"


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
        unit_scale: show amounts with SI prefixes (``1.21G``; for bytes).
    """

    def __init__(self, total: int, desc: str, unit: str = "batches", *, enabled: bool = True, bar: bool | None = None,
                 delay_s: float | None = None, interval_s: float | None = None, unit_scale: bool = False) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.unit_scale = unit_scale
        self.postfix = ""
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
                self.bar = tqdm(total=total, unit=unit if unit_scale else f" {unit}", unit_scale=unit_scale,
                                desc=desc, mininterval=0.5, dynamic_ncols=True, delay=self.delay_s, leave=False)

    def _amounts(self) -> str:
        """``done/total unit``."""
        if self.unit_scale:
            return f"{si(self.done)}/{si(self.total)} {self.unit}"
        return f"{self.done}/{self.total} {self.unit}"

    def set_postfix(self, text: str) -> None:
        """Text shown after the counts (rates, say), on the bar and on the next progress lines."""
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

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
        logger.info("%s %s (%d%%), elapsed %s, ETA %s%s", self.desc, self._amounts(), 100 * self.done // self.total,
                    hms(elapsed), hms(eta), f", {self.postfix}" if self.postfix else "")

    def close(self) -> None:
        """Ends the bar; after progress lines, one line with the total time."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self._last_line is not None:
            logger.info("%s %s, elapsed %s%s", self.desc, self._amounts(), hms(time.perf_counter() - self.start),
                        f", {self.postfix}" if self.postfix else "")
            self._last_line = None

    def __enter__(self) -> "ProgressMeter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
