"""Run Megatron-Core on CPU (gloo): the complete list of workarounds, active only when CUDA is absent.

Megatron-Core assumes a GPU in a handful of places that have nothing to do with the maths. So that the whole
framework -- TP/PP/DP schedules, DDP grad buffers, optimizers, checkpoints -- is tested on CPU with the same
code path as on GPUs, :func:`enable_cpu_megatron` patches exactly these, each narrowly:

1. ``torch.cuda.current_device()`` (rotary embeddings, TP layers/mappings, p2p buffers, grad buffers) returns
   the CPU device, so ``torch.empty(..., device=torch.cuda.current_device())`` allocates on the CPU.
2. Hard-coded ``device="cuda"`` / ``"cuda:N"`` in factory calls (``schedules.py`` token counters,
   ``clip_grads.py``, the optimizers' scale tensors) and ``Tensor.cuda()`` (optimizer/state loading) are
   redirected to the CPU by :class:`_CudaToCpu`, a ``TorchFunctionMode`` that only rewrites the ``device``
   argument of tensor factories; it also makes ``param.type()`` report ``torch.cuda.*Tensor`` for the
   optimizer wrappers' type checks (``optimizer.py``, ``distrib_optimizer.py``).
3. ``torch.cuda.synchronize()`` (p2p communication, parallel_state barriers) is a no-op: CPU work is
   synchronous.
4. The CUDA RNG tracker (``model_parallel_cuda_manual_seed``, ``get_cuda_rng_tracker().fork()``) and
   ``torch.cuda.{get_rng_state,manual_seed}`` act on a dedicated CPU ``torch.Generator`` standing in for the
   CUDA generator, so the tracker works and the process's default CPU generator is left alone.
5. The autograd engine runs ``torch.autograd.Function.backward`` with an empty torch-function-mode stack, so
   workaround 2 would not apply there; but Megatron's activation recomputation (``tensor_parallel.checkpoint``)
   re-runs the forward inside such a backward, and that forward builds e.g. the causal mask with
   ``device="cuda"``. Every custom backward therefore re-enters the mode (``BackwardCFunction.apply``).
6. Megatron DDP must not create CUDA streams: callers use ``overlap_grad_reduce=False`` on CPU
   (see :mod:`elas_megatron.parallel`), which keeps it on the default path; nothing is patched for that.

Nothing here runs when ``torch.cuda.is_available()``: the GPU path is Megatron-Core untouched.
The mode is entered once for the process (``enable_cpu_megatron`` is idempotent); it rewrites only calls
that name a CUDA device, which a CPU-only process could never execute anyway.
"""
from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_state: dict[str, object] = {}  # the one process-wide record Megatron's global design forces on us


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU (workaround 2)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(result, str):
            return result.replace("torch.", "torch.cuda.", 1)
        return result


def _keep_mode_in_custom_backward(mode: _CudaToCpu) -> None:
    from torch.autograd.function import BackwardCFunction
    from torch.overrides import _get_current_function_mode_stack

    def wrap(method):
        def run(self, *args):
            if mode in _get_current_function_mode_stack():
                return method(self, *args)
            with mode:
                return method(self, *args)
        return run

    BackwardCFunction.apply = wrap(BackwardCFunction.apply)
    BackwardCFunction.apply_boxed = wrap(BackwardCFunction.apply_boxed)


def cpu_mode_active() -> bool:
    """True when the workarounds are (or would be) needed: no usable CUDA device."""
    return not torch.cuda.is_available()


def enable_cpu_megatron() -> bool:
    """Apply the CPU workarounds once per process. Returns True if they are active."""
    if not cpu_mode_active():
        return False
    if _state.get("enabled"):
        return True
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = lambda: _CPU                              # 1
    torch.cuda.synchronize = lambda device=None: None                     # 3
    stand_in = torch.Generator()                                          # 4
    torch.cuda.get_rng_state = lambda device="cuda": stand_in.get_state()
    torch.cuda.manual_seed = lambda seed: stand_in.manual_seed(int(seed))
    mcore_random._get_cuda_rng_state = lambda *a, **k: stand_in.get_state()
    mcore_random._set_cuda_rng_state = lambda new_state, *a, **k: stand_in.set_state(new_state)
    mode = _CudaToCpu()                                                    # 2
    mode.__enter__()
    _keep_mode_in_custom_backward(mode)                                    # 5
    _state.update(enabled=True, mode=mode)
    logger.info("CUDA not available: Megatron-Core CPU workarounds enabled (elas_megatron.compat.cpu)")
    return True
