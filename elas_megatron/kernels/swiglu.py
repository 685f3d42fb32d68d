# SPDX-License-Identifier: Apache-2.0
"""``silu(gate) * up`` of CoLA's SwiGLU FFN with gate and up as separate tensors (``model.lowrank_parts=separate``).

megatron's fused SwiGLU (``bias_swiglu_impl``) takes the ``[tokens, 2 x d_ff]`` concatenation that its fused
``linear_fc1`` produces. A low-rank ``linear_fc1`` produces gate and up by two separate ``B`` products, so
concatenating them only to split them again costs a copy of ``[tokens, 2 x d_ff]`` each way. Here the two tensors
go to Liger-Kernel's SwiGLU (a maintained Triton kernel: one read of gate and up, one write; the backward
recomputes ``silu(gate)`` and writes the two gradients over the saved inputs, which nothing else reads) on CUDA,
or to the plain PyTorch expression (its twin, used on CPU and by the tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["swiglu", "swiglu_reference"]


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _liger_runs(t: torch.Tensor) -> bool:
    if t.device.type != "cuda":  # (its kernel does not run under Triton's CPU interpreter)
        return False
    try:
        import liger_kernel.ops.swiglu  # noqa: F401
    except ImportError:
        return False
    return True


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, fused where Liger-Kernel can run (``[..., d]`` tensors of one shape)."""
    if gate.shape == up.shape and _liger_runs(gate):
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply(gate, up)
    return swiglu_reference(gate, up)
