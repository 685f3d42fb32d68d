# SPDX-License-Identifier: Apache-2.0
"""Guards that keep a weeks-long run honest: numerical checks, the hang watchdog, and test-only fault injection.

* :class:`NumericGuard` -- after the forward/backward of every step, before the optimizer touches anything, all
  ranks agree (one MAX all-reduce of two flags) whether some rank saw a NaN/Inf in an activation or a gradient,
  and whether the loss is non-finite or spiked (``train.loss_spike_factor``). A bad step is skipped -- its batch
  dropped, weights, optimizer and LR schedule untouched -- up to ``train.max_skipped_steps`` over the run; the
  next one raises :class:`NumericalError` naming the step, the rank(s) and the layer where it appeared.
  Detection costs one reduction per hooked module output and per gradient (``sum`` propagates NaN/Inf) and a
  2-element all-reduce per step.
* :func:`check_density` -- ELAS: the measured FFN activation density after 2:4 sparsification must be <= 0.5;
  a drop below ``train.density_warn`` (dying ReLU units) warns.
* :class:`Progress` + :class:`Watchdog` -- every rank records where it is (step, phase); a thread publishes it
  with the main thread's current Python location to the torchrun agent's store
  (:class:`~elas_megatron.parallel.setup.ProgressBoard`). When a rank makes no progress for
  ``parallel.distributed_timeout_s``, its watchdog names the stuck rank(s) -- those not waiting in a
  ``torch.distributed`` call, or not reporting at all -- and ends the process (exit code :data:`EXIT_HANG`).
* :class:`TestFaults` -- test-only: ``ELAS_TEST_FAULTS`` kills, hangs or poisons a chosen rank at a chosen step.
  Unset (always, outside tests) the trainer holds ``None`` and each injection point is one ``is not None`` test.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Self

import torch
import torch.distributed as dist

from elas_megatron.training.callbacks import Callback

__all__ = ["EXIT_HANG", "FAULTS_ENV", "NumericGuard", "NumericalError", "Progress", "TestFaults", "Watchdog",
           "check_density", "diagnose_hang"]

logger = logging.getLogger(__name__)

EXIT_HANG = 124
"""Exit code of a process ended by the watchdog (as ``timeout(1)``)."""

SPIKE_MIN_STEPS = 10
"""Loss-spike detection starts after this many good steps (the early loss falls too fast to compare)."""
SPIKE_EMA_DECAY = 0.9
"""Running mean of the loss for spike detection: an exponential moving average over ~10 steps."""


class NumericalError(FloatingPointError):
    """The run stopped on a non-finite loss/gradient or a loss spike; the message names step, rank and layer."""


# --------------------------------------------------------------------------------------------- numerics
_HOOKED = re.compile(r"(embedding|decoder\.layers\.\d+(\.self_attention|\.mlp)?|decoder\.final_layernorm|output_layer)")


def _first_tensor(out) -> torch.Tensor | None:
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    return out if isinstance(out, torch.Tensor) else None


def _forward_order(name: str) -> tuple:
    """Sort key: embedding, then per layer attention, MLP, the layer output; final norm; output layer."""
    m = re.match(r"decoder\.layers\.(\d+)(\.self_attention|\.mlp)?$", name)
    if m:
        return (1, int(m.group(1)), {".self_attention": 0, ".mlp": 1, None: 2}[m.group(2)])
    return ({"embedding": 0, "decoder.final_layernorm": 2, "output_layer": 3}[name], 0, 0)


def _global_layer_names(chunk: torch.nn.Module) -> Callable[[str], str]:
    """Megatron names layers by their index on this pipeline stage; rename them to the model's layer index."""
    local_to_global = {}
    for name, module in chunk.named_modules():
        m = re.fullmatch(r"decoder\.layers\.(\d+)", name)
        if m and hasattr(module, "layer_number"):
            local_to_global[m.group(1)] = str(module.layer_number - 1)

    def rename(name: str) -> str:
        m = re.match(r"decoder\.layers\.(\d+)", name)
        return f"decoder.layers.{local_to_global.get(m.group(1), m.group(1))}{name[m.end():]}" if m else name

    return rename


