# SPDX-License-Identifier: Apache-2.0
"""SIGTERM / SIGUSR1 before the training loop: stop cleanly instead of dying half-way through a write.

A job can be preempted at any moment, also while it starts (parallel initialisation, the dataset index build, the
model build, the checkpoint load). The training loop has its own handler
(:class:`elas_megatron.training.signals.StopSignal`: save a checkpoint at the next step boundary); before it,
:class:`StartupSignals` turns the signal into an :class:`Interrupted` exception raised in the main thread, so
every ``with``/``finally`` on the way out runs (locks released, temporary files removed) and the entry point
prints one line and exits with ``128 + signal number`` (143 for SIGTERM), as a shell reports a process ended by
the signal.

Writes that must not be cut half-way run inside :func:`deferred`: a signal arriving there is held until the block
ends, then raised. Small writes only (a config file, a probe file, one metrics record): the wait must stay short
next to a scheduler's grace time. Longer writes protect themselves instead (temporary name + rename, or clean-up
on the way out, e.g. the dataset index cache).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from types import FrameType

__all__ = ["Interrupted", "StartupSignals", "deferred", "exit_code"]

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")


class Interrupted(BaseException):
    """A stop signal arrived while the program started. A ``BaseException`` (like ``KeyboardInterrupt``), so that
    ``except Exception`` handlers on the way out do not swallow it.

    Attributes:
        signal_name: e.g. ``"SIGTERM"``.
        where: what the program was doing, when known (set by the code it passes through, e.g. the trainer).
    """

    def __init__(self, signal_name: str, where: str | None = None) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.where = where


def exit_code(signal_name: str) -> int:
    """``128 + N`` for signal ``signal_name``: what a shell reports for a process the signal ended."""
    return 128 + int(signal.Signals[signal_name])


class _State:
    active: StartupSignals | None = None
    depth = 0  # nesting of deferred()
    pending: str | None = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a stop signal until the block ends (then raise :class:`Interrupted`); a no-op without an active
    :class:`StartupSignals`, and in threads other than the main one (signals are handled in the main thread)."""
    _State.depth += 1
    try:
        yield
    except BaseException:
        _State.depth -= 1
        raise
    _State.depth -= 1
    if _State.depth == 0 and _State.pending is not None and _State.active is not None:
        name, _State.pending = _State.pending, None
        raise Interrupted(name)


class StartupSignals:
    """Context manager: while it is active (and no other handler replaced its own), SIGTERM / SIGUSR1 raise
    :class:`Interrupted` in the main thread -- at once, or at the end of a :func:`deferred` block. The previous
    handlers come back on exit. Handlers installed inside it (the training loop's
    :class:`~elas_megatron.training.signals.StopSignal`) take over until they restore this one."""

    def __init__(self, signals: Sequence[str] = DEFAULT_SIGNALS) -> None:
        self._signals = [signal.Signals[name] for name in signals]
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StartupSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        _State.active, _State.pending = self, None
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        _State.active, _State.pending = None, None

    @staticmethod
    def _handle(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if _State.depth > 0:
            _State.pending = _State.pending or name
            return
        raise Interrupted(name)
