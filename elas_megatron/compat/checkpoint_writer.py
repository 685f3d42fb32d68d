# SPDX-License-Identifier: Apache-2.0
"""The queue through which megatron-core's checkpoint writers report their results, chosen per save.

``dist_checkpointing``'s ``FileSystemWriterAsync`` collects the results of every save through a queue served by a
``multiprocessing.Manager`` that it spawns at the first save and keeps for the life of the process
(``filesystem_async._get_write_results_queue``). A spawned process starts with the default signal dispositions,
and it is in the worker's process group. torchrun (torch >= 2.8, ``PET_SIGNALS_TO_HANDLE``) forwards SIGTERM and
SIGUSR1 to a worker with ``os.killpg``: the helper dies of the very signal the worker survives to save its stop
checkpoint, which then fails (EOFError on the dead queue). When the signal came during a save, one rank failed
and the other waited in megatron's barrier for ever: a SLURM time-limit warning hung the job (seen in
tests/cluster/test_slurm.py; the signals tests send the signal to the worker alone, which spares the helper).

:func:`start_writer_queue` starts that Manager itself before the first asynchronous save, ignoring the stop
signals (its parent shuts it down at exit; it is SIGKILLed when its parent dies), and gives its queue to
megatron-core.

A synchronous save needs no helper process at all: megatron-core runs its writer function in the training process,
which both puts the results and reads them back, so :func:`use_write_results_queue` gives it a new in-process
``queue.Queue`` per save (a save that failed between the two cannot leave a result for the next one to read). That
also keeps the Manager off the path of every synchronous save: each writer process that megatron-core forks would
otherwise connect to it twice (multiprocessing's after-fork ``incref`` and the ``decref`` at exit), and the Manager
authenticates connections one at a time in a single thread, so one stalled connection would stall every later
writer.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
from multiprocessing.managers import SyncManager

from elas_megatron.utils.lifetime import die_with_parent

__all__ = ["start_writer_queue", "use_write_results_queue"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_manager: SyncManager | None = None
_manager_queue = None  # the Manager's queue proxy


def _ignore_stop_signals(parent_pid: int) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the parent until now (see below)
    # No longer ended by SIGTERM, it must end with its parent: a rank killed by SIGKILL (or OOM) would leave it
    # running, holding the job's output open (slurmstepd then waits 60 s for it).
    die_with_parent(parent_pid)


def start_writer_queue() -> bool:
    """Give megatron-core the write-results queue of a Manager that ignores SIGTERM/SIGUSR1, started on the first
    call.

    Returns:
        True if this call started the Manager; False if it ran already or this megatron-core has no such queue.
    """
    global _manager, _manager_queue
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_results_queue"):
        return False
    started = _manager is None
    if started:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        # NOTE: a signal arriving while the helper interpreter starts would kill it before the initializer runs:
        # keep the signals blocked meanwhile (the child inherits the mask); ours are delivered after the unblock.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            manager.start(initializer=_ignore_stop_signals, initargs=(os.getpid(),))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        _manager, _manager_queue = manager, manager.Queue()
    filesystem_async._results_queue = _manager_queue
    return started


def use_write_results_queue(async_save: bool) -> None:
    """Before a save: the queue megatron-core's writers report to. An asynchronous save writes in a forked process
    and needs the Manager's queue (:func:`start_writer_queue`); a synchronous one gets a new in-process queue."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if async_save:
        start_writer_queue()
    elif hasattr(filesystem_async, "_results_queue"):
        filesystem_async._results_queue = queue.Queue()
