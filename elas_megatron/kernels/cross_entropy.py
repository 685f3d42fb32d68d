# SPDX-License-Identifier: Apache-2.0
"""Output layer + cross-entropy in one op, on Liger-Kernel's fused linear cross-entropy (``model.loss_backend=liger``).

megatron's path computes the logits ``[tokens, vocab]`` in bf16, casts them to fp32 and runs the vocab-parallel
cross-entropy over them: at the 1B shape and 40k tokens per micro-batch that is 16 GiB of logits in flight and
about a dozen passes over them (38 ms forward + backward on an H200, of which the three GEMMs are ~22 ms).
Liger-Kernel (a maintained package) computes the logits chunk by chunk, turns each chunk into its loss and its
logits gradient in one Triton pass, and projects that gradient onto the hidden states and the output weight at
once, so the logits are never held whole (27 ms and 16 GiB less at that shape).

Why a wrapper of our own: megatron's model contract returns the *per-token* losses (the trainer weights them by
the loss mask), and Liger's autograd function computes its gradients in the forward only for a summed or averaged
loss; for per-token losses it recomputes all chunks in the backward (a fourth logits-sized GEMM). Here Liger's
chunked forward runs with per-token losses and gradients of weight 1 per kept token, and the backward scales them:
the hidden-state gradient row by row (exact for any per-token weights), the weight gradient by the one weight the
kept tokens share. That is exact whenever every kept token enters the final loss with the same weight -- the
token mean over the loss mask that the trainer computes, a plain sum, or a mean; masked tokens
(``keep = False``) get no loss and no gradient. Tokens weighted unequally must use ``model.loss_backend=megatron``.

The plain twin is megatron's output layer + ``vocab_parallel_cross_entropy`` (tests compare losses and gradients).
"""
from __future__ import annotations

import torch

__all__ = ["IGNORE_INDEX", "fused_linear_cross_entropy", "liger_unavailable_reason"]

IGNORE_INDEX = -100


def liger_unavailable_reason(device: torch.device | str) -> str | None:
    """Why the fused op cannot run on ``device`` (None if it can): no liger-kernel, or not a CUDA device.

    Under Triton's interpreter (``TRITON_INTERPRET=1``, the CPU tests) the kernels also run on CPU tensors.
    """
    import os

    try:
        import liger_kernel.ops.fused_linear_cross_entropy  # noqa: F401
    except ImportError as exc:
        return f"liger-kernel is not importable ({exc}); pip install 'elas-megatron[liger]'"
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the model is not on a CUDA device"
    return None


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                keep: torch.Tensor) -> torch.Tensor:
        from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, _, _, _, grad_hidden, grad_weight, _ = fused_linear_cross_entropy_forward(
            _input=hidden, weight=weight, target=target, ignore_index=IGNORE_INDEX, reduction="none",
            accum_dtype=torch.float32, compute_gradients=needs_grad, weight_requires_grad=ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight, keep)
        return loss                                                            # [N] fp32, 0 where not kept

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden_unit, grad_weight_unit, keep = ctx.saved_tensors
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = grad_hidden_unit * grad_loss.unsqueeze(-1).to(grad_hidden_unit.dtype)
        if ctx.needs_input_grad[1]:
            kept = keep.sum().clamp_min(1)
            shared = (grad_loss * keep).sum() / kept                       # the kept tokens' common weight
            grad_weight = grad_weight_unit * shared.to(grad_weight_unit.dtype)
        return grad_hidden, grad_weight, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token ``cross_entropy(hidden @ weight.T, target)`` without materialising the logits.

    Args:
        hidden: ``[N, h]`` final hidden states (bf16 on GPU).
        weight: ``[V, h]`` output-layer weight.
        target: ``[N]`` token ids.
        keep: ``[N]`` bool, the tokens that count (the loss mask); None = all. The backward is exact when all kept
            tokens enter the final loss with the same weight (see the module docstring).
    Returns:
        ``[N]`` fp32 losses, 0 for tokens not kept.
    """
    if keep is None:
        keep = torch.ones_like(target, dtype=torch.bool)
    target = torch.where(keep, target, torch.full_like(target, IGNORE_INDEX))
    return _FusedLinearCrossEntropy.apply(hidden.contiguous(), weight, target.contiguous(), keep)
