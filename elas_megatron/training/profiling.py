# SPDX-License-Identifier: Apache-2.0
"""Profiling a few training steps, as a callback: a torch.profiler trace (``log.profile_steps``) and a CUDA memory
snapshot (``log.memory_snapshot_step``), one file per rank in ``{run_dir}/profile/``.

* ``trace_rank<R>_steps<from>-<to>.json``: Chrome/Perfetto trace JSON of steps from..to (CPU ops, and CUDA kernels
  on GPU; shapes and Python stacks are not recorded, which keeps the file small and the steps' timing close to
  unprofiled). Open it in https://ui.perfetto.dev or chrome://tracing.
* ``memory_snapshot_rank<R>_step<S>.pickle``: the CUDA caching allocator's state and the history of its
  allocations during step S (``torch.cuda.memory._record_memory_history`` / ``_dump_snapshot``); open it in
  https://pytorch.org/memory_viz. On CPU the snapshot is skipped (a log line says so).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from elas_megatron.training.callbacks import Callback

__all__ = ["Profiler"]

logger = logging.getLogger(__name__)


class Profiler(Callback):
    """Traces training steps ``profile_steps[0]..profile_steps[1]`` (1-based, inclusive) and snapshots CUDA memory
    during step ``memory_snapshot_step``; ``rank`` names the files."""

    def __init__(self, run_dir: str | Path, *, rank: int, device: torch.device,
                 profile_steps: list[int] | tuple[int, int] | None = None,
                 memory_snapshot_step: int | None = None) -> None:
        self.dir = Path(run_dir) / "profile"
        self.rank = rank
        self.device = device
        self.steps = tuple(profile_steps) if profile_steps else None
        self.snapshot_step = memory_snapshot_step
        if self.snapshot_step is not None and device.type != "cuda":
            if rank == 0:
                logger.info("log.memory_snapshot_step=%d skipped: CUDA memory snapshots need a CUDA device (this run "
                            "is on %s)", self.snapshot_step, device.type)
            self.snapshot_step = None
        self._prof = None
        self._recording_memory = False
        self.trace_path: Path | None = None
        self.snapshot_path: Path | None = None

    def on_step_begin(self, trainer, step: int) -> None:
        if self.steps is not None and step == self.steps[0]:
            self._start_trace()
        if step == self.snapshot_step:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
            self._recording_memory = True

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        if self._prof is not None and step >= self.steps[1]:
            self._stop_trace()
        if self._recording_memory and step >= self.snapshot_step:
            self._dump_snapshot(step)

    def on_train_end(self, trainer) -> None:  # stopped before the range ended (preemption, error): keep what ran
        if self._prof is not None:
            self._stop_trace()
        if self._recording_memory:
            self._dump_snapshot(trainer.step)

    def _start_trace(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=False, with_stack=False,
                                            profile_memory=False)
        self._prof.start()

    def _stop_trace(self) -> None:
        prof, self._prof = self._prof, None
        prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.trace_path = self.dir / f"trace_rank{self.rank}_steps{self.steps[0]}-{self.steps[1]}.json"
        prof.export_chrome_trace(str(self.trace_path))
        if self.rank == 0:
            logger.info("profiler trace of steps %d-%d written to %s (one per rank)", self.steps[0], self.steps[1],
                        self.trace_path)

    def _dump_snapshot(self, step: int) -> None:
        self._recording_memory = False
        self.dir.mkdir(parents=True, exist_ok=True)
        self.snapshot_path = self.dir / f"memory_snapshot_rank{self.rank}_step{step}.pickle"
        torch.cuda.memory._dump_snapshot(str(self.snapshot_path))
        torch.cuda.memory._record_memory_history(enabled=None)
        if self.rank == 0:
            logger.info("CUDA memory snapshot of step %d written to %s (one per rank)", step, self.snapshot_path)