class NumericGuard:
    """Rank-agreed NaN/Inf and loss-spike detection with a bounded number of skipped steps.

    Args:
        chunks: the bare model chunks (``GPTModel`` s, unwrapped from DDP/Float16).
        max_skipped_steps: ``train.max_skipped_steps``.
        loss_spike_factor: ``train.loss_spike_factor`` (0 = off).
        device: where the flags live (the collective's device).
        grads_in_hooks: check each micro-batch's gradient as autograd produces it (DeepSpeed ZeRO-2, which reduces
            and frees gradients during backward); otherwise :meth:`record_grads` checks the accumulated local
            gradients once per step, just before they are reduced (:meth:`wrap_finalize`).
    """

    def __init__(self, chunks: list[torch.nn.Module], *, max_skipped_steps: int, loss_spike_factor: float,
                 device: torch.device, grads_in_hooks: bool = False) -> None:
        self.max_skipped_steps = max_skipped_steps
        self.loss_spike_factor = loss_spike_factor
        self.device = device
        self.skipped_steps = 0
        self.loss_ema: float | None = None
        self.good_steps = 0
        self.params: list[tuple[str, torch.nn.Parameter]] = []
        modules: list[tuple[str, torch.nn.Module]] = []
        for chunk in chunks:
            rename = _global_layer_names(chunk)
            self.params += [(rename(n), p) for n, p in chunk.named_parameters() if p.requires_grad]
            modules += sorted(((rename(n), m) for n, m in chunk.named_modules() if _HOOKED.fullmatch(n)),
                              key=lambda item: _forward_order(item[0]))
        self.module_names = [n for n, _ in modules]
        self._act_sums = torch.zeros(len(modules), dtype=torch.float32, device=device)
        self._grad_sums = torch.zeros(len(self.params), dtype=torch.float32, device=device)
        self._handles = [m.register_forward_hook(partial(self._on_output, i)) for i, (_, m) in enumerate(modules)]
        if grads_in_hooks:
            self._handles += [p.register_hook(partial(self._on_grad, i)) for i, (_, p) in enumerate(self.params)]
        self.grads_in_hooks = grads_in_hooks

    # hooks ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _on_output(self, index: int, module, args, output) -> None:
        out = _first_tensor(output)
        if out is not None:
            self._act_sums[index] += out.detach().sum(dtype=torch.float32)

    @torch.no_grad()
    def _on_grad(self, index: int, grad: torch.Tensor) -> None:
        self._grad_sums[index] += grad.detach().sum(dtype=torch.float32)

    def begin_step(self) -> None:
        self._act_sums.zero_()
        self._grad_sums.zero_()

    @torch.no_grad()
    def record_grads(self) -> None:
        """Sum this rank's accumulated, not yet reduced gradients (megatron DDP ``main_grad``, else ``grad``)."""
        if self.grads_in_hooks:
            return
        sums = []
        for _, p in self.params:
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
            sums.append(g.sum(dtype=torch.float32) if g is not None else torch.zeros((), device=self.device))
        if sums:
            self._grad_sums.copy_(torch.stack(sums))

    def wrap_finalize(self, tconfig) -> None:
        """Check the local gradients right before megatron's schedule reduces them (``finalize_model_grads``)."""
        finalize = tconfig.finalize_model_grads_func

        def checked_finalize(*args, **kwargs):
            self.record_grads()
            return finalize(*args, **kwargs)

        tconfig.finalize_model_grads_func = checked_finalize

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # the per-step decision --------------------------------------------------------------------------
    def _local_report(self) -> dict:
        act_bad = (~torch.isfinite(self._act_sums)).tolist()
        grad_bad = (~torch.isfinite(self._grad_sums)).tolist()
        bad_params = [n for (n, _), bad in zip(self.params, grad_bad) if bad]
        first_act = next((n for n, bad in zip(self.module_names, act_bad) if bad), None)
        return {"rank": dist.get_rank() if dist.is_initialized() else 0, "first_bad_activation": first_act,
                "bad_grads": len(bad_params), "params": len(self.params),
                # nearest the output = where the backward blow-up started (everything before it follows from it)
                "grad_origin": bad_params[-1] if bad_params else None}

    def check(self, step: int, loss: float) -> str | None:
        """Collective. None if step ``step`` may update the weights, else why not (the same text on every rank)."""
        flags = torch.stack([(~torch.isfinite(self._act_sums)).any(), (~torch.isfinite(self._grad_sums)).any()])
        flags = flags.float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        act_bad, grad_bad = bool(flags[0]), bool(flags[1])
        if act_bad or grad_bad or not math.isfinite(loss):
            reports = [self._local_report()]
            if dist.is_initialized() and dist.get_world_size() > 1:
                reports = [None] * dist.get_world_size()
                dist.all_gather_object(reports, self._local_report())
            return self._describe(step, loss, reports)
        if self.loss_spike_factor and self.loss_ema is not None and self.good_steps >= SPIKE_MIN_STEPS \
                and loss > self.loss_spike_factor * self.loss_ema:
            return (f"loss spike at step {step}: {loss:.4f} > train.loss_spike_factor={self.loss_spike_factor:g} x "
                    f"running mean {self.loss_ema:.4f}")
        ema = self.loss_ema
        self.loss_ema = loss if ema is None else SPIKE_EMA_DECAY * ema + (1 - SPIKE_EMA_DECAY) * loss
        self.good_steps += 1
        return None

    @staticmethod
    def _describe(step: int, loss: float, reports: list[dict]) -> str:
        parts = []
        for rep in reports:
            where = []
            if rep["first_bad_activation"]:
                where.append(f"first non-finite activation: output of {rep['first_bad_activation']}")
            if rep["bad_grads"]:
                where.append(f"non-finite gradient in {rep['bad_grads']} of {rep['params']} parameters, nearest the "
                             f"output: {rep['grad_origin']}")
            if where:
                parts.append(f"rank {rep['rank']}: {'; '.join(where)}")
        ranks = ", ".join(parts) if parts else "no rank saw a non-finite activation or gradient"
        return f"non-finite values at step {step} (loss {loss}): {ranks}"

    def skip(self, problem: str) -> None:
        """Count a skipped step; raise :class:`NumericalError` once more than ``max_skipped_steps`` were skipped."""
        self.skipped_steps += 1
        if self.skipped_steps > self.max_skipped_steps:
            raise NumericalError(
                f"{problem}; stopping: {self.skipped_steps} bad step(s) > train.max_skipped_steps="
                f"{self.max_skipped_steps}. Resume from the last checkpoint (--resume) with a lower optim.lr, or allow "
                "skipping bad batches with a larger train.max_skipped_steps")
        logger.warning("%s; step skipped (%d of train.max_skipped_steps=%d): weights, optimizer and LR schedule "
                       "unchanged, the batch is dropped", problem, self.skipped_steps, self.max_skipped_steps)

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "loss_ema": self.loss_ema, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.loss_ema = state.get("loss_ema")
        self.good_steps = int(state.get("good_steps", 0))


