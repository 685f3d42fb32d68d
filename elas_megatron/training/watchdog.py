# SPDX-License-Identifier: Apache-2.0
"""The hang watchdog: a rank that stops making progress is named by every rank, and the job ends.

Every rank records where it is (:class:`Progress`: step, phase); a thread (:class:`Watchdog`) publishes it with the
main thread's current Python location to the torchrun agent's store
(:class:`~elas_megatron.parallel.setup.ProgressBoard`). When a rank makes no progress for
``parallel.distributed_timeout_s``, its watchdog names the stuck rank(s) (:func:`diagnose_hang`) -- those not
waiting in a ``torch.distributed`` call, or not reporting at all -- declares the hang on the board, so that every
other rank's watchdog diagnoses it too at its next poll, waits for them (briefly) and ends the process (exit code
:data:`EXIT_HANG`).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Literal, Self

from elas_megatron.config.schema import start_up_limit

__all__ = ["EXIT_HANG", "Limit", "Progress", "Watchdog", "diagnose_hang"]

logger = logging.getLogger(__name__)

EXIT_HANG = 124
"""Exit code of a process ended by the watchdog (as ``timeout(1)``)."""


Limit = Literal["collective", "io", "start-up"]
"""Which limit times a phase: ``distributed_timeout_s`` (training steps), ``io_timeout_s`` (checkpoint saves) or
:func:`~elas_megatron.config.schema.start_up_limit` (start-up phases, checkpoint load included)."""


class Progress:
    """Where this rank is: (step, phase) and when it got there. Updating it is a few attribute writes."""

    def __init__(self, on_limit: Callable[[Limit], None] | None = None) -> None:
        """``on_limit``: called with the new :data:`Limit` whenever a phase is timed by another limit than the last
        (the trainer sets the process groups' collective timeout from it)."""
        self.step = 0
        self.phase = "start"
        self.since = time.monotonic()
        self.watched = True
        self.limit: Limit = "collective"
        self.on_limit = on_limit

    def update(self, step: int, phase: str, watched: bool = True, limit: Limit = "collective") -> None:
        """``limit``: which of the watchdog's limits times this phase (:data:`Limit`); ``watched=False`` for
        phases it must not time at all."""
        changed = limit != self.limit
        self.step, self.phase, self.watched, self.limit, self.since = step, phase, watched, limit, time.monotonic()
        if changed and self.on_limit is not None:
            self.on_limit(limit)


def _main_thread_location() -> tuple[bool, str]:
    """(is the main thread inside a torch.distributed call?, its innermost Python frames as text)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    frames = []
    while frame is not None and len(frames) < 40:
        frames.append(frame)
        frame = frame.f_back
    in_collective = any(f"torch{os.sep}distributed" in f.f_code.co_filename for f in frames)
    ours = next((f for f in frames if f"elas_megatron{os.sep}" in f.f_code.co_filename), None)
    text = []
    for f in frames[:1] + ([ours] if ours is not None and ours is not frames[0] else []):
        path = os.sep.join(f.f_code.co_filename.split(os.sep)[-2:])
        text.append(f"{f.f_code.co_name} ({path}:{f.f_lineno})")
    return in_collective, " <- ".join(text) or "?"


def diagnose_hang(reports: dict[int, dict | None], me: int, now: float, stale_s: float) -> str:
    """Name the stuck rank(s) from every rank's last report (see :class:`Watchdog`).

    Stuck: ranks with no recent report (dead, or frozen so hard their watchdog thread cannot run); else the ranks
    not waiting inside a torch.distributed call while others are; else (everyone waits: mismatched collectives or
    an asynchronous backend) the ranks idle the longest.
    """
    def describe(rank: int) -> str:
        rep = reports.get(rank)
        if rep is None:
            return f"rank {rank}: no report at all (never got past distributed initialisation, or died)"
        age = now - rep["wall"]
        state = "waiting in torch.distributed" if rep["in_collective"] else "not in a collective"
        return (f"rank {rank}: step {rep['step']} '{rep['phase']}', idle {rep['idle_s'] + age:.0f} s, {state}: "
                f"{rep['where']}" + (f" (last report {age:.0f} s ago)" if age > stale_s else ""))

    silent = [r for r, rep in reports.items() if rep is None or now - rep["wall"] > stale_s]
    stuck = silent or [r for r, rep in reports.items() if not rep["in_collective"]]
    if not stuck:
        idle = {r: rep["idle_s"] + now - rep["wall"] for r, rep in reports.items()}
        longest = max(idle.values())
        stuck = [r for r, t in idle.items() if t >= longest - 1.0]
    lines = [describe(r) for r in sorted(stuck)[:8]]
    more = f" (+{len(stuck) - 8} more)" if len(stuck) > 8 else ""
    mine = "" if me in stuck else f" | this rank: {describe(me)}"
    return f"stuck rank(s) {sorted(stuck)[:8]}{more} -- " + "; ".join(lines) + mine


def _exit_process(message: str) -> None:
    sys.stderr.write(f"elas-train: error: {message}\n")
    sys.stderr.flush()
    logging.shutdown()
    os._exit(EXIT_HANG)


class Watchdog:
    """A daemon thread that reports this rank's :class:`Progress` and ends the process when it stops moving.

    Args:
        progress: updated by the trainer (start-up phases, training steps, checkpoint save and load).
        timeout_s: ``parallel.distributed_timeout_s``: no progress for this long is a hang.
        io_timeout_s: ``parallel.io_timeout_s``: the limit instead in checkpoint saves, and in start-up phases
            when it is the longer (:func:`~elas_megatron.config.schema.start_up_limit`) (default: ``timeout_s``).
        board: the shared :class:`~elas_megatron.parallel.setup.ProgressBoard` (None: a one-rank diagnosis, e.g.
            a single process).
        global_rank: this process.
        on_hang: called with the message (default: print it and exit with :data:`EXIT_HANG`).

    A context manager; :meth:`start` / :meth:`stop` may also be called, several times (the trainer watches its
    start-up, ``train()``, and saves and loads called on their own, not the time in between).
    """

    def __init__(self, progress: Progress, *, timeout_s: float, board, global_rank: int,
                 io_timeout_s: float | None = None, on_hang: Callable[[str], None] = _exit_process) -> None:
        self.progress = progress
        self.timeout_s = timeout_s
        self.io_timeout_s = io_timeout_s if io_timeout_s is not None else timeout_s
        self.board = board
        self.global_rank = global_rank
        self.on_hang = on_hang
        self.poll_s = max(0.2, min(5.0, min(timeout_s, self.io_timeout_s) / 10))
        self.settle_s = 2 * self.poll_s + 2.0  # the longest wait for the other ranks' diagnoses (_settle)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="elas-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _report(self) -> dict:
        p = self.progress
        in_collective, where = _main_thread_location()
        return {"step": p.step, "phase": p.phase, "idle_s": time.monotonic() - p.since, "wall": time.time(),
                "in_collective": in_collective, "where": where}

    def limit(self, kind: Limit | None = None) -> tuple[float, str]:
        """(seconds, config key) of the limit ``kind`` (default: the one of the phase the rank is in now)."""
        kind = kind or self.progress.limit
        if kind == "start-up":
            return start_up_limit(self.timeout_s, self.io_timeout_s)
        if kind == "io":
            return self.io_timeout_s, "parallel.io_timeout_s"
        return self.timeout_s, "parallel.distributed_timeout_s"

    def collective_timeout(self, kind: Limit | None = None) -> float:
        """Seconds after which a collective should time out in phases timed by ``kind`` (default: the current
        phase's): the limit, plus twice what the watchdog may take past it -- a poll to notice, then settling with
        the other ranks (:meth:`_settle`). Why later than the limit: the watchdog names the stuck rank and ends
        every rank; a collective that times out first only says "Timed out waiting 8000ms for recv operation" on
        the ranks that waited (with the limit itself as timeout, a rank waiting on a hung one lost that race)."""
        return self.limit(kind)[0] + 2 * (self.poll_s + self.settle_s)

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.poll_s):
            report = self._report()
            declared = False
            try:
                if self.board is not None:
                    self.board.post(json.dumps(report))
                    declared = self.board.hang_declared()
            except (RuntimeError, OSError) as exc:  # the store went away (job teardown): keep timing locally
                logger.debug("watchdog: cannot post progress: %s", exc)
            limit, _ = self.limit()
            if declared or (self.progress.watched and report["idle_s"] > limit):
                message = self.describe_hang(report)
                self._settle()
                self.on_hang(message)
                return

    def _settle(self) -> None:
        """Declare the hang and wait (a few polls at most) until every rank has diagnosed it.

        Why: the first rank to exit closes its connections; a rank still waiting in a collective would then fail
        with a connection error instead of naming the stuck rank. Every rank's watchdog sees the declaration at
        its next poll and diagnoses at once (its own timeout not yet reached); ranks too frozen to answer, or
        dead, are waited for only ``settle_s`` (``2 * poll + 2`` seconds).
        """
        if self.board is None:
            return
        try:
            self.board.declare_hang()
            self.board.acknowledge_hang()
            deadline = time.monotonic() + self.settle_s
            while self.board.hang_acks() < self.board.world_size and time.monotonic() < deadline:
                time.sleep(0.05)
        except (RuntimeError, OSError) as exc:
            logger.debug("watchdog: cannot settle the hang with the other ranks: %s", exc)

    def describe_hang(self, report: dict) -> str:
        reports: dict[int, dict | None] = {self.global_rank: report}
        if self.board is not None:
            try:
                reports = {r: (json.loads(v) if v else None) for r, v in self.board.read_all().items()}
                reports[self.global_rank] = report
            except (RuntimeError, OSError) as exc:
                logger.debug("watchdog: cannot read the other ranks' progress: %s", exc)
        diagnosis = diagnose_hang(reports, self.global_rank, time.time(), stale_s=3 * self.poll_s + 5)
        limit, key = self.limit()
        return (f"no progress for {report['idle_s']:.0f} s ({key}={limit:g}) on rank {self.global_rank}: "
                f"{diagnosis}. Check the stuck rank's node and log; restart with --resume")
