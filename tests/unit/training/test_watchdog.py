"""The hang watchdog on its own: it fires on no progress (not before, not in unwatched phases), times each phase
with its limit, names the stuck rank(s) by the diagnosis rules, and leaves no thread behind."""
from __future__ import annotations

import re
import threading
import time

import pytest

from elas_megatron.config.schema import start_up_limit
from elas_megatron.training.watchdog import Progress, Watchdog, diagnose_hang


def test_watchdog_fires_on_no_progress_and_not_before():
    """The margins are wide for a loaded machine: progress every 0.3 s against a 2-s limit, an unwatched phase
    0.5 s past it, and a fired message matched for any idle time (a late poll reports 3 s, not 2)."""
    progress, fired = Progress(), []
    with Watchdog(progress, timeout_s=2.0, board=None, global_rank=0, on_hang=fired.append):
        for _ in range(6):  # progress every 0.3 s: never idle long enough
            time.sleep(0.3)
            progress.update(1, "forward")
        assert not fired
        progress.update(2, "checkpoint save", watched=False)  # unwatched phases may take long
        time.sleep(2.5)
        assert not fired
        progress.update(2, "forward")
        deadline = time.monotonic() + 30
        while not fired and time.monotonic() < deadline:
            time.sleep(0.1)
    assert fired and re.search(r"^no progress for \d+ s \(parallel.distributed_timeout_s=2\) on rank 0", fired[0])
    assert "rank 0: step 2 'forward'" in fired[0] and "test_watchdog_fires_on_no_progress" in fired[0]


def _report(step, phase, idle_s, in_collective, wall=100.0):
    return {"step": step, "phase": phase, "idle_s": idle_s, "wall": wall, "in_collective": in_collective,
            "where": "somewhere (x/y.py:1)"}


def test_diagnosis_rules():
    now = 101.0
    # the rank outside a collective is stuck, the waiting ones are not
    reports = {0: _report(3, "forward", 30, True), 1: _report(3, "step start", 31, False),
               2: _report(3, "forward", 30, True)}
    assert diagnose_hang(reports, 0, now, stale_s=10).startswith("stuck rank(s) [1] -- rank 1: step 3 'step start'")
    # a rank that never reported, or stopped reporting (dead, or its process frozen), comes first
    reports[2] = None
    reports[1] = _report(3, "forward", 5, False, wall=50.0)
    text = diagnose_hang(reports, 0, now, stale_s=10)
    assert text.startswith("stuck rank(s) [1, 2]") and "rank 2: no report at all" in text
    assert "(last report 51 s ago)" in text
    # everybody waits (mismatched collectives / an asynchronous backend): the longest idle
    reports = {0: _report(3, "forward", 30, True), 1: _report(2, "optimizer step", 40, True)}
    assert diagnose_hang(reports, 0, now, stale_s=10).startswith("stuck rank(s) [1]")


@pytest.mark.parametrize("distributed, io, want", [
    (2, 3, (3, "parallel.io_timeout_s")),                     # the usual order: io the longer
    (120, 20, (120, "parallel.distributed_timeout_s")),      # a short I/O limit (to catch stalled saves)
    (60, 60, (60, "parallel.io_timeout_s")),                   # a tie names the I/O limit
])
def test_start_up_is_timed_with_the_longer_limit(distributed, io, want):
    """Also how long ranks wait for each other to start (parallel/setup.py)."""
    assert start_up_limit(distributed, io) == want


def test_each_phase_is_timed_with_its_limit():
    progress = Progress()
    dog = Watchdog(progress, timeout_s=120, io_timeout_s=20, board=None, global_rank=0)
    for kind, want in [("collective", (120, "parallel.distributed_timeout_s")),
                       ("io", (20, "parallel.io_timeout_s")),
                       ("start-up", (120, "parallel.distributed_timeout_s"))]:
        progress.update(4, "a phase", limit=kind)
        assert dog.limit() == want, kind


def test_a_change_of_limit_is_announced_once():
    """The trainer sets the process groups' collective timeout from these calls: once per change, not per step."""
    seen = []
    progress = Progress(on_limit=seen.append)
    for kind in ["collective", "start-up", "start-up", "collective", "collective", "io", "collective"]:
        progress.update(1, "a phase", limit=kind)
    assert seen == ["start-up", "collective", "io", "collective"]


