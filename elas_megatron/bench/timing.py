# SPDX-License-Identifier: Apache-2.0
"""Where a training step's time goes: attention, FFN, output layer, optimizer, gradient sync, the rest.

:class:`Clock` takes timestamps on the device's timeline: CUDA events on a GPU (recorded on the current stream,
read after one synchronisation, so timing does not serialise the host), ``time.perf_counter`` on the CPU (ops
run synchronously there, so the host clock is the device clock).

:class:`ModuleTimer` puts timestamps around modules, found by name in the model chunks:

* forward: a forward pre-hook and a forward hook;
* backward: a gradient hook on the module's output takes the start timestamp (the gradient of the output has
  arrived, the module's backward begins), one on its input the end timestamp (the gradient of the input is
  complete). The inputs of the timed modules (a norm's output, q after RoPE) feed nothing else, so that is
  the end of the module's own backward. Nothing in the model is wrapped or replaced;
* named intervals (:meth:`ModuleTimer.begin` / :meth:`ModuleTimer.end`) around anything else, e.g. the optimizer
  step from a training callback (:class:`elas_megatron.bench.throughput.StepProbe`).

An interval is the time the device stream spent between the two points, including any idle gaps while the host
launches kernels (a launch-bound step shows up as time inside the modules, which is where the launches are).
With activation recomputation the recomputed forward runs inside the backward and is counted as forward.
Only used on separate, profiled steps: the throughput steps run without hooks.
"""
from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable

import torch

from elas_megatron.training.numerics import first_tensor

__all__ = ["CATEGORIES", "Clock", "ModuleTimer", "category_of"]

# module-name pattern (inside any wrapper prefix) -> category
_PATTERNS = (
    (re.compile(r"(^|\.)layers\.\d+\.self_attention\.core_attention$"), "core_attention"),
    (re.compile(r"(^|\.)layers\.\d+\.self_attention$"), "attention"),
    (re.compile(r"(^|\.)layers\.\d+\.mlp$"), "ffn"),
    (re.compile(r"(^|\.)output_layer$"), "output_layer"),
    (re.compile(r"(^|\.)output_loss$"), "output_layer"),  # model.loss_backend=liger: output layer + loss fused
)
CATEGORIES = ("attention", "core_attention", "ffn", "output_layer")
"""``core_attention`` (the softmax-attention kernel, SDPA or megatron's local one) is part of ``attention``
(which also holds the q/k/v/o projections and RoPE)."""


def category_of(module_name: str) -> str | None:
    """The time-split category of a module (by its name in the model), or None."""
    for pattern, category in _PATTERNS:
        if pattern.search(module_name):
            return category
    return None


class Clock:
    """Timestamps on ``device``'s timeline (CUDA events on a GPU, the host clock on a CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        if self.cuda:
            return start.elapsed_time(end)
        return (end - start) * 1e3

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class ModuleTimer:
    """Forward and backward time per category of module (module hooks), plus named intervals.

    Args:
        model_chunks: the modules to instrument (wrappers such as DDP / Float16Module are fine).
        clock: the :class:`Clock` of the device.
    """

    def __init__(self, model_chunks: list[torch.nn.Module], clock: Clock) -> None:
        self.clock = clock
        self.enabled = False
        self._intervals: dict[str, list[tuple]] = defaultdict(list)
        self._open: dict[str, object] = {}
        self._handles = []
        for chunk in model_chunks:
            for name, module in chunk.named_modules():
                category = category_of(name)
                if category is not None:
                    self._instrument(module, category)
        self.num_modules = len(self._handles) // 2

    def _instrument(self, module: torch.nn.Module, category: str) -> None:
        state: dict = {}

        def pre_hook(_module, args, kwargs):
            if not self.enabled:
                return
            state["fwd_start"] = self.clock.mark()
            x = first_tensor(args[0]) if args else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
                x.register_hook(self._backward_end(state, category))

        def post_hook(_module, _args, output):
            if not self.enabled:
                return
            start = state.pop("fwd_start", None)
            if start is None:  # enabled between this module's pre-hook and hook
                return
            self._intervals[f"{category}/fwd"].append((start, self.clock.mark()))
            y = first_tensor(output)
            if y is not None and y.requires_grad and torch.is_grad_enabled():
                y.register_hook(self._backward_start(state))

        self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post_hook))

    def _backward_start(self, state: dict) -> Callable:
        def hook(_grad):
            state.setdefault("bwd_starts", []).append(self.clock.mark())
        return hook

    def _backward_end(self, state: dict, category: str) -> Callable:
        def hook(_grad):
            starts = state.get("bwd_starts")
            if starts:  # modules run backward in reverse order of their forwards: LIFO per module
                self._intervals[f"{category}/bwd"].append((starts.pop(), self.clock.mark()))
        return hook

    def begin(self, name: str) -> None:
        """Start an interval named ``name`` (while enabled); :meth:`end` closes it."""
        if self.enabled:
            self._open[name] = self.clock.mark()

    def end(self, name: str) -> None:
        """Close the interval :meth:`begin` opened (nothing if it was not opened while enabled)."""
        start = self._open.pop(name, None)
        if start is not None:
            self._intervals[name].append((start, self.clock.mark()))

    def timed(self, name: str, fn: Callable) -> Callable:
        """``fn`` with an interval named ``name`` around each call while enabled: for a callable that a library
        takes as a setting (megatron's ``finalize_model_grads_func``), where no hook exists."""
        def call(*args, **kwargs):
            self.begin(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.end(name)
        return call

    def reset(self) -> None:
        self._intervals.clear()
        self._open.clear()

    def summary_ms(self, steps: int = 1) -> dict[str, float]:
        """Milliseconds per step of every recorded interval name (synchronises the device first)."""
        self.clock.synchronize()
        return {name: sum(self.clock.elapsed_ms(a, b) for a, b in pairs) / steps
                for name, pairs in self._intervals.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
