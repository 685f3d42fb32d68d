# SPDX-License-Identifier: Apache-2.0
"""Keep megatron-core's checkpoint-writer helper process alive through the stop signals (SIGTERM, SIGUSR1).

``dist_checkpointing``'s ``FileSystemWriterAsync`` collects the results of every save through a queue served by a
``multiprocessing.Manager`` that it spawns at the first save and keeps for the life of the process
(``filesystem_async._get_write_results_queue``). A spawned process starts with the default signal dispositions,
and it is in the worker's process group. torchrun (torch >= 2.8, ``PET_SIGNALS_TO_HANDLE``) forwards SIGTERM and
SIGUSR1 to a worker with ``os.killpg``: the helper dies of the very signal the worker survives to save its stop
checkpoint, which then fails (EOFError on the dead queue). When the signal came during a save, one rank failed
and the other waited in megatron's barrier for ever: a SLURM time-limit warning hung the job (seen in
tests/cluster/test_slurm.py; the signals tests send the signal to the worker alone, which spares the helper).

:func:`start_writer_queue` starts that Manager itself before the first save, ignoring the stop signals (its
parent shuts it down at exit; it is SIGKILLed when its parent dies), and gives its queue to megatron-core.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
from multiprocessing.managers import SyncManager

__all__ = ["start_writer_queue"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_manager: SyncManager | None = None


def _ignore_stop_signals(parent_pid: int) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the parent until now (see below)
    # No longer ended by SIGTERM, it must end with its parent: a rank killed by SIGKILL (or OOM) would leave it
    # running, holding the job's output open (slurmstepd then waits 60 s for it).
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(0)


def start_writer_queue() -> bool:
    """Create megatron-core's write-results queue in a Manager that ignores SIGTERM/SIGUSR1; idempotent.

    Returns:
        True if this call created it; False if it existed already or this megatron-core has no such queue.
    """
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is not None:
        return False
    manager = SyncManager(ctx=mp.get_context("spawn"))
    # NOTE: a signal arriving while the helper interpreter starts would kill it before the initializer runs:
    # keep the signals blocked meanwhile (the child inherits the mask); ours are delivered after the unblock.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        manager.start(initializer=_ignore_stop_signals, initargs=(os.getpid(),))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    filesystem_async._results_queue = manager.Queue()
    _manager = manager
    return True
