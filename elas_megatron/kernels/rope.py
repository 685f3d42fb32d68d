# SPDX-License-Identifier: Apache-2.0
"""Rotary position embedding (RoPE) of q and k as one Triton pass each, forward and backward.

Why: without Transformer Engine, megatron-core applies RoPE with unfused PyTorch ops
(``_apply_rotary_pos_emb_bshd``: multiply, negate, two concatenations, multiply, add, a final concatenation with
the empty pass-through part), about six reads and five writes of q and of k per layer in the forward and as many
in the backward. On the H100 that made the attention block (whose GEMMs are low-rank and cheap in cola/elas) the
largest part of an elas training step. Here each tensor is read once and written once; the rotation is done in
fp32 and rounded once (megatron's unfused version rounds after each bf16 op, so the two differ by bf16 rounding).

Convention (megatron's non-interleaved RoPE, ``rotary_percent=1``): ``freqs`` is ``[s, 1, 1, d]`` with
``freqs[..., :d/2] == freqs[..., d/2:]``; with ``x = [x1 | x2]`` along the head dimension,
``y = [x1 cos - x2 sin | x2 cos + x1 sin]``. The backward is the same rotation by ``-angle``.

:func:`rope_reference` is the plain-PyTorch twin (the definition of correct; megatron's formula).
Triton is optional: importing this module without it works, :func:`fused_rope` then raises. Under Triton's
interpreter (``TRITON_INTERPRET=1``) the kernel also runs on CPU tensors: that is how CI tests it.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "fused_rope", "fused_rope_unavailable_reason", "rope_reference"]


def rope_reference(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``t [s, b, h, d]`` rotated by ``freqs [s, 1, 1, d]`` (megatron's unfused formula, computed in fp32)."""
    x1, x2 = t.float().chunk(2, dim=-1)
    cos, sin = freqs.float().cos(), freqs.float().sin()
    rotated = torch.cat((-x2, x1), dim=-1)
    return (t.float() * cos + rotated * sin).to(t.dtype)


def interpreted() -> bool:
    """Triton's interpreter is on: kernels run (slowly) on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def fused_rope_unavailable_reason(t: torch.Tensor, freqs: torch.Tensor) -> str | None:
    """``None`` if :func:`fused_rope` can run on these inputs, else why not (the caller falls back)."""
    if not HAS_TRITON:
        return "the `triton` package is not installed"
    if not t.is_cuda and not interpreted():
        return f"tensor on {t.device}"
    if t.dim() != 4 or freqs.dim() != 4 or freqs.shape[-1] != t.shape[-1] or freqs.shape[0] < t.shape[0]:
        return f"shapes t {tuple(t.shape)}, freqs {tuple(freqs.shape)} (need [s,b,h,d] and [>=s,1,1,d])"
    if freqs.shape[1] != 1 or freqs.shape[2] != 1:
        return "freqs must be broadcast over batch and heads"
    if t.shape[-1] % 2:
        return f"odd head dimension {t.shape[-1]}"
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {t.dtype}"
    return None


if HAS_TRITON:

    @triton.jit
    def _rope_kernel(x_ptr, f_ptr, y_ptr, B, H, sxs, sxb, sxh, sfs, sign,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        """One (position, sample) row: all heads, both halves. y is contiguous [s, b, h, d]."""
        row = tl.program_id(0)
        s = row // B
        b = row % B
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HALF
        f = tl.load(f_ptr + s * sfs + offs_d, mask=dmask, other=0.0).to(tl.float32)
        cos = tl.cos(f)[None, :]
        sin = (tl.sin(f) * sign)[None, :]
        mask = (offs_h[:, None] < H) & dmask[None, :]
        src = x_ptr + s * sxs + b * sxb + offs_h[:, None] * sxh + offs_d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        dst = y_ptr + row * (H * 2 * HALF) + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
        tl.store(dst, (x1 * cos - x2 * sin).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (x2 * cos + x1 * sin).to(y_ptr.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, freqs: torch.Tensor, sign: float) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    s, b, h, d = x.shape
    out = torch.empty((s, b, h, d), dtype=x.dtype, device=x.device)
    if out.numel():
        half = d // 2
        block_h = triton.next_power_of_2(h)
        block_d = triton.next_power_of_2(half)
        warps = 4 if block_h * block_d >= 2048 else (2 if block_h * block_d >= 512 else 1)
        _rope_kernel[(s * b,)](x, freqs, out, b, h, x.stride(0), x.stride(1), x.stride(2), freqs.stride(0), sign,
                               HALF=half, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps)
    return out


class _FusedRoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(freqs)
        return _rotate(x, freqs, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (freqs,) = ctx.saved_tensors
        return _rotate(grad, freqs, -1.0), None


def fused_rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE of ``t [s, b, h, d]`` (any strides with a unit last stride; e.g. a view of the fused QKV output) by
    ``freqs [>= s, 1, 1, d]`` (fp32 angles, megatron's ``RotaryEmbedding`` output). Returns a contiguous tensor;
    differentiable in ``t`` (the angles get no gradient, as in megatron)."""
    reason = fused_rope_unavailable_reason(t, freqs)
    if reason is not None:
        raise RuntimeError(f"fused RoPE cannot run: {reason}")
    return _FusedRoPE.apply(t, freqs.detach().float().contiguous())
