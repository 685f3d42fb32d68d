"""Run a test's child process (often ``torchrun``) so that a timeout ends the whole process tree.

``subprocess.run(..., timeout=)`` kills only the direct child: a timed-out ``torchrun`` leaves its rank processes
running, and on a 2-core CI machine they slow every later test until those time out too. Here the child starts
a session of its own and a timeout kills that session's process group before the error is raised.
"""
from __future__ import annotations

import os
import signal
import subprocess


def run(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` with ``start_new_session=True``; on timeout the child's process group is killed."""
    if kwargs.pop("capture_output", False):
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with subprocess.Popen(cmd, start_new_session=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            kill_group(proc)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(proc.args, timeout, output=out, stderr=err) from exc
        except BaseException:
            kill_group(proc)
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group that ``proc`` leads (it was started with ``start_new_session=True``)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
