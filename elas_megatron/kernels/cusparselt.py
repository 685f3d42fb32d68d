# SPDX-License-Identifier: Apache-2.0
"""cuSPARSELt (through PyTorch's ``torch._cslt_*`` ops): the 2:4 sparse-tensor-core GEMM ``s @ W`` of the ELAS
forward (arXiv 2605.03667, Sec. 3), with the capability checks and a per-shape algorithm choice.

The sparse operand is the activation ``s [T, F]`` (2:4 along F, the GEMM's K), already compressed by
:func:`elas_megatron.kernels.triton_sparse24.relu2_sparse24_compress` in cuSPARSELt's own format, so no
``torch._cslt_compress`` pass is needed. Only 16-bit dtypes (fp32 uses 1:2 sparsity in cuSPARSELt, not 2:4).
The GEMM runs through :mod:`elas_megatron.kernels.cusparselt_lib` (the same library, plans cached per shape)
when its one-time self-check passes, else through ``torch._cslt_sparse_mm``.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from elas_megatron.kernels.cusparselt_lib import transposed_result_ok

logger = logging.getLogger(__name__)

__all__ = ["cusparselt_unavailable_reason", "cslt_mm", "cslt_search_alg_id", "CsltConfig", "IMPL_ENV",
           "transposed_result_ok"]

IMPL_ENV = "ELAS_CUSPARSELT_IMPL"
"""Overrides how :func:`cslt_mm` reaches cuSPARSELt: ``lib`` (cached plans) or ``torch`` (the escape hatch)."""


@functools.lru_cache(maxsize=None)
def _device_reason(device_index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(device_index)
    if major < 8:
        return f"2:4 sparse tensor cores need sm80 or newer, device {device_index} is sm{major}{minor}"
    return None


def cusparselt_unavailable_reason(device: torch.device | None = None, dtype: torch.dtype | None = None) -> str | None:
    """``None`` when cuSPARSELt's 2:4 GEMM can run on ``device``, else why not (for logs and errors).

    With ``dtype`` (16-bit) it also checks, once per device and dtype, that the fused kernel's metadata layout is
    byte-identical to ``torch._cslt_compress`` here (the layout was measured on one cuSPARSELt version and arch).
    """
    if not torch.cuda.is_available():
        return "no CUDA"
    if not hasattr(torch, "_cslt_sparse_mm"):
        return f"this PyTorch build ({torch.__version__}) has no torch._cslt_sparse_mm"
    backend = getattr(torch.backends, "cusparselt", None)
    if backend is None or not backend.is_available():
        return f"this PyTorch build ({torch.__version__}) was built without cuSPARSELt"
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    reason = _device_reason(index)
    if reason is None and dtype is not None:
        if dtype not in (torch.bfloat16, torch.float16):
            return f"cuSPARSELt 2:4 needs a 16-bit dtype, got {dtype}"
        reason = _layout_reason(index, dtype)
    return reason


@functools.lru_cache(maxsize=None)
def _layout_reason(device_index: int, dtype: torch.dtype) -> str | None:
    from elas_megatron.kernels import triton_sparse24 as tk

    if not tk.HAS_TRITON:
        return "the `triton` package is not installed"
    g = torch.Generator(device=f"cuda:{device_index}").manual_seed(0)
    y = (torch.rand(256, 256, device=f"cuda:{device_index}", generator=g) + 0.1).to(dtype)   # 2 non-zeros/group
    c, dense = tk.relu2_sparse24_compress(y, layout="cusparselt", write_dense=True)
    ref = torch._cslt_compress(dense).reshape(-1)
    if ref.numel() != c.buffer.numel() or not torch.equal(ref.view(torch.int16), c.buffer.view(torch.int16)):
        logger.warning("cuSPARSELt %s on device %d stores 2:4 metadata differently from our kernel: "
                       "sparse GEMM path disabled", torch.backends.cusparselt.version(), device_index)
        return (f"the metadata layout of cuSPARSELt {torch.backends.cusparselt.version()} on this device differs "
                f"from the fused kernel's (see elas_megatron/kernels/layout.py)")
    return None


class CsltConfig:
    """How to call cuSPARSELt for one shape: algorithm id, dense operand order, result order."""

    __slots__ = ("alg_id", "weight_col_major", "transpose_result")

    def __init__(self, alg_id: int = 0, weight_col_major: bool = False, transpose_result: bool = False):
        self.alg_id, self.weight_col_major, self.transpose_result = alg_id, weight_col_major, transpose_result

    def __repr__(self) -> str:
        return (f"CsltConfig(alg_id={self.alg_id}, weight_col_major={self.weight_col_major}, "
                f"transpose_result={self.transpose_result})")


def _dense_operand(weight: torch.Tensor, cfg: CsltConfig) -> torch.Tensor:
    # cuSPARSELt reads B row-major when it is contiguous and as op(B)=B^T of a row-major [n, k] otherwise.
    return weight.t().contiguous().t() if cfg.weight_col_major else weight.contiguous()


def _as_2d(buffer: torch.Tensor, k: int) -> torch.Tensor:
    # PyTorch >= 2.6 expects the compressed matrix as [m, k * 9/16] (as torch._cslt_compress returns it).
    m = buffer.numel() * 16 // (9 * k)
    return buffer.view(m, -1)


def cslt_mm(buffer: torch.Tensor, weight: torch.Tensor, cfg: CsltConfig | None = None, *,
            impl: str = "auto") -> torch.Tensor:
    """``s @ weight`` with ``s`` in cuSPARSELt's compressed ``buffer`` (``[m, k]``, k = ``weight.shape[0]``).

    Args:
        impl: ``"lib"``: our ctypes binding with the plan cached per shape
            (:mod:`elas_megatron.kernels.cusparselt_lib`); ``"torch"``: ``torch._cslt_sparse_mm`` (re-plans every
            call); ``"auto"``: the environment variable ``ELAS_CUSPARSELT_IMPL`` (``lib``/``torch``) when set,
            else the binding where its one-time self-check against PyTorch passed, else PyTorch.
    Returns:
        ``[m, n]`` (a transposed view when ``cfg.transpose_result``).
    """
    cfg = cfg or CsltConfig()
    if cfg.transpose_result and not transposed_result_ok(buffer.dtype):
        raise ValueError(f"{cfg!r}: a column-major result is not used for {buffer.dtype} (see transposed_result_ok)")
    a, b = _as_2d(buffer, weight.shape[0]), _dense_operand(weight, cfg)
    if impl == "auto":
        impl = os.environ.get(IMPL_ENV) or ("lib" if _binding_ok(a.device, a.dtype) else "torch")
    if impl == "lib":
        from elas_megatron.kernels.cusparselt_lib import lib_mm

        out = lib_mm(a, b, weight_col_major=cfg.weight_col_major, transpose_result=cfg.transpose_result,
                     alg_id=cfg.alg_id)
    elif impl == "torch":
        out = torch._cslt_sparse_mm(a, b, alg_id=cfg.alg_id, transpose_result=cfg.transpose_result)
    else:
        raise ValueError(f"impl={impl!r} (argument or {IMPL_ENV}): choose 'auto', 'lib' or 'torch'")
    return out.t() if cfg.transpose_result else out


@functools.lru_cache(maxsize=None)
def _binding_ok(device: torch.device, dtype: torch.dtype) -> bool:
    from elas_megatron.kernels.cusparselt_lib import binding_unavailable_reason

    index = device.index if device.index is not None else torch.cuda.current_device()
    reason = binding_unavailable_reason(index, dtype)
    if reason is None:
        logger.info("cuSPARSELt: direct binding with cached plans on cuda:%d (%s)", index, dtype)
    else:
        logger.warning("cuSPARSELt: using torch._cslt_sparse_mm (re-plans every call): %s", reason)
    return reason is None


def cslt_search_alg_id(buffer: torch.Tensor, weight: torch.Tensor, cfg: CsltConfig) -> int:
    """cuSPARSELt's own algorithm search for this shape (``torch._cslt_sparse_mm_search``)."""
    search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    a, b = _as_2d(buffer, weight.shape[0]), _dense_operand(weight, cfg)
    if search is not None:    # PyTorch >= 2.11 (torch._cslt_sparse_mm_search is deprecated there)
        found = search(a, b, None, None, None, cfg.transpose_result)
    else:
        found = torch._cslt_sparse_mm_search(a, b, transpose_result=cfg.transpose_result)
    return int(found[0] if isinstance(found, (tuple, list)) else found)
