# SPDX-License-Identifier: Apache-2.0
"""Numerical guard: rank-agreed NaN/Inf and loss-spike detection before the optimizer touches anything.

After the forward/backward of every step all ranks agree (one MAX all-reduce of two flags) whether some rank saw a
NaN/Inf in an activation or a gradient, and whether the loss is non-finite or spiked (``train.loss_spike_factor``).
A bad step is skipped -- its batch dropped, weights, optimizer and LR schedule untouched -- up to
``train.max_skipped_steps`` over the run; the next one raises :class:`NumericalError` naming the step, the rank(s)
and the layer where it appeared. Detection costs one reduction per hooked module output and per gradient (``sum``
propagates NaN/Inf) and a 2-element all-reduce per step.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist

from elas_megatron.parallel.setup import first_rank_error
from elas_megatron.utils.errors import DataError

__all__ = ["NumericGuard", "NumericalError"]

logger = logging.getLogger(__name__)

SPIKE_MIN_STEPS = 10
"""Loss-spike detection starts after this many good steps (the early loss falls too fast to compare)."""
SPIKE_EMA_DECAY = 0.9
"""Running mean of the loss for spike detection: an exponential moving average over ~10 steps."""


class NumericalError(FloatingPointError):
    """The run stopped on a non-finite loss/gradient or a loss spike; the message names step, rank and layer."""


_HOOKED = re.compile(r"(embedding|decoder\.layers\.\d+(\.self_attention|\.mlp)?|decoder\.final_layernorm|output_layer)")


def first_tensor(out) -> torch.Tensor | None:
    """The first tensor of a module's output or input (a tensor, or nested tuples/lists whose first item leads to
    one); None if there is none. Shared by the hooks of the numerical guard, the profiler and the benchmarks."""
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
        self.data_error: str | None = None
        """Set by the trainer for a step whose batch held a token id outside the vocabulary (clamped): the step's
        check then raises :class:`~elas_megatron.utils.errors.DataError` on every rank."""
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
        out = first_tensor(output)
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
        flags = torch.stack([(~torch.isfinite(self._act_sums)).any(), (~torch.isfinite(self._grad_sums)).any(),
                             torch.tensor(self.data_error is not None, device=self._act_sums.device)])
        flags = flags.float()
        multi = dist.is_initialized() and dist.get_world_size() > 1
        if multi:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        act_bad, grad_bad, data_bad = bool(flags[0]), bool(flags[1]), bool(flags[2])
        if data_bad:  # bad token ids somewhere (trainer.train_step): every rank stops before the optimizer step
            raise DataError(first_rank_error(self.data_error))
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
