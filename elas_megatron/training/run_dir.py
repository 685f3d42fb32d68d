"""The run directory (``train.run_dir``): one job at a time, and a bad path stopped in one line at start-up.

Rank 0 of a job creates the directory and takes an exclusive advisory lock on ``{run_dir}/.lock``
(``fcntl.flock``) before anything is written there, and holds it while the process lives: the file stays open,
and holds ``pid@host`` of the holder. A second job on the same directory stops at start-up naming the lock file
and the holder. The kernel drops the lock when the holding process ends, however it ends (kill -9 included), so a
stale lock file of a dead job is simply free. Processes forked by the holder (e.g. checkpoint writers) do not keep
the lock: their copy of the descriptor is closed in the child.

:func:`prepare_run_dir` is the collective start-up step the trainer calls: every rank raises the same
:class:`RunDirError` when rank 0 cannot create, write or lock the directory.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Callable

from elas_megatron.parallel.setup import rank_errors
from elas_megatron.utils.errors import ConfigError

LOCK_NAME = ".lock"


class RunDirError(ConfigError):
    """``train.run_dir`` cannot be used: not creatable, not writable, or in use by another job."""


def _oneline(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


class RunDirLock:
    """An exclusive ``flock`` on ``{run_dir}/.lock``, held while this object (or the process) lives.

    :meth:`acquire` in a process that already holds the lock of that directory returns the held lock (one
    process is one job: several trainers of one program may share a directory, one after the other); it is
    released when :meth:`release` was called once per :meth:`acquire`, or when the process ends.
    """

    _held: dict[str, RunDirLock] = {}

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd
        self.holders = 1

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunDirLock:
        """Create ``run_dir`` if needed and lock it. Raises :class:`RunDirError` (one line naming the path)
        when the directory cannot be created or written, or another process holds the lock."""
        run_dir = Path(run_dir)
        path = run_dir / LOCK_NAME
        key = os.path.realpath(path)
        if key in cls._held:
            cls._held[key].holders += 1
            return cls._held[key]
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise RunDirError(f"cannot use train.run_dir={run_dir}: {_oneline(exc)}; choose a writable directory "
                              "(not under a file)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            try:
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
            except OSError:
                pass
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"cannot lock {path} (train.run_dir): {_oneline(exc)}; use a run_dir on a file "
                                  "system with flock support") from None
            raise RunDirError(f"train.run_dir={run_dir} is in use by another job ({'process ' + holder if holder else 'a process'} holds "
                              f"{path}); use another train.run_dir, or wait until that job ends") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)  # releases the lock
            raise RunDirError(f"cannot write {path} (train.run_dir): {_oneline(exc)}; choose a writable "
                              "directory with free space") from None
        lock = cls(path, fd)
        cls._held[key] = lock
        return lock

    def release(self) -> None:
        """Unlock and close once every :meth:`acquire` of this process released (also done by the kernel when
        the process ends)."""
        self.holders -= 1
        if self.fd < 0 or self.holders > 0:
            return
        RunDirLock._held.pop(os.path.realpath(self.path), None)
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1

    @classmethod
    def _forget_in_child(cls) -> None:
        """After fork, in the child: close the inherited descriptors without unlocking (the parent keeps the
        lock; the child must neither hold it after the parent dies nor release it)."""
        for lock in cls._held.values():
            try:
                os.close(lock.fd)
            except OSError:
                pass
            lock.fd = -1
        cls._held.clear()


os.register_at_fork(after_in_child=RunDirLock._forget_in_child)


def prepare_run_dir(run_dir: str | Path, *, is_owner: bool,
                    then: Callable[[Path], None] | None = None) -> RunDirLock | None:
    """Collective when a process group exists: the owner (global rank 0) creates and locks ``run_dir``, then
    calls ``then(run_dir)`` (e.g. writes the resolved config); if any of it fails, every rank raises the same
    :class:`RunDirError`. Returns the lock on the owner, None elsewhere."""
    lock, error = None, None
    if is_owner:
        try:
            lock = RunDirLock.acquire(run_dir)
            if then is not None:
                then(Path(run_dir))
        except RunDirError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"cannot write into train.run_dir={run_dir}: {_oneline(exc)}; choose a writable directory " \
                    "with free space"
        if error and lock is not None:
            lock.release()
            lock = None
    failed = rank_errors(error)
    if failed:
        raise RunDirError(failed[0][1])
    return lock
