# SPDX-License-Identifier: Apache-2.0
"""The one place that picks how the ELAS sparse core runs: plain-PyTorch reference or a fused GPU path.

Backends:
  * ``"reference"``: :mod:`elas_megatron.kernels.reference` (any device; the definition of correct).
  * ``"triton"``: fused Triton kernels (relu^2 + 2:4 select + compress fused into the forward GEMM or a separate
    pass; factor and decoding fused into the backward GEMMs; only the compressed activation saved), dense math on
    the tensor cores; each GEMM's variant (Triton-fused or cuBLAS) timed per shape. CUDA only.
  * ``"cusparselt"``: as "triton", but the forward GEMM runs on the 2:4 sparse tensor cores (cuSPARSELt), fed
    directly by the fused compress kernel. CUDA sm80+, 16-bit dtypes.
  * ``"auto"``: on CUDA the GPU path with every variant (cuSPARSELt included) timed once per shape and cached
    (:mod:`elas_megatron.kernels.elas_core`); on CPU (or without Triton) the reference. Logged once.
Naming a backend explicitly fails loudly (:class:`KernelUnavailableError`) when it cannot run.
``sparse=False`` (the dense network) always runs the reference: it is plain cuBLAS work already.

:func:`lowrank_relu2_sparse24_matmul` is the same op with the up-projection's ``h @ B_up`` inside, which is what
the ELAS FFN calls: on the GPU path (masked gradients) the input gradient ``grad_y1 @ B_up^T`` can then use the
2:4 pattern as well ("cusparselt" forces it, "auto" times it); everywhere else it is ``h @ B_up`` followed by
:func:`relu2_sparse24_matmul`.
"""
from __future__ import annotations

import logging

import torch

from elas_megatron.kernels.reference import GRAD_MODES, relu2_sparse24_matmul_reference

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "KernelUnavailableError", "relu2_sparse24_matmul", "lowrank_relu2_sparse24_matmul",
           "gpu_unavailable_reason"]

BACKENDS = ("auto", "reference", "triton", "cusparselt")

_LOGGED: set[tuple] = set()


class KernelUnavailableError(RuntimeError):
    """An explicitly requested kernel backend cannot run for these inputs on this machine."""


def _log_once(key: tuple, msg: str, *args) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info(msg, *args)


def gpu_unavailable_reason(y1: torch.Tensor, backend: str = "triton") -> str | None:
    """``None`` if the fused GPU path (``backend`` "triton" or "cusparselt") can run on ``y1``, else why not."""
    if not y1.is_cuda:
        return f"y1 is on {y1.device}, the fused kernels need CUDA"
    from elas_megatron.kernels import triton_sparse24

    if not triton_sparse24.HAS_TRITON:
        return "the `triton` package is not installed"
    if y1.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {y1.dtype} is not supported (float32, bfloat16, float16)"
    if backend == "cusparselt":
        from elas_megatron.kernels.cusparselt import cusparselt_unavailable_reason

        if y1.element_size() != 2:
            return f"cuSPARSELt 2:4 needs a 16-bit dtype, got {y1.dtype}"
        return cusparselt_unavailable_reason(y1.device, y1.dtype)
    return None


def relu2_sparse24_matmul(y1: torch.Tensor, weight: torch.Tensor, *, sparse: bool = True, grad_mode: str = "masked",
                          backend: str = "auto") -> torch.Tensor:
    """``sparse24(relu(y1)**2) @ weight`` through the chosen backend (see :mod:`elas_megatron.kernels.reference`).

    Args:
        y1: ``[..., f]`` pre-activation (f a multiple of 4).
        weight: ``[f, r]`` ``A_down`` (or its tensor-parallel row shard); cast to ``y1.dtype`` on the GPU path.
        sparse: apply the 2:4 selection (False: the same network dense, always the reference).
        grad_mode: "masked" or "dense".
        backend: one of :data:`BACKENDS`.
    Returns:
        ``[..., r]``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} is unknown; choose one of {BACKENDS}")
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode={grad_mode!r}: choose one of {GRAD_MODES}")
    if backend == "reference" or not sparse:
        return relu2_sparse24_matmul_reference(y1, weight, sparse=sparse, grad_mode=grad_mode)
    if backend == "auto":
        reason = gpu_unavailable_reason(y1, "triton")
        if reason is not None:
            _log_once(("auto", "reference", y1.device.type, reason),
                      "ELAS core: backend auto -> reference (%s)", reason)
            return relu2_sparse24_matmul_reference(y1, weight, sparse=sparse, grad_mode=grad_mode)
        fwd = "auto"
    else:
        reason = gpu_unavailable_reason(y1, backend)
        if reason is not None:
            raise KernelUnavailableError(f"kernel backend {backend!r} cannot run: {reason}. "
                                         f"Use backend='auto' (falls back) or 'reference'.")
        fwd = "dense-only" if backend == "triton" else "cusparselt"
    from elas_megatron.kernels.elas_core import relu2_sparse24_matmul_gpu

    _log_once((backend, y1.device.type, y1.dtype), "ELAS core: backend %s -> fused GPU path (%s, forward %s)",
              backend, y1.dtype, fwd)
    return relu2_sparse24_matmul_gpu(y1, weight.to(y1.dtype), grad_mode=grad_mode, fwd=fwd)


def lowrank_relu2_sparse24_matmul(h: torch.Tensor, up_weight: torch.Tensor, weight: torch.Tensor, *,
                                  sparse: bool = True, grad_mode: str = "masked",
                                  backend: str = "auto") -> torch.Tensor:
    """``sparse24(relu(h @ up_weight)**2) @ weight``: the ELAS FFN's core from the up-projection's hidden ``h``.

    Args:
        h: ``[..., r_up]`` ``sigma(x A_up)``.
        up_weight: ``[r_up, f]`` ``B_up`` (this rank's column shard under TP).
        weight: ``[f, r]`` ``A_down`` (this rank's row shard under TP).
        sparse, grad_mode, backend: as :func:`relu2_sparse24_matmul`.
    Returns:
        ``[..., r]``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} is unknown; choose one of {BACKENDS}")
    fused = sparse and grad_mode == "masked" and backend != "reference"
    if fused:
        reason = gpu_unavailable_reason(h, "triton" if backend == "auto" else backend)
        if reason is not None and backend != "auto":
            raise KernelUnavailableError(f"kernel backend {backend!r} cannot run: {reason}. "
                                         f"Use backend='auto' (falls back) or 'reference'.")
        fused = reason is None
    if not fused:
        return relu2_sparse24_matmul(torch.matmul(h, up_weight), weight, sparse=sparse, grad_mode=grad_mode,
                                     backend=backend)
    from elas_megatron.kernels.elas_core import lowrank_relu2_sparse24_matmul_gpu

    fwd, grad_h = {"auto": ("auto", "auto"), "triton": ("dense-only", "dense"),
                   "cusparselt": ("cusparselt", "sparse")}[backend]
    _log_once((backend, "lowrank", h.device.type, h.dtype),
              "ELAS core (with B_up): backend %s -> fused GPU path (%s, forward %s, grad_h %s)",
              backend, h.dtype, fwd, grad_h)
    return lowrank_relu2_sparse24_matmul_gpu(h, up_weight.to(h.dtype), weight.to(h.dtype), fwd=fwd, grad_h=grad_h)
