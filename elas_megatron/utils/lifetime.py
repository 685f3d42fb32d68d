# SPDX-License-Identifier: Apache-2.0
"""Processes that a rank forks die with it, also when the rank itself is SIGKILLed (OOM killer, ``kill -9``).

megatron-core's checkpoint save forks writer processes and waits for them in ``JoinableQueue.join()``. When the
rank is killed during that wait, the last writer to finish blocks for ever in ``task_done()``: multiprocessing's
``Condition.notify_all`` waits for the dead sleeper to acknowledge. The orphan keeps the job's stdout/stderr
open, so under SLURM the killed job stayed COMPLETING for two minutes before it ended (tests/cluster/test_slurm.py
kills a rank during a save); with a plain ``torchrun`` the orphan lives on after the job. A parent-death signal
set in every child forked by the training process ends such orphans with their parent, whatever forked them
(megatron's writers, DataLoader workers).

The kernel sends the parent-death signal when the *thread* that forked exits, not the process: only children
forked from the main thread get it (a thread that forks and then ends would otherwise kill its children).
Linux only; elsewhere this does nothing.
"""
from __future__ import annotations

import ctypes
import functools
import os
import signal
import threading

__all__ = ["die_with_parent", "forked_children_die_with_this_process"]

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """In a child: be SIGKILLed when the parent (``parent_pid``) dies; exit at once if it died already."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)


@functools.cache  # register the fork hooks once per process
def forked_children_die_with_this_process() -> None:
    """From now on, every child this process forks from its main thread is SIGKILLed when this process dies."""
    forking = threading.local()  # per thread: in the child, the forking thread is the only one

    def before() -> None:
        forking.parent = os.getpid() if threading.current_thread() is threading.main_thread() else None

    def after_in_child() -> None:
        if getattr(forking, "parent", None) is not None:
            die_with_parent(forking.parent)

    os.register_at_fork(before=before, after_in_child=after_in_child)