def check_density(modules: Iterable, step: int, warn_below: float) -> float | None:
    """Mean measured activation density of the 2:4-sparse ElasMLPs in ``modules`` (their last forward).

    Logs an error above 0.5 (the 2:4 invariant is broken: the FFN is not sparse) and a warning below
    ``warn_below`` (many all-zero groups of 4: dying ReLU units). Returns None when nothing was measured.
    """
    values = [m.last_density for m in modules if m.is_sparse and m.last_density is not None]
    if not values:
        return None
    density = sum(values) / len(values)
    if density > 0.5 + 1e-6:
        logger.error("step %d: measured 2:4 activation density %.4f > 0.5: the ELAS FFN is not 2:4 sparse (kernel or "
                     "schedule bug); sparsity/act_density in metrics.jsonl", step, density)
    elif density < warn_below:
        logger.warning("step %d: activation density after 2:4 sparsification dropped to %.4f < train.density_warn="
                       "%g (typical ~0.4): many FFN units output zero (dying ReLU); consider a lower optim.lr",
                       step, density, warn_below)
    return density


# ----------------------------------------------------------------------------------------------- hangs
class Progress:
    """Where this rank is: (step, phase) and when it got there. Updating it is two attribute writes."""

    def __init__(self) -> None:
        self.step = 0
        self.phase = "start"
        self.since = time.monotonic()
        self.watched = True

    def update(self, step: int, phase: str, watched: bool = True) -> None:
        """``watched=False`` for phases the watchdog must not time (checkpoint writes may take long)."""
        self.step, self.phase, self.watched, self.since = step, phase, watched, time.monotonic()


