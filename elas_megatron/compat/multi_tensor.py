# SPDX-License-Identifier: Apache-2.0
"""Multi-tensor optimizer helpers for megatron-core without Apex or Transformer Engine.

megatron-core's optimizer wrappers copy gradients and parameters between the bf16 model and the fp32 master
copies, and compute the global gradient norm, through ``multi_tensor_applier`` with Apex's / TE's fused
multi-tensor kernels. Without either package (our CPU CI, and any bare GPU install: the framework must run
without TE) it falls back to ``megatron.core.utils.local_multi_tensor_*``, which loop in Python: the gradient
norm calls ``torch.norm`` per tensor and then builds ``torch.tensor(list_of_cuda_scalars)`` -- one host-device
synchronisation per parameter tensor (154 per step for the 1B dense model) -- and every copy runs as a multiply
by 1.0 followed by a copy (two kernels and a temporary per tensor). Measured on one H200 with the 1B models that
stalls the GPU for tens of milliseconds per step.

:func:`use_foreach_multi_tensor_ops` replaces those fallbacks, only where megatron selected them, by the same
operations written with PyTorch's ``torch._foreach_*`` multi-tensor kernels: one launch per dtype group and no
host synchronisation (the norm stays on the device until megatron's own single ``.item()``). The results are the
same up to floating-point summation order of the norm. Apex and TE kernels, when installed, are left alone.
"""
from __future__ import annotations

import logging

import torch

__all__ = ["foreach_l2_norm", "foreach_multi_tensor_applier", "foreach_scale", "use_foreach_multi_tensor_ops"]

logger = logging.getLogger(__name__)


def foreach_scale(chunk_size: int, noop_flag: torch.Tensor | None, tensor_lists: list[list[torch.Tensor]],
                  scale: float) -> None:
    """``dst = src * scale`` for every pair of ``tensor_lists = [srcs, dsts]`` (amp_C.multi_tensor_scale)."""
    srcs, dsts = tensor_lists
    if not srcs:
        return
    if all(s is d for s, d in zip(srcs, dsts, strict=True)):
        if scale != 1.0:
            torch._foreach_mul_(dsts, scale)
        return
    torch._foreach_copy_(dsts, srcs if scale == 1.0 else torch._foreach_mul(srcs, scale))


def foreach_l2_norm(chunk_size: int, noop_flag: torch.Tensor | None, tensor_lists: list[list[torch.Tensor]],
                    per_tensor: bool, *args) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The L2 norm over all tensors of ``tensor_lists[0]`` as a 1-element fp32 device tensor (amp_C's contract)."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32), None
    per = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))  # fp32 norms of bf16 grads too
    total = torch.linalg.vector_norm(per).reshape(1)
    return total, (per if per_tensor else None)


def foreach_multi_tensor_applier(op, noop_flag, tensor_lists, *args):
    """megatron's ``multi_tensor_applier`` signature: apply ``op`` to whole tensor lists."""
    return op(2048 * 32, noop_flag, tensor_lists, *args)


def use_foreach_multi_tensor_ops(enabled: bool = True) -> bool:
    """Swap megatron's per-tensor Python fallbacks for foreach kernels, or back (``enabled=False``); idempotent.

    Only module attributes that hold megatron's own ``local_multi_tensor_*`` fallbacks (or, to undo, ours) are
    replaced, so an Apex or TE installation keeps its fused kernels. Returns True if the foreach ops are in use.
    The swap is process-wide, like megatron's own choice of implementation at import time.
    """
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads, optimizer

    replacements = {"multi_tensor_applier": (mcore_utils.local_multi_tensor_applier, foreach_multi_tensor_applier),
                    "multi_tensor_scale_impl": (mcore_utils.local_multi_tensor_scale, foreach_scale),
                    "l2_norm_impl": (mcore_utils.local_multi_tensor_l2_norm, foreach_l2_norm)}
    in_use = False
    for module in (optimizer, clip_grads):
        for name, (fallback, ours) in replacements.items():
            current = getattr(module, name, None)
            if current is fallback and enabled:
                setattr(module, name, ours)
            elif current is ours and not enabled:
                setattr(module, name, fallback)
            in_use |= getattr(module, name, None) is ours
    return in_use
