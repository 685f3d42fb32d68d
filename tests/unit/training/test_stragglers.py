"""The straggler rule: ranks above 1.2x the median of the ranks' compute times, slowest first; the timer measures up
to the mark (the gradient reduction), or the whole step without one."""
from __future__ import annotations

import time

import torch

from elas_megatron.training.stragglers import ComputeTimer, StragglerCheck, stragglers


def test_the_rule():
    assert stragglers([1.0, 1.0, 1.0, 1.0]) == []
    assert stragglers([1.0, 1.19, 1.0, 1.0]) == []
    assert stragglers([1.0, 1.5, 1.0, 2.0]) == [3]  # median 1.25: 2.0 > 1.5 (1.2x), 1.5 is not
    assert stragglers([1.0, 1.6, 1.0, 2.0, 1.0]) == [3, 1]  # slowest first
    assert stragglers([0.2, 0.6]) == [1]  # two ranks: the median is their mean
    assert stragglers([0.0, 0.0]) == []


def test_the_timer_stops_at_the_mark():
    timer = ComputeTimer(torch.device("cpu"))
    t0 = time.perf_counter()
    timer.begin()
    time.sleep(0.05)
    timer.mark()
    t1 = time.perf_counter()
    time.sleep(0.1)
    assert 0.045 < timer.seconds() <= t1 - t0  # bounded by the test's own clock, however late a sleep returns
    timer.begin()
    time.sleep(0.02)
    assert timer.seconds() >= 0.02  # no mark: the whole step


def test_one_process_or_off_compares_nothing():
    check = StragglerCheck(2, device=torch.device("cpu"), world_size=1, global_rank=0)
    assert not check.enabled and check.record(2, 1.0) == [] and check.last is None
    assert not StragglerCheck(0, device=torch.device("cpu"), world_size=8, global_rank=0).enabled