def _main_thread_location() -> tuple[bool, str]:
    """(is the main thread inside a torch.distributed call?, its innermost Python frames as text)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    frames = []
    while frame is not None and len(frames) < 40:
        frames.append(frame)
        frame = frame.f_back
    in_collective = any(f"torch{os.sep}distributed" in f.f_code.co_filename for f in frames)
    ours = next((f for f in frames if f"elas_megatron{os.sep}" in f.f_code.co_filename), None)
    text = []
    for f in frames[:1] + ([ours] if ours is not None and ours is not frames[0] else []):
        path = os.sep.join(f.f_code.co_filename.split(os.sep)[-2:])
        text.append(f"{f.f_code.co_name} ({path}:{f.f_lineno})")
    return in_collective, " <- ".join(text) or "?"


def diagnose_hang(reports: dict[int, dict | None], me: int, now: float, stale_s: float) -> str:
    """Name the stuck rank(s) from every rank's last report (see :class:`Watchdog`).

    Stuck: ranks with no recent report (dead, or frozen so hard their watchdog thread cannot run); else the ranks
    not waiting inside a torch.distributed call while others are; else (everyone waits: mismatched collectives or
    an asynchronous backend) the ranks idle the longest.
    """
    def describe(rank: int) -> str:
        rep = reports.get(rank)
        if rep is None:
            return f"rank {rank}: no report at all (never started the training loop, or died)"
        age = now - rep["wall"]
        state = "waiting in torch.distributed" if rep["in_collective"] else "not in a collective"
        return (f"rank {rank}: step {rep['step']} '{rep['phase']}', idle {rep['idle_s'] + age:.0f} s, {state}: "
                f"{rep['where']}" + (f" (last report {age:.0f} s ago)" if age > stale_s else ""))

    silent = [r for r, rep in reports.items() if rep is None or now - rep["wall"] > stale_s]
    stuck = silent or [r for r, rep in reports.items() if not rep["in_collective"]]
    if not stuck:
        idle = {r: rep["idle_s"] + now - rep["wall"] for r, rep in reports.items()}
        longest = max(idle.values())
        stuck = [r for r, t in idle.items() if t >= longest - 1.0]
    lines = [describe(r) for r in sorted(stuck)[:8]]
    more = f" (+{len(stuck) - 8} more)" if len(stuck) > 8 else ""
    mine = "" if me in stuck else f" | this rank: {describe(me)}"
    return f"stuck rank(s) {sorted(stuck)[:8]}{more} -- " + "; ".join(lines) + mine


def _exit_process(message: str) -> None:
    sys.stderr.write(f"elas-train: error: {message}\n")
    sys.stderr.flush()
    logging.shutdown()
    os._exit(EXIT_HANG)


class Watchdog:
    """A daemon thread that reports this rank's :class:`Progress` and ends the process when it stops moving.

    Args:
        progress: updated by the training loop.
        timeout_s: ``parallel.distributed_timeout_s``: no progress for this long is a hang.
        board: the shared :class:`~elas_megatron.parallel.setup.ProgressBoard` (None: a one-rank diagnosis).
        global_rank: this process.
        on_hang: called with the message (default: print it and exit with :data:`EXIT_HANG`).
    """

    def __init__(self, progress: Progress, *, timeout_s: float, board, global_rank: int,
                 on_hang: Callable[[str], None] = _exit_process) -> None:
        self.progress = progress
        self.timeout_s = timeout_s
        self.board = board
        self.global_rank = global_rank
        self.on_hang = on_hang
        self.poll_s = max(0.2, min(5.0, timeout_s / 10))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="elas-watchdog", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _report(self) -> dict:
        p = self.progress
        in_collective, where = _main_thread_location()
        return {"step": p.step, "phase": p.phase, "idle_s": time.monotonic() - p.since, "wall": time.time(),
                "in_collective": in_collective, "where": where}

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            report = self._report()
            try:
                if self.board is not None:
                    self.board.post(json.dumps(report))
            except (RuntimeError, OSError) as exc:  # the store went away (job teardown): keep timing locally
                logger.debug("watchdog: cannot post progress: %s", exc)
            if self.progress.watched and report["idle_s"] > self.timeout_s:
                self.on_hang(self.describe_hang(report))
                return

    def describe_hang(self, report: dict) -> str:
        reports: dict[int, dict | None] = {self.global_rank: report}
        if self.board is not None:
            try:
                reports = {r: (json.loads(v) if v else None) for r, v in self.board.read_all().items()}
                reports[self.global_rank] = report
            except (RuntimeError, OSError) as exc:
                logger.debug("watchdog: cannot read the other ranks' progress: %s", exc)
        diagnosis = diagnose_hang(reports, self.global_rank, time.time(), stale_s=3 * self.poll_s + 5)
        return (f"no progress for {report['idle_s']:.0f} s (parallel.distributed_timeout_s={self.timeout_s:g}) on "
                f"rank {self.global_rank}: {diagnosis}. Check the stuck rank's node and log; restart with --resume")


# ---------------------------------------------------------------------------------------- test faults
FAULTS_ENV = "ELAS_TEST_FAULTS"


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None
    arg: str | None


class TestFaults(Callback):
    """TEST-ONLY fault injection, configured by ``$ELAS_TEST_FAULTS`` (comma-separated ``KIND@STEP[:rank=R][:ARG]``).

    ``STEP`` is the 1-based step as logged in metrics.jsonl (for ``*_in_save``: the checkpoint's step). Kinds:

    * ``kill@5`` -- SIGKILL itself at the start of step 5; ``hang@5`` -- sleep forever there;
    * ``kill_in_save@4:written`` -- SIGKILL inside ``CheckpointManager.save`` of step 4; the phase is ``written``
      (files written, not yet published) or ``published`` (renamed into place, ``latest`` not yet updated);
    * ``disk_full_in_save@4`` -- limit this process's file size (RLIMIT_FSIZE) before writing checkpoint 4, so its
      writes fail as on a full disk;
    * ``nan_grad@3:decoder.layers.1.mlp`` -- NaN into the gradient of the first parameter whose name contains ARG;
    * ``nan_act@3:decoder.layers.1.self_attention`` -- NaN into the output of the module named ARG.

    Without ``:rank=R`` a fault hits every rank. Each fires once. A training callback: pass it to the trainer.
    """

    KINDS = ("kill", "hang", "kill_in_save", "disk_full_in_save", "nan_grad", "nan_act")
    __test__ = False  # not a pytest class

    def __init__(self, faults: list[Fault]) -> None:
        self.all_faults = list(faults)
        self.faults = list(faults)  # this rank's, once the trainer is built
        self.fired: set[Fault] = set()

    @classmethod
    def parse(cls, spec: str) -> TestFaults:
        faults = []
        for item in spec.split(","):
            head, *opts = item.strip().split(":")
            kind, _, step = head.partition("@")
            rank = next((int(o[5:]) for o in opts if o.startswith("rank=")), None)
            arg = next((o for o in opts if not o.startswith("rank=")), None)
            if kind not in cls.KINDS or not step.isdigit():
                raise ValueError(f"{FAULTS_ENV}: bad fault {item!r}; write KIND@STEP[:rank=R][:ARG], KIND one of "
                                 f"{', '.join(cls.KINDS)}")
            faults.append(Fault(kind, int(step), rank, arg))
        logger.warning("injecting test faults %s", faults)
        return cls(faults)

    @classmethod
    def from_env(cls) -> TestFaults | None:
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

    def on_checkpoint_phase(self, phase: str, step: int) -> None:
        """Called by ``CheckpointManager.save`` at ``begin``, ``scheduled``, ``written`` and ``published``."""
        if phase == "begin" and self.take("disk_full_in_save", step):
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        for f in self.faults:
            if f.kind == "kill_in_save" and f.step == step and (f.arg or "written") == phase:
                os.kill(os.getpid(), signal.SIGKILL)

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
                raise ValueError(f"{FAULTS_ENV}: no parameter/module matches {f.arg!r} on this rank")

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
