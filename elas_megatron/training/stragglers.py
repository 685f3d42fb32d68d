# SPDX-License-Identifier: Apache-2.0
"""Straggler detection: every N steps the ranks compare their compute time per step, and rank 0 names a slow one.

Why compute time and not step time: in data-parallel training every rank waits for the slowest in the gradient
reduction, so their step times are equal; what differs is the time up to that reduction. :class:`ComputeTimer`
measures a step from its start to megatron's ``finalize_model_grads`` (where the gradients are reduced) -- with
CUDA events on GPUs, so no extra synchronisation -- and :class:`StragglerCheck` averages it over the last
``parallel.straggler_check_every`` steps, all-gathers one float per rank and, on rank 0, logs a warning naming
every rank slower than :data:`FACTOR` times the median. A slow node (thermal throttling, a bad GPU, a noisy
neighbour, a slow data disk) shows up there long before it costs enough throughput to be noticed otherwise.

With pipeline parallelism the stages wait for each other inside the step, so the measure of a rank includes time
spent waiting for a slow stage; a slow rank is then named only when it differs from the others by more than that.
"""
from __future__ import annotations

import logging
import statistics
import time

import torch
import torch.distributed as dist

__all__ = ["FACTOR", "ComputeTimer", "StragglerCheck", "stragglers"]

logger = logging.getLogger(__name__)

FACTOR = 1.2
"""A rank whose compute time per step exceeds this factor times the median is named."""


def stragglers(seconds: list[float], factor: float = FACTOR) -> list[int]:
    """Ranks whose time exceeds ``factor`` times the median of ``seconds`` (one entry per rank), slowest first."""
    median = statistics.median(seconds)
    slow = [r for r, s in enumerate(seconds) if median > 0 and s > factor * median]
    return sorted(slow, key=lambda r: -seconds[r])


class ComputeTimer:
    """Time from :meth:`begin` (step start) to :meth:`mark` (the gradient reduction starts); read with
    :meth:`seconds` after the step synchronised the device. Without a :meth:`mark` in a step (no gradient
    reduction hook ran) the whole step counts."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._begin: float | torch.cuda.Event | None = None
        self._mark: float | torch.cuda.Event | None = None

    def _now(self):
        """A timestamp on the device's timeline: a recorded CUDA event, or the host clock."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self) -> None:
        self._begin, self._mark = self._now(), None

    def mark(self) -> None:
        if self._begin is not None and self._mark is None:
            self._mark = self._now()

    def seconds(self) -> float:
        """The step's compute time (call after the device was synchronised)."""
        end = self._mark if self._mark is not None else self._now()
        if self.cuda:
            if self._mark is None:
                end.synchronize()
            return self._begin.elapsed_time(end) / 1000.0
        return end - self._begin


class StragglerCheck:
    """Collects this rank's compute time per step; every ``every`` steps compares the ranks (collective)."""

    def __init__(self, every: int, *, device: torch.device, world_size: int, global_rank: int,
                 factor: float = FACTOR) -> None:
        self.every = every
        self.device = device
        self.world_size = world_size
        self.global_rank = global_rank
        self.factor = factor
        self._times: list[float] = []
        self.last: list[float] | None = None
        """Every rank's mean compute time per step of the last comparison."""

    @property
    def enabled(self) -> bool:
        return self.every > 0 and self.world_size > 1

    def record(self, step: int, seconds: float) -> list[int]:
        """Add step ``step``'s compute time; on every ``every``-th step compare (all ranks must call it at the same
        steps). Returns the straggling ranks of a comparison (logged on rank 0), else []."""
        if not self.enabled:
            return []
        self._times.append(seconds)
        if step % self.every != 0:
            return []
        mine = torch.tensor([sum(self._times) / len(self._times)], dtype=torch.float64, device=self.device)
        first = step - len(self._times) + 1
        self._times = []
        gathered = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        self.last = [float(t.item()) for t in gathered]
        slow = stragglers(self.last, self.factor)
        if slow and self.global_rank == 0:
            median = statistics.median(self.last)
            slowest = ", ".join(f"rank {r} {self.last[r]:.3f} s" for r in slow[:8])
            logger.warning("straggler: rank %d took %.3f s of compute per step over steps %d-%d, %.2fx the median "
                           "%.3f s of %d ranks (> %gx; parallel.straggler_check_every=%d); slow: %s", slow[0],
                           self.last[slow[0]], first, step, self.last[slow[0]] / median, median, self.world_size,
                           self.factor, self.every, slowest)
        return slow
