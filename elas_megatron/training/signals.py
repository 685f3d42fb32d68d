# SPDX-License-Identifier: Apache-2.0
"""Preemption: turn SIGTERM / SIGUSR1 into "save a checkpoint at the next step boundary and exit cleanly".

SLURM sends SIGTERM when it preempts a job (and SIGKILL after the partition's grace time), and the signal asked
for with ``--signal=USR1@SECONDS`` before the time limit; torchrun forwards both to its workers when launched by
``launch/torchrun.sh`` (``--signals-to-handle``, ``--shutdown-timeout``). The handler only records the signal:
saving from inside a signal handler would interrupt a collective half-way. The trainer polls
:meth:`StopSignal.should_stop` once per step; it all-reduces the signal number (MAX, 0 for none) over every rank, so
all ranks agree to stop after the same step even when the signal reached only some of them (or reached them between
two steps), and a rank that received none can still say which signal stopped the job: torchrun forwards a signal to
each rank a few milliseconds apart, so rank 0, which prints the run's last line, is often not the first to have it.
The requeued job then starts with ``--resume`` and continues from that checkpoint.
"""
from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType

import torch
import torch.distributed as dist

from elas_megatron.utils.interrupts import DEFAULT_SIGNALS

__all__ = ["DEFAULT_SIGNALS", "StopSignal"]

logger = logging.getLogger(__name__)


class StopSignal:
    """Signal handlers plus a rank-agreed ``should_stop()``; a context manager that restores the old handlers.

    Args:
        signals: signal names to catch (default SIGTERM and SIGUSR1).
        group: process group to agree over (default: the whole world).
        check_every: all-reduce only on every N-th call of :meth:`should_stop` (it must then be called the same
            number of times on every rank, which the training loop does); the calls in between return False.

    Attributes:
        received: name of the first signal this process received, or None.
        reason: after :meth:`should_stop` returned True: which signal, e.g. ``"SIGTERM"``; ``"SIGUSR1 on another
            rank"`` when this rank received none (the highest-numbered signal of the ranks that did).
    """

    def __init__(self, signals: Sequence[str] = DEFAULT_SIGNALS, *, group: dist.ProcessGroup | None = None,
                 check_every: int = 1) -> None:
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.group = group
        self.check_every = check_every
        self.received: str | None = None
        self.reason: str | None = None
        self._calls = 0
        self._previous: dict[signal.Signals, object] = {}
        self._signals = [self._lookup(name) for name in signals]
        self.install()

    @staticmethod
    def _lookup(name: str) -> signal.Signals:
        try:
            return signal.Signals[name]
        except KeyError:
            raise ValueError(f"unknown signal {name!r}; use names such as SIGTERM or SIGUSR1") from None

    def install(self) -> None:
        """Install the handlers (only possible in the main thread; elsewhere they are skipped with a warning)."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("StopSignal created outside the main thread: SIGTERM/SIGUSR1 will not be caught")
            return
        for sig in self._signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopSignal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # NOTE: runs between two bytecodes of the main thread: only record, never log or do I/O here.
        if self.received is None:
            self.received = signal.Signals(signum).name

    def _device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        if backend == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def should_stop(self) -> bool:
        """True on every rank once any rank has received a signal. Collective: all ranks must call it equally."""
        if self.reason is not None:
            return True
        self._calls += 1
        if self._calls % self.check_every != 0:
            return False
        received = self.received  # read once: a signal may arrive during the all-reduce
        signum = signal.Signals[received].value if received else 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            agreed = torch.tensor([signum], dtype=torch.int32, device=self._device())
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.group)
            signum = int(agreed.item())
        if not signum:
            return False
        self.reason = received or f"{signal.Signals(signum).name} on another rank"
        logger.warning("stop requested (%s): saving a checkpoint and exiting", self.reason)
        return True
