"""Plain-PyTorch reference of the ELAS FFN's sparse core: ``z = sparse24(relu(y1)**2) @ W``.

This is the op that the fused GPU kernels replace (squared ReLU + 2:4 selection + compression + sparse GEMM),
written as an autograd function with the same save/recompute policy so that memory behaviour and gradients
can be compared one to one. It is the definition every kernel is tested against.

Backward (arXiv 2605.03667, Sec. 3; recipe of arXiv 2503.16672):
  * ``grad_W = s^T @ grad_z`` uses the saved sparse ``s``;
  * ``grad_s = grad_z @ W^T``;
  * ``grad_mode="masked"`` (default): ``grad_y2 = grad_s * mask`` -- the exact gradient of the sparsified
    function, i.e. straight-through to the kept entries only. Only ``s`` is saved: at kept entries
    ``relu(y1) = sqrt(s)``, so ``grad_y1 = grad_s * 2 * sqrt(s)`` needs neither ``y1`` nor the mask.
  * ``grad_mode="dense"``: the masked-dense alternative, ``grad_y2 = grad_s`` on every entry (straight-through
    estimator through the selection); needs ``relu(y1)`` dense, which is saved instead.
``sparse=False`` computes the same network dense (``s = relu(y1)**2``): the ablation and warm-up path.
"""
from __future__ import annotations

import torch

from elas_megatron.sparsity.masks import sparse24_mask

__all__ = ["relu2_sparse24_matmul_reference", "GRAD_MODES"]

GRAD_MODES = ("masked", "dense")


def _keep(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the dropped entries (``where``, not ``x * mask``: a dropped inf must become 0, not NaN)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


class _Relu2Sparse24Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y1: torch.Tensor, weight: torch.Tensor, sparse: bool, grad_mode: str) -> torch.Tensor:
        r = torch.relu(y1)                                   # [..., f]
        if not sparse:
            s = r * r
            ctx.save_for_backward(r, weight)
            ctx.kind = "dense_net"
        elif grad_mode == "masked":
            s = _keep(r * r, sparse24_mask(r))               # relu(y1)**2 >= 0: magnitude order = order of r
            ctx.save_for_backward(s, weight)
            ctx.kind = "masked"
        else:
            mask = sparse24_mask(r)
            s = _keep(r * r, mask)
            ctx.save_for_backward(r, mask, weight)
            ctx.kind = "ste"
        return s @ weight                                     # [..., r]

    @staticmethod
    def backward(ctx, grad_z: torch.Tensor):
        if ctx.kind == "masked":
            s, weight = ctx.saved_tensors
            grad_y1_factor = 2 * torch.sqrt(s)
        elif ctx.kind == "dense_net":
            r, weight = ctx.saved_tensors
            s = r * r
            grad_y1_factor = 2 * r
        else:
            r, mask, weight = ctx.saved_tensors
            s = _keep(r * r, mask)
            grad_y1_factor = 2 * r
        grad_s = grad_z @ weight.t()                          # [..., f]
        grad_y1 = grad_s * grad_y1_factor
        grad_w = s.reshape(-1, s.shape[-1]).t() @ grad_z.reshape(-1, grad_z.shape[-1])  # [f, r]
        return grad_y1, grad_w.to(weight.dtype), None, None


def relu2_sparse24_matmul_reference(y1: torch.Tensor, weight: torch.Tensor, *, sparse: bool = True,
                                    grad_mode: str = "masked") -> torch.Tensor:
    """``sparse24(relu(y1)**2) @ weight`` (or ``relu(y1)**2 @ weight`` when ``sparse=False``).

    Args:
        y1: ``[..., f]`` pre-activation of the FFN (f a multiple of 4).
        weight: ``[f, r]`` the down-projection's first low-rank factor ``A_down`` (a TP shard of it under TP).
        sparse: apply the 2:4 selection.
        grad_mode: "masked" or "dense" (see module docstring).
    Returns:
        ``[..., r]``.
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode={grad_mode!r}: choose one of {GRAD_MODES}")
    return _Relu2Sparse24Matmul.apply(y1, weight, sparse, grad_mode)
