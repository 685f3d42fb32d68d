"""Fault injection for the reliability tests: a training callback that kills, hangs or poisons a rank at a step.

In-process trainers get it as ``Trainer(..., callbacks=[FaultInjector.parse(spec)])``; launched jobs run
``fault_train.py`` (elas-train plus this callback, configured by ``$ELAS_TEST_FAULTS``), see
``reliability_runs.launch(..., faults=spec)``.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from elas_megatron.training.callbacks import Callback

logger = logging.getLogger(__name__)

FAULTS_ENV = "ELAS_TEST_FAULTS"


def _rank_and_arg(opts: list[str]) -> tuple[int | None, str | None]:
    """The ``rank=R`` option (None: every rank) and the first other option (None: none) of a ``:``-split spec."""
    rank = next((int(o[5:]) for o in opts if o.startswith("rank=")), None)
    return rank, next((o for o in opts if not o.startswith("rank=")), None)


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None
    arg: str | None


class FaultInjector(Callback):
    """Faults at chosen steps on chosen ranks, written as comma-separated ``KIND@STEP[:rank=R][:ARG]``.

    ``STEP`` is the 1-based step as logged in metrics.jsonl (for ``*_in_save``: the checkpoint's step). Kinds:

    * ``kill@5`` -- SIGKILL itself at the start of step 5; ``hang@5`` -- sleep forever there;
    * ``slow@2:0.4`` -- sleep 0.4 s at the start of every step from step 2 on (a straggler);
    * ``hang_in_save@4`` -- sleep forever at the start of the save of checkpoint 4 (a stalled file system);
    * ``kill_in_save@4:written`` -- SIGKILL inside ``CheckpointManager.save`` of step 4; the phase is ``written``
      (files written, not yet published) or ``published`` (renamed into place, ``latest`` not yet updated);
    * ``disk_full_in_save@4`` -- limit this process's file size (RLIMIT_FSIZE) before writing checkpoint 4, so its
      writes fail as on a full disk;
    * ``nan_grad@3:decoder.layers.1.mlp`` -- NaN into the gradient of the first parameter whose name contains ARG;
    * ``nan_act@3:decoder.layers.1.self_attention`` -- NaN into the output of the module named ARG.

    Without ``:rank=R`` a fault hits every rank. Each fires once. A training callback: pass it to the trainer
    (``Trainer(..., callbacks=[...])``, ``elas_megatron.cli.train.main(argv, callbacks=[...])``).
    """

    KINDS = ("kill", "hang", "slow", "kill_in_save", "hang_in_save", "disk_full_in_save", "nan_grad", "nan_act")

    def __init__(self, faults: list[Fault]) -> None:
        self.all_faults = list(faults)
        self.faults = list(faults)  # this rank's, once the trainer is built
        self.fired: set[Fault] = set()

    @classmethod
    def parse(cls, spec: str) -> FaultInjector:
        faults = []
        for item in spec.split(","):
            head, *opts = item.strip().split(":")
            kind, _, step = head.partition("@")
            rank, arg = _rank_and_arg(opts)
            if kind not in cls.KINDS or not step.isdigit():
                raise ValueError(f"bad fault {item!r}; write KIND@STEP[:rank=R][:ARG], KIND one of "
                                 f"{', '.join(cls.KINDS)}")
            faults.append(Fault(kind, int(step), rank, arg))
        logger.warning("injecting test faults %s", faults)
        return cls(faults)

    @classmethod
    def from_env(cls) -> FaultInjector | None:
        spec = os.environ.get(FAULTS_ENV, "").strip()
        return cls.parse(spec) if spec else None

    def take(self, kind: str, step: int) -> Fault | None:
        """The not yet fired fault of ``kind`` at ``step`` for this rank (marked fired), else None."""
        for f in self.faults:
            if f.kind == kind and f.step == step and f not in self.fired:
                self.fired.add(f)
                return f
        return None

    # callback interface ----------------------------------------------------------------------------------
    def on_model_built(self, trainer) -> None:
        """Keep this rank's faults; hooks for ``nan_grad`` / ``nan_act`` (before the numerical guard's)."""
        rank = trainer.info.global_rank
        self.faults = [f for f in self.all_faults if f.rank in (None, rank)]
        self.install(trainer._unwrapped(), lambda: trainer.step + 1)

    def on_step_begin(self, trainer, step: int) -> None:
        if self.take("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.take("hang", step):
            while True:
                time.sleep(3600)
        for f in self.faults:
            if f.kind == "slow" and step >= f.step:
                time.sleep(float(f.arg or 0.5))

    def on_checkpoint_phase(self, phase: str, step: int) -> None:
        """Called by ``CheckpointManager.save`` at ``begin``, ``scheduled``, ``written`` and ``published``."""
        if phase == "begin" and self.take("disk_full_in_save", step):
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        for f in self.faults:
            if f.kind == "kill_in_save" and f.step == step and (f.arg or "written") == phase:
                os.kill(os.getpid(), signal.SIGKILL)
        if phase == "begin" and self.take("hang_in_save", step):
            while True:
                time.sleep(3600)

    def install(self, named_chunks: list[torch.nn.Module], current_step: Callable[[], int]) -> None:
        """Hooks for ``nan_grad`` / ``nan_act`` on the bare model chunks; ``current_step()`` is 1-based."""
        for f in self.faults:
            if f.kind not in ("nan_grad", "nan_act"):
                continue
            for chunk in named_chunks:
                if f.kind == "nan_grad":
                    match = next((p for n, p in chunk.named_parameters() if f.arg and f.arg in n), None)
                    if match is not None:
                        match.register_hook(partial(self._poison_grad, f, current_step))
                        break
                else:
                    match = dict(chunk.named_modules()).get(f.arg)
                    if match is not None:
                        # prepend: before the NumericGuard's hook, as if the module itself produced the NaN
                        match.register_forward_hook(partial(self._poison_output, f, current_step), prepend=True)
                        break
            else:
                raise ValueError(f"fault {f.kind}@{f.step}: no parameter/module matches {f.arg!r} on this rank")

    @staticmethod
    def _poison_grad(fault: Fault, current_step, grad: torch.Tensor):
        return grad * float("nan") if current_step() == fault.step else grad

    @staticmethod
    def _poison_output(fault: Fault, current_step, module, args, output):
        if current_step() != fault.step:
            return output
        if isinstance(output, tuple):
            return (output[0] * float("nan"), *output[1:])
        return output * float("nan")


SLOW_START_ENV = "ELAS_TEST_SLOW_START"


def slow_startup(phase: str, marker: str, seconds: float = 900.0, rank: int | None = None) -> None:
    """Stall start-up for ``seconds`` (interruptible: a plain ``time.sleep``), on global rank ``rank`` (default:
    every rank), creating the file ``marker`` when the stall begins (``marker.RANK``), in ``phase``:

    * ``datasets`` -- right after the dataset index cache was written, while its build still holds the cache lock
      (a stop signal there must leave no files of the build behind);
    * ``checkpoint_load`` -- at the start of loading the checkpoint of ``--resume``.
    """
    if rank is not None and int(os.environ.get("RANK", "0")) != rank:
        return

    def stall() -> None:
        Path(f"{marker}.{os.environ.get('RANK', '0')}").touch()
        time.sleep(seconds)

    if phase == "datasets":
        from elas_megatron.data import datasets

        real_builder = datasets._builder_class

        def builder_class():
            cls = real_builder()

            class Stalled(cls):
                def build(self):
                    result = super().build()
                    stall()
                    return result

            return Stalled

        datasets._builder_class = builder_class
    elif phase == "checkpoint_load":
        from elas_megatron.training.checkpoint import CheckpointManager

        real_load = CheckpointManager.load

        def load(path, sharded_state_dict, **kwargs):
            stall()
            return real_load(path, sharded_state_dict, **kwargs)

        CheckpointManager.load = staticmethod(load)
    else:
        raise ValueError(f"unknown start-up phase {phase!r}; use datasets or checkpoint_load")


def slow_startup_from_env() -> None:
    """``$ELAS_TEST_SLOW_START`` = ``PHASE:FILE[:SECONDS][:rank=R]`` (see :func:`slow_startup`)."""
    spec = os.environ.get(SLOW_START_ENV, "").strip()
    if spec:
        phase, marker, *opts = spec.split(":")
        rank, seconds = _rank_and_arg(opts)
        slow_startup(phase, marker, float(seconds or 900.0), rank)
