# SPDX-License-Identifier: Apache-2.0
"""Profiling a few training steps, as a callback: a torch.profiler trace (``log.profile_steps``) and a CUDA memory
snapshot (``log.memory_snapshot_step``), one file per rank in ``{run_dir}/profile/``.

* ``trace_rank<R>_steps<from>-<to>.json``: Chrome/Perfetto trace JSON of steps from..to (CPU ops, and CUDA kernels
  on GPU; shapes and Python stacks are not recorded, which keeps the file small and the steps' timing close to
  unprofiled). Open it in https://ui.perfetto.dev or chrome://tracing.
  During the traced steps every transformer layer's forward and backward is a named range, ``layer <N> forward`` /
  ``layer <N> backward`` (N: the global 1-based layer number), in the trace (``torch.profiler.record_function``)
  and, on GPU, as NVTX ranges for Nsight Systems (``nsys profile``) too (:class:`LayerRanges`). The hooks that
  record them exist only during the traced steps: other steps pay nothing.
* ``memory_snapshot_rank<R>_step<S>.pickle``: the CUDA caching allocator's state and the history of its
  allocations during step S (``torch.cuda.memory._record_memory_history`` / ``_dump_snapshot``); open it in
  https://pytorch.org/memory_viz. On CPU the snapshot is skipped (a log line says so).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from elas_megatron.training.callbacks import Callback
from elas_megatron.training.numerics import first_tensor

__all__ = ["LayerRanges", "Profiler"]

logger = logging.getLogger(__name__)


class LayerRanges:
    """Named ranges around the forward and the backward of each megatron ``TransformerLayer`` of ``chunks``, while
    installed (:meth:`remove` takes the hooks away).

    Forward: module pre/post hooks open and close ``layer <N> forward``. Backward: when the forward ran with
    gradients, a gradient hook on the layer's output opens ``layer <N> backward`` (the gradient reaching the layer)
    and one on its input closes it (the gradient leaving it); each micro-batch's pair shares its own handle, so
    pipeline schedules with several forwards in flight pair correctly. A range is a
    ``torch.profiler.record_function`` (in torch.profiler traces) and, with ``nvtx``, an NVTX range
    (``torch.cuda.nvtx.range_start/range_end``; not nested push/pop, because the backward of layer N ends on the
    same gradient as the backward of layer N-1 begins). Under activation recomputation the recomputed forward shows
    as a forward range inside the backward.
    """

    def __init__(self, chunks, *, nvtx: bool) -> None:
        from megatron.core.transformer.transformer_layer import TransformerLayer

        self.nvtx = nvtx
        self._handles = []
        self._open: dict[int, list] = {}  # id(layer) -> open forward ranges (a stack: forwards nest only in recompute)
        self.names: list[str] = []
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TransformerLayer):
                    name = f"layer {module.layer_number}"
                    self.names.append(name)
                    self._handles.append(module.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
                    self._handles.append(module.register_forward_hook(self._post_hook(name), with_kwargs=True))

    def _begin(self, name: str):
        rf = torch.autograd.profiler.record_function(name)
        rf.__enter__()
        return rf, torch.cuda.nvtx.range_start(name) if self.nvtx else None

    def _end(self, handle) -> None:
        rf, nvtx_id = handle
        if nvtx_id is not None:
            torch.cuda.nvtx.range_end(nvtx_id)
        rf.__exit__(None, None, None)

    def _pre_hook(self, name: str):
        def hook(module, args, kwargs):
            self._open.setdefault(id(module), []).append(self._begin(f"{name} forward"))
        return hook

    def _post_hook(self, name: str):
        def hook(module, args, kwargs, output):
            self._end(self._open[id(module)].pop())
            inp = first_tensor(kwargs.get("hidden_states", args[0] if args else None))
            out = first_tensor(output)
            if (torch.is_grad_enabled() and inp is not None and out is not None and inp.requires_grad
                    and out.requires_grad):
                backward: list = []  # this forward's backward range, once it is open

                def begin(grad):
                    backward.append(self._begin(f"{name} backward"))

                def end(grad):
                    if backward:
                        self._end(backward.pop())

                out.register_hook(begin)
                inp.register_hook(end)
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class Profiler(Callback):
    """Traces training steps ``profile_steps[0]..profile_steps[1]`` (1-based, inclusive) and snapshots CUDA memory
    during step ``memory_snapshot_step``; ``rank`` names the files."""

    def __init__(self, run_dir: str | Path, *, rank: int, device: torch.device,
                 profile_steps: list[int] | tuple[int, int] | None = None,
                 memory_snapshot_step: int | None = None) -> None:
        self.dir = Path(run_dir) / "profile"
        self.rank = rank
        self.device = device
        self.steps = tuple(profile_steps) if profile_steps else None
        self.snapshot_step = memory_snapshot_step
        if self.snapshot_step is not None and device.type != "cuda":
            if rank == 0:
                logger.info("log.memory_snapshot_step=%d skipped: CUDA memory snapshots need a CUDA device (this run "
                            "is on %s)", self.snapshot_step, device.type)
            self.snapshot_step = None
        self._prof = None
        self._layers: LayerRanges | None = None
        self._recording_memory = False
        self.trace_path: Path | None = None
        self.snapshot_path: Path | None = None

    def on_step_begin(self, trainer, step: int) -> None:
        if self.steps is not None and step == self.steps[0]:
            self._start_trace()
            self._layers = LayerRanges(trainer.model, nvtx=self.device.type == "cuda")
        if step == self.snapshot_step:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
            self._recording_memory = True

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        if self._prof is not None and step >= self.steps[1]:
            self._stop_trace()
        if self._recording_memory and step >= self.snapshot_step:
            self._dump_snapshot(step)

    def on_train_end(self, trainer) -> None:  # stopped before the range ended (preemption, error): keep what ran
        if self._prof is not None:
            self._stop_trace()
        if self._recording_memory:
            self._dump_snapshot(trainer.step)

    def _start_trace(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=False, with_stack=False,
                                            profile_memory=False)
        self._prof.start()

    def _stop_trace(self) -> None:
        if self._layers is not None:
            self._layers.remove()
            self._layers = None
        prof, self._prof = self._prof, None
        prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.trace_path = self.dir / f"trace_rank{self.rank}_steps{self.steps[0]}-{self.steps[1]}.json"
        prof.export_chrome_trace(str(self.trace_path))
        if self.rank == 0:
            logger.info("profiler trace of steps %d-%d written to %s (one per rank)", self.steps[0], self.steps[1],
                        self.trace_path)

    def _dump_snapshot(self, step: int) -> None:
        self._recording_memory = False
        self.dir.mkdir(parents=True, exist_ok=True)
        self.snapshot_path = self.dir / f"memory_snapshot_rank{self.rank}_step{step}.pickle"
        torch.cuda.memory._dump_snapshot(str(self.snapshot_path))
        torch.cuda.memory._record_memory_history(enabled=None)
        if self.rank == 0:
            logger.info("CUDA memory snapshot of step %d written to %s (one per rank)", step, self.snapshot_path)
