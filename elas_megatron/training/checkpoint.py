"""Checkpoints through Megatron-Core ``dist_checkpointing``, written so that a crash never leaves a broken "latest".

Layout of ``checkpoint.dir``::

    step_00000100/          one complete checkpoint (dist_checkpointing files + elas_meta.json)
    latest                  text file naming the newest complete step directory
    .step_00000200.tmp/     a save in progress (ignored on load, removed by the next save)

A save goes to the temporary directory; only when every rank has finished writing does rank 0 add
``elas_meta.json``, rename the directory into place and replace ``latest`` atomically (``os.replace``). A
process killed at any point therefore leaves either the previous checkpoint as latest or the new one complete.
Sharded tensors are keyed by global shape, so a checkpoint saved with one TP/PP layout loads into another.
State that only exists per rank (DeepSpeed ZeRO optimizer partitions, under ``zero/``) is written by every rank
into the same temporary directory before it is published, so it is covered by the same atomicity.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

logger = logging.getLogger(__name__)

META = "elas_meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or does not fit this run; the message says which and why."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, directory: str | Path, *, keep_last: int, global_rank: int) -> None:
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.is_writer = global_rank == 0

    @staticmethod
    def step_name(step: int) -> str:
        return f"step_{step:08d}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.dir / "latest"
        if not pointer.is_file():
            return None
        path = self.dir / pointer.read_text().strip()
        if not (path / META).is_file():
            raise CheckpointError(f"{pointer} names {path.name}, which is incomplete or missing; point it at a "
                                  f"complete step_* directory (one containing {META}) or remove it to start fresh")
        return path

    @staticmethod
    def read_meta(path: str | Path) -> dict:
        meta = Path(path) / META
        if not meta.is_file():
            raise CheckpointError(f"{path} is not a complete elas-megatron checkpoint (no {META})")
        return json.loads(meta.read_text())

    def save(self, step: int, sharded_state_dict: dict, meta: dict,
             write_local: Callable[[Path], None] | None = None) -> Path:
        """Write ``sharded_state_dict`` for ``step`` atomically; all ranks must call it.

        ``write_local(directory)``, if given, runs on every rank after the sharded save and before the directory
        is published, for state that lives per rank (DeepSpeed's ZeRO optimizer partitions).
        """
        from megatron.core import dist_checkpointing

        final = self.dir / self.step_name(step)
        tmp = self.dir / f".{final.name}.tmp"
        if self.is_writer:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except OSError as exc:
                raise CheckpointError(f"cannot write checkpoints to {self.dir}: {exc}; fix the permissions/space "
                                      "or set checkpoint.dir") from None
        _barrier()
        dist_checkpointing.save(sharded_state_dict, str(tmp))
        if write_local is not None:
            write_local(tmp)
        _barrier()
        if self.is_writer:
            (tmp / META).write_text(json.dumps(dict(meta, step=step), indent=1))
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = self.dir / ".latest.tmp"
            pointer_tmp.write_text(final.name + "\n")
            os.replace(pointer_tmp, self.dir / "latest")
            self._prune(keep=final)
        _barrier()
        logger.info("saved checkpoint %s", final)
        return final

    def _prune(self, keep: Path) -> None:
        if self.keep_last <= 0:
            return
        steps = sorted(p for p in self.dir.glob("step_*") if p.is_dir() and (p / META).is_file())
        for old in steps[:-self.keep_last]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def load(path: str | Path, sharded_state_dict: dict) -> dict:
        from megatron.core import dist_checkpointing

        return dist_checkpointing.load(sharded_state_dict, str(path))