@pytest.mark.parametrize("timeout_s, io_timeout_s", [(8, 3600), (600, 3600), (120, 20), (0.5, 0.5)])
def test_collectives_time_out_after_the_watchdog_has_ended_the_job(timeout_s, io_timeout_s):
    """A collective's timeout in each phase is past the moment the watchdog at the latest ends the job: its limit,
    one poll to notice, the settling wait (2 polls + 2 s)."""
    dog = Watchdog(Progress(), timeout_s=timeout_s, io_timeout_s=io_timeout_s, board=None, global_rank=0)
    for kind in ("collective", "io", "start-up"):
        latest_end = dog.limit(kind)[0] + dog.poll_s + (2 * dog.poll_s + 2.0)
        assert latest_end + 2.0 < dog.collective_timeout(kind) <= 2 * latest_end, kind
    assert dog.collective_timeout() == dog.collective_timeout("collective")


def test_a_save_past_the_io_limit_fires_naming_it():
    progress, fired = Progress(), []
    with Watchdog(progress, timeout_s=600, io_timeout_s=0.5, board=None, global_rank=0, on_hang=fired.append):
        progress.update(4, "checkpoint save", limit="io")
        deadline = time.monotonic() + 30
        while not fired and time.monotonic() < deadline:
            time.sleep(0.1)
    assert fired and "(parallel.io_timeout_s=0.5) on rank 0" in fired[0] and "step 4 'checkpoint save'" in fired[0]


def test_the_watchdog_restarts():
    dog = Watchdog(Progress(), timeout_s=60, board=None, global_rank=0, on_hang=lambda message: None)
    for _ in range(2):
        dog.start()
        assert dog.running
        dog.stop()
        assert not dog.running
    assert "elas-watchdog" not in {t.name for t in threading.enumerate()}


def test_watchdog_thread_is_gone_after_training():
    before = {t.name for t in threading.enumerate()}
    with Watchdog(Progress(), timeout_s=60, board=None, global_rank=0, on_hang=lambda message: None):
        assert "elas-watchdog" in {t.name for t in threading.enumerate()}
    assert {t.name for t in threading.enumerate()} == before


class _Board:
    """The ProgressBoard protocol over one dict shared by every in-process "rank" (the torchrun store's role)."""

    def __init__(self, shared: dict, rank: int, world_size: int) -> None:
        self.shared, self.global_rank, self.world_size = shared, rank, world_size

    def post(self, value: str) -> None:
        self.shared[self.global_rank] = value

    def read_all(self) -> dict:
        return {r: self.shared.get(r) for r in range(self.world_size)}

    def declare_hang(self) -> None:
        self.shared.setdefault("hang", self.global_rank)

    def hang_declared(self) -> bool:
        return "hang" in self.shared

    def acknowledge_hang(self) -> int:
        self.shared["acks"] = self.shared.get("acks", 0) + 1
        return self.shared["acks"]

    def hang_acks(self) -> int:
        return self.shared.get("acks", 0)


def test_every_rank_diagnoses_a_hang_before_any_exits():
    """Rank 1 stops; rank 0 keeps making progress far below its timeout, yet diagnoses as soon as rank 1's
    watchdog declares the hang, and rank 1 waits for that before it ends (its exit would otherwise break rank
    0's collectives first)."""
    shared, events = {}, []
    stuck, busy = Progress(), Progress()
    dogs = [Watchdog(busy, timeout_s=60.0, board=_Board(shared, 0, 2), global_rank=0,
                     on_hang=lambda m: events.append((0, m, shared.get("acks")))),
            Watchdog(stuck, timeout_s=1.0, board=_Board(shared, 1, 2), global_rank=1,
                     on_hang=lambda m: events.append((1, m, shared.get("acks"))))]
    dogs[0].poll_s = dogs[1].poll_s = 0.2
    stuck.update(3, "step start")
    with dogs[0], dogs[1]:
        deadline = time.monotonic() + 30
        while len(events) < 2 and time.monotonic() < deadline:
            busy.update(3, "forward")
            time.sleep(0.05)
    assert sorted(rank for rank, _, _ in events) == [0, 1], events
    assert all(acks == 2 for _, _, acks in events), events  # nobody ended before both had diagnosed
    assert all("rank 1: step 3 'step start'" in m for _, m, _ in events), events  # both name the stuck rank
