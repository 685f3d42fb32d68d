"""Checkpoints through Megatron-Core ``dist_checkpointing``, written so that a crash never leaves a broken "latest".

Layout of ``checkpoint.dir``::

    step_00000100/          one complete checkpoint (dist_checkpointing files + elas_meta.json)
    latest                  text file naming the newest complete step directory
    .step_00000200.tmp/     a save in progress (ignored on load, removed by the next save)
    .step_00000050.old/     a pruned checkpoint being deleted (ignored, removed by the next save)

A save goes to the temporary directory; only when every rank has finished writing does rank 0 add
``elas_meta.json``, flush everything to disk (fsync of the files and directories), rename the directory into
place and replace ``latest`` atomically (``os.replace``). A process killed at any point therefore leaves either
the previous checkpoint as latest or the new one complete. ``latest`` is trusted only when it names a complete
directory; otherwise (removed by hand, or a re-save of the same step killed between removing the old copy and
renaming the new one) loading falls back to the newest complete ``step_*`` directory. Old checkpoints are
renamed out of the ``step_*`` namespace before they are deleted, so a half-deleted one is never loaded.
Sharded tensors are keyed by global shape, so a checkpoint saved with one TP/PP layout loads into another.
Before publishing, rank 0 writes ``manifest.json`` (size and sha256 of every other file); every load verifies it and
vets the pickled parts so that nothing in a checkpoint can run code (:mod:`elas_megatron.training.checkpoint_trust`).
State that only exists per rank (DeepSpeed ZeRO optimizer partitions, under ``zero/``) is written by every rank
into the same temporary directory before it is published, so it is covered by the same atomicity.

Failures are collective: any rank that cannot write (unwritable directory, disk full, a write error in any
rank's files) makes every rank raise the same :class:`CheckpointError`, which names the rank(s) and the error;
the temporary directory is removed and the previous checkpoints stay as they were. The directory is also
probed once at start-up (:meth:`CheckpointManager.check_writable`), and before each save the free space is
compared with the size of the previous checkpoint.

Asynchronous saves (``checkpoint.async_save``): ``dist_checkpointing.save(..., async_sharded_save=True)`` plans the
save and serialises the small objects on every rank, then megatron's ``AsyncCallsQueue`` forks a writer process
that writes this rank's shards from a snapshot taken when the save was scheduled (device tensors are copied to
host memory first; on CPU the fork itself is the snapshot), and training goes on. :meth:`CheckpointManager.poll`,
called once per step, asks every rank (one all-reduce) whether all writers are done; only then is the save
finalised: megatron's metadata, and the publish above (``elas_meta.json``, fsync, rename, ``latest``, pruning).
Write errors surface there as the same collective :class:`CheckpointError`. :meth:`CheckpointManager.wait` blocks
until a pending save is published; the next save, the end of training and the preemption path call it.

RNG states: :func:`get_rng_state` collects this process's Python, NumPy, torch CPU and CUDA generators and
megatron's CUDA RNG tracker streams; :func:`rng_sharded_object` files them under one ``rng_state`` object sharded
over (pp, tp, dp) ranks, one shard per rank (every rank its own main replica), so each rank writes and reads its
own. They are restored only into the same (pp, tp, dp) layout.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from elas_megatron.compat.checkpoint_writer import use_write_results_queue
from elas_megatron.compat.upstream_warnings import dist_checkpoint_load_warnings_ignored
from elas_megatron.parallel.setup import rank_errors
from elas_megatron.training.checkpoint_trust import (read_json, resolve_latest, verify_manifest, vet_checkpoint,
                                                     write_manifest)
from elas_megatron.utils.errors import CheckpointError
from elas_megatron.utils.interrupts import deferred

logger = logging.getLogger(__name__)

META = "elas_meta.json"
SPACE_MARGIN = 1.1
"""A save is refused up front when the free space is below this factor times the previous checkpoint's size."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _agree(error: str | None, what: str) -> None:
    """Collective: raise the same :class:`CheckpointError` on every rank if any rank passes an ``error``."""
    failed = rank_errors(error)
    if failed:
        ranks = "; ".join(f"rank {rank}: {e}" for rank, e in failed[:4]) + (" ..." if len(failed) > 4 else "")
        raise CheckpointError(f"{what}: {ranks}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _oneline(exc: BaseException) -> str:
    """The useful line of a (possibly wrapped, multi-rank) dist_checkpointing exception."""
    if isinstance(exc, CheckpointException):  # failures: {rank: (exception, traceback)}, on the coordinating rank
        if not exc.failures:
            return "failed on another rank (the rank that coordinates the save has the details)"
        rank, (first, _) = next(iter(exc.failures.items()))
        return f"failed on rank(s) {sorted(exc.failures)}, e.g. rank {rank}: {type(first).__name__}: {first}"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"


# ------------------------------------------------------------------------------------------------ RNG states
RNG_KEY = "rng_state"


def get_rng_state() -> dict:
    """This process's random generators: Python ``random``, NumPy's global one, torch CPU, torch CUDA (when
    CUDA is available) and megatron-core's CUDA RNG tracker streams (on CPU the tracker's stand-in generators,
    see :mod:`elas_megatron.compat.cpu`). Copies, so later draws do not change the returned state."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    return {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": {name: state.clone() for name, state in tracker.items()},
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def set_rng_state(state: dict) -> bool:
    """Restore what :func:`get_rng_state` returned. The CUDA generator and the tracker streams are restored only
    when the state was saved on the same kind of device (their formats differ between CPU and CUDA); returns
    whether they were."""
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["device"] != ("cuda" if torch.cuda.is_available() else "cpu"):
        return False
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))
    return True


def rng_sharded_object(state: dict | None, *, pp_rank: int, pp_size: int, tp_rank: int, tp_size: int,
                       dp_rank: int, dp_size: int):
    """``state`` as a ``ShardedObject`` with one shard per (pp, tp, dp) rank, each rank its own main replica, so
    that every rank writes (and reads back) its own generators. A checkpoint of another layout has other shards:
    load it only into the same layout (``state`` may be None when loading)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(RNG_KEY, state, (pp_size, tp_size, dp_size), (pp_rank, tp_rank, dp_rank), replica_id=0)


@dataclass
class _PendingSave:
    """An asynchronous save whose files are being written; published by :meth:`CheckpointManager.finalize`."""

    step: int
    tmp: Path
    final: Path
    meta: dict
    what: str


class CheckpointManager:
    """Step-numbered, atomically published checkpoints in one directory.

    Args:
        directory: ``checkpoint.dir``.
        keep_last: keep the newest K checkpoints (0 = all).
        global_rank: this process; rank 0 creates, publishes and prunes.
        on_phase: called as ``on_phase(phase, step)`` at ``begin``, ``scheduled`` (``async_save`` only:
            background writers started), ``written`` (all files written, not yet published) and ``published``
            (rank 0: renamed into place, ``latest`` not yet updated) -- the points where a crash leaves distinct
            states on disk (the trainer passes them to its callbacks' ``on_checkpoint_phase``).
        async_save: write the files in background processes (``checkpoint.async_save``); :meth:`save` returns
            once they are scheduled, :meth:`poll` / :meth:`wait` publish the checkpoint when every rank is done.
    """

    def __init__(self, directory: str | Path, *, keep_last: int, global_rank: int,
                 on_phase: Callable[[str, int], None] | None = None, async_save: bool = False) -> None:
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.is_writer = global_rank == 0
        self.on_phase = on_phase
        self.async_save = async_save
        self._calls = None  # megatron's AsyncCallsQueue, created by the first asynchronous save
        self._pending: _PendingSave | None = None

    @property
    def pending(self) -> Path | None:
        """The step directory an asynchronous save is still writing (not yet published), else None."""
        return self._pending.final if self._pending is not None else None

    @staticmethod
    def step_name(step: int) -> str:
        return f"step_{step:08d}"

    def complete_steps(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return sorted(p for p in self.dir.glob("step_*") if p.is_dir() and (p / META).is_file())

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, else the newest complete one (with a warning), else None."""
        pointer = self.dir / "latest"
        path = resolve_latest(self.dir)  # refuses a pointer out of the directory
        if path is not None and (path / META).is_file():
            return path
        steps = self.complete_steps()
        if pointer.is_file() or steps:
            logger.warning("%s %s; using the newest complete checkpoint: %s", pointer,
                           "names an incomplete or missing checkpoint" if pointer.is_file() else "is missing",
                           steps[-1].name if steps else None)
        return steps[-1] if steps else None

    @staticmethod
    def read_meta(path: str | Path) -> dict:
        meta = Path(path) / META
        if not meta.is_file():
            raise CheckpointError(f"{path} is not a complete elas-megatron checkpoint (no {META})")
        value = read_json(meta)
        if not isinstance(value.get("config"), dict):
            raise CheckpointError(f"{meta}: no 'config' object; the file is damaged (resume from an older step_* "
                                  "directory)")
        return value

    def check_writable(self) -> None:
        """Collective, at start-up: create the directory and write a probe file, so that a bad ``checkpoint.dir``
        stops the run before it trains, not at its first save."""
        error = None
        if self.is_writer:
            probe = self.dir / ".write_probe"
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                with deferred():  # a stop signal at start-up never leaves the probe behind
                    probe.write_text("ok")
                    probe.unlink()
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
        _agree(error, f"cannot write checkpoints to {self.dir} (checkpoint.dir); fix its permissions/space or set "
                      "another checkpoint.dir")

    def _prepare(self, tmp: Path) -> None:
        """Rank 0: fresh temporary directory, leftovers of killed saves/prunes removed, enough free space."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for leftover in list(self.dir.glob(".step_*.tmp")) + list(self.dir.glob(".step_*.old")):
            shutil.rmtree(leftover, ignore_errors=True)
        steps = self.complete_steps()
        if steps:
            need = _dir_bytes(steps[-1]) * SPACE_MARGIN
            free = shutil.disk_usage(self.dir).free
            if free < need:
                raise OSError(errno.ENOSPC, f"{free / 2**30:.2f} GiB free, but the previous checkpoint "
                                            f"({steps[-1].name}) took {need / SPACE_MARGIN / 2**30:.2f} GiB")
        tmp.mkdir()

    def save(self, step: int, sharded_state_dict: dict, meta: dict,
             write_local: Callable[[Path], None] | None = None) -> Path:
        """Write ``sharded_state_dict`` for ``step`` atomically; all ranks must call it.

        ``write_local(directory)``, if given, runs on every rank after the sharded save and before the directory
        is published, for state that lives per rank (DeepSpeed's ZeRO optimizer partitions). With ``async_save``
        the sharded files are written in the background and the checkpoint is published later by :meth:`poll` or
        :meth:`wait`; a save still pending from before is waited for first (one save at a time).

        Returns:
            The step directory (with ``async_save``: where it will be once published).

        Raises:
            CheckpointError: on every rank, if any rank failed; nothing is published and the previous
                checkpoints are untouched (with ``async_save``, also raised by :meth:`poll` / :meth:`wait`).
        """
        from megatron.core import dist_checkpointing

        self.wait()
        final = self.dir / self.step_name(step)
        tmp = self.dir / f".{final.name}.tmp"
        what = (f"checkpoint {final.name} could not be written to {self.dir}; the previous checkpoints are intact. "
                "Free space / fix the directory (or set checkpoint.dir) and restart with --resume")
        if self.on_phase is not None:
            self.on_phase("begin", step)
        error = None
        if self.is_writer:
            try:
                self._prepare(tmp)
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
        _agree(error, what)
        error, request = None, None
        use_write_results_queue(self.async_save)  # megatron's own helper would die of SIGTERM/SIGUSR1
        try:
            request = dist_checkpointing.save(sharded_state_dict, str(tmp), async_sharded_save=self.async_save)
            if write_local is not None:
                write_local(tmp)
        except (Exception, CheckpointException) as exc:  # noqa: BLE001
            # every write failure must reach the other ranks instead of hanging them (CheckpointException, which
            # dist_checkpointing raises on every rank when one rank's files fail, is a BaseException)
            error = _oneline(exc)
        pending = _PendingSave(step, tmp, final, dict(meta, step=step), what)
        if not self.async_save:
            self._finish(pending, error)
            return final
        try:
            _agree(error, what)  # planning failed somewhere: schedule nothing
        except CheckpointError:
            if self.is_writer:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self._calls is None:
            from megatron.core.dist_checkpointing.strategies import async_utils

            self._calls = async_utils.AsyncCallsQueue(persistent=False)  # a forked writer per save: a snapshot
        try:
            self._calls.schedule_async_request(request)
        except Exception as exc:  # noqa: BLE001  e.g. no memory to fork: the other ranks must hear of it
            error = _oneline(exc)
        try:
            _agree(error, what)
        except CheckpointError:
            self._kill_writers()
            if self.is_writer:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._pending = pending
        if self.on_phase is not None:
            self.on_phase("scheduled", step)
        logger.info("checkpoint %s: writing in the background", final.name)
        return final

    def poll(self) -> bool:
        """Publish a pending asynchronous save if every rank has finished writing it; collective (one all-reduce
        while a save is pending, nothing otherwise). Returns True when nothing is pending any more.

        Raises:
            CheckpointError: the pending save failed on some rank (on every rank).
        """
        return self.finalize(blocking=False)

    def wait(self) -> None:
        """Block until a pending asynchronous save is written and published; collective. No-op without one.

        Raises:
            CheckpointError: the pending save failed on some rank (on every rank).
        """
        self.finalize(blocking=True)

    def finalize(self, blocking: bool) -> bool:
        """:meth:`poll` (``blocking=False``) or :meth:`wait` (``blocking=True``)."""
        if self._pending is None:
            return True
        error = None
        try:
            done = bool(self._calls.maybe_finalize_async_calls(blocking=blocking))
        except (Exception, CheckpointException) as exc:  # noqa: BLE001  raised on every rank (see save)
            error, done = _oneline(exc), True
        if not done:
            return False
        pending, self._pending = self._pending, None
        self._finish(pending, error)
        return True

    def _kill_writers(self) -> None:
        """Stop this rank's background writers of a save that failed elsewhere (their files are discarded)."""
        for call in self._calls.async_calls:
            call.async_caller.close(abort=True)
        self._calls.async_calls.clear()

    def _finish(self, pending: _PendingSave, error: str | None) -> None:
        """Every rank has written (or failed): agree, then rank 0 publishes; collective."""
        if error is None and self.on_phase is not None:
            self.on_phase("written", pending.step)
        try:
            _agree(error, pending.what)
            error = None
            if self.is_writer:
                try:
                    self._publish(pending.tmp, pending.final, pending.meta)
                except OSError as exc:
                    error = f"{type(exc).__name__}: {exc}"
            _agree(error, pending.what)
        except CheckpointError:
            if self.is_writer:
                shutil.rmtree(pending.tmp, ignore_errors=True)
            raise
        logger.info("saved checkpoint %s", pending.final)

    def _publish(self, tmp: Path, final: Path, meta: dict) -> None:
        (tmp / META).write_text(json.dumps(meta, indent=1))
        write_manifest(tmp)  # last: the sizes and sha256 of every file above
        for path in tmp.rglob("*"):  # durable before visible: a node crash must not publish empty files
            _fsync(path)
        _fsync(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(self.dir)
        if self.on_phase is not None:
            self.on_phase("published", int(meta["step"]))
        pointer_tmp = self.dir / ".latest.tmp"
        pointer_tmp.write_text(final.name + "\n")
        _fsync(pointer_tmp)
        os.replace(pointer_tmp, self.dir / "latest")
        _fsync(self.dir)
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        if self.keep_last <= 0:
            return
        for old in self.complete_steps()[:-self.keep_last]:
            if old != keep:
                trash = old.with_name(f".{old.name}.old")
                os.replace(old, trash)  # out of the step_* namespace first: a half-deleted one is never loaded
                shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def verify(path: str | Path) -> bool:
        """Compare the files of the step directory ``path`` with its manifest; collective (the ranks share the
        hashing). Returns False for a checkpoint without a manifest (older version; a warning says it is unverified).

        Raises:
            CheckpointError: on every rank, naming the file that is missing or differs, and the way out.
        """
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        error, verified = None, False
        try:
            verified = verify_manifest(path, rank=rank, world=world)
        except CheckpointError as exc:
            error = str(exc)
        _agree(error, "checkpoint refused")
        return verified

    @staticmethod
    def check(path: str | Path) -> bool:
        """Everything a load checks before it reads the state: the manifest (:meth:`verify`) and that nothing
        pickled in the checkpoint can run code (:func:`vet_checkpoint`); collective. Returns False for a
        checkpoint without a manifest (loads unverified, with a warning).

        Raises:
            CheckpointError: on every rank, naming the file and the reason.
        """
        path = Path(path)
        verified = CheckpointManager.verify(path)
        error = None
        try:
            vet_checkpoint(path)  # nothing pickled in it may run code: refused before megatron reads it
        except CheckpointError as exc:
            error = str(exc)
        _agree(error, "checkpoint refused")
        return verified

    def newest_loadable(self, first: Path) -> Path:
        """``first`` if it passes :meth:`check`, else the newest older complete checkpoint that does, logging
        (rank 0) each one skipped and why (``checkpoint.fallback_to_verified``); collective.

        Raises:
            CheckpointError: none passes; the message lists every checkpoint tried and its reason.
        """
        candidates = [first] + [p for p in reversed(self.complete_steps()) if p.name < first.name]
        reasons = []
        for path in candidates:
            try:
                self.check(path)
            except CheckpointError as exc:
                reason = str(exc).split("; ")[0]  # what failed, without the way out (this is the way out)
                reasons.append(f"{path.name}: {reason}")
                if self.is_writer:
                    logger.warning("checkpoint.fallback_to_verified: skipping %s: %s", path.name, reason)
                continue
            if path != first and self.is_writer:
                logger.warning("checkpoint.fallback_to_verified: resuming from %s instead of %s, which failed "
                               "verification (see above)", path.name, first.name)
            return path
        raise CheckpointError(f"no checkpoint in {self.dir} passes verification ({len(candidates)} tried: "
                              + " | ".join(r[:300] for r in reasons) + "); start without --resume or restore "
                              "a checkpoint from a copy")

    @staticmethod
    def load(path: str | Path, sharded_state_dict: dict, *, checked: bool = False) -> dict:
        """Load ``sharded_state_dict`` from the step directory ``path`` (after :meth:`check`, unless ``checked``:
        the caller just did).

        Raises:
            CheckpointError: the files cannot be read (damaged after they were written, or not this model's).
        """
        from megatron.core import dist_checkpointing

        path = Path(path)
        if not checked:
            CheckpointManager.check(path)
        try:
            with dist_checkpoint_load_warnings_ignored():  # megatron-core's calls of deprecated torch APIs
                return dist_checkpointing.load(sharded_state_dict, str(path))
        except (Exception, CheckpointException) as exc:  # torch/megatron raise many kinds here
            raise CheckpointError(
                f"checkpoint {path} could not be loaded ({_oneline(exc)[:400]}); if it was damaged after it was "
                f"written, resume from an older one: write its step_* name into {path.parent / 'latest'}, or move "
                f"{path.name} away") from exc
