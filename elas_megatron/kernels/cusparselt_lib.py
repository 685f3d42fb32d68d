# SPDX-License-Identifier: Apache-2.0
"""A direct ctypes binding to the cuSPARSELt library PyTorch loaded, with the matmul plan cached per shape.

Why: ``torch._cslt_sparse_mm`` initialises descriptors, an algorithm selection and a plan, and queries the
workspace, on every call. On an H100 one synchronized 1B-shape call took 1.24 ms for ~0.3 ms of GPU work
(docs/kernels.md); with two sparse GEMMs per ELAS layer (the forward and ``grad_h``) that host time is paid
twice per layer and micro-batch. Here the plan for ``(device, m, k, n, dtype, B order, result order, algorithm)``
is built once and each call is one ``cusparseLtMatmul`` on the current stream.

The library is the very ``libcusparseLt`` that PyTorch itself uses (found among the process's loaded libraries),
so algorithm ids from ``torch._cslt_sparse_mm_search`` mean the same here and results are bit-identical to
PyTorch's for the same configuration; :func:`binding_unavailable_reason` checks exactly that once per device
and dtype before the binding is used, and falls back to PyTorch's op otherwise.

Descriptors follow PyTorch's own use of cuSPARSELt: ``A`` (the compressed 2:4 activation) row-major
``[m, k]``; ``B`` row-major ``[k, n]`` (op N) or, column-major, the row-major ``[n, k]`` with op T; ``D``
row-major ``[m, n]`` or column-major (``transpose_result``); fp32 compute for 16-bit inputs.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)

__all__ = ["binding_unavailable_reason", "lib_mm", "clear_lib_plans", "transposed_result_ok"]

# Opaque structs are 512 bytes (cuSPARSELt 0.10) or 1024 (older releases); reserve more, 16-byte aligned.
_STRUCT_BYTES = 2048
_CUDA_TYPES = {torch.float16: 2, torch.bfloat16: 14}          # cudaDataType: CUDA_R_16F, CUDA_R_16BF
_ORDER_COL, _ORDER_ROW = 1, 2                                 # cusparseOrder_t
_OP_N, _OP_T = 0, 1                                           # cusparseOperation_t
_COMPUTE_32F = 2                                              # cusparseComputeType {32I, 16F, 32F} since 0.5.2
_SPARSITY_50 = 0
_ALG_DEFAULT = 0
_ALG_CONFIG_ID = 0                                            # cusparseLtMatmulAlgAttribute_t
_P, _I64, _U32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int

_SIGNATURES = {
    "cusparseLtInit": [_P],
    "cusparseLtDenseDescriptorInit": [_P, _P, _I64, _I64, _I64, _U32, _INT, _INT],
    "cusparseLtStructuredDescriptorInit": [_P, _P, _I64, _I64, _I64, _U32, _INT, _INT, _INT],
    "cusparseLtMatmulDescriptorInit": [_P, _P, _INT, _INT, _P, _P, _P, _P, _INT],
    "cusparseLtMatmulAlgSelectionInit": [_P, _P, _P, _INT],
    "cusparseLtMatmulAlgSetAttribute": [_P, _P, _INT, _P, ctypes.c_size_t],
    "cusparseLtMatmulPlanInit": [_P, _P, _P, _P],
    "cusparseLtMatmulGetWorkspace": [_P, _P, _P],
    "cusparseLtMatmul": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int32],
}


def transposed_result_ok(dtype: torch.dtype) -> bool:
    """Whether configurations with a column-major result (``transpose_result``) may be used for ``dtype``.

    Not for fp16: on an H100 (torch 2.11, cuSPARSELt 0.8) cuSPARSELt's algorithm search for an fp16 GEMM with a
    column-major result failed with "internal error" followed by "illegal instruction" (poisoning the CUDA
    context), already at 128x128x64; fp16 with a row-major result and every bf16 configuration pass
    (docs/kernels.md, "fp16").
    """
    return dtype != torch.float16


class _Struct:
    """A 16-byte aligned opaque struct kept alive as long as its owner."""

    def __init__(self) -> None:
        self._raw = ctypes.create_string_buffer(_STRUCT_BYTES + 16)
        base = ctypes.addressof(self._raw)
        self.ptr = base + (-base % 16)


def _library_path() -> str | None:
    """The libcusparseLt mapped into this process (PyTorch's), else the one of the nvidia wheel."""
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                if "libcusparseLt" in line:
                    return line.split()[-1]
    except OSError:
        pass
    try:
        import nvidia  # noqa: F401  (namespace package of the CUDA wheels)

        for root in nvidia.__path__:
            for sub in os.listdir(root):
                lib = os.path.join(root, sub, "lib", "libcusparseLt.so.0")
                if os.path.exists(lib):
                    return lib
    except (ImportError, OSError):
        pass
    return None


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if not (torch.cuda.is_available() and torch.backends.cusparselt.is_available()):
        return None, "no CUDA build with cuSPARSELt"
    torch.backends.cusparselt.version()                       # makes PyTorch load its cuSPARSELt
    path = _library_path()
    if path is None:
        return None, "libcusparseLt is not among the loaded libraries and no nvidia wheel has it"
    try:
        lib = ctypes.CDLL(path)
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
    except (OSError, AttributeError) as exc:
        return None, f"cannot bind {path}: {exc}"
    return lib, None


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuSPARSELt {what} failed with status {status}")


@functools.lru_cache(maxsize=None)
def _handle(device_index: int) -> _Struct:
    lib, _ = _load()
    handle = _Struct()
    with torch.cuda.device(device_index):
        _check(lib.cusparseLtInit(handle.ptr), "cusparseLtInit")
    return handle


class _Plan:
    """Descriptors, algorithm selection and plan of one GEMM shape/configuration (never freed: few per run)."""

    def __init__(self, device_index: int, m: int, k: int, n: int, dtype: torch.dtype, weight_col_major: bool,
                 transpose_result: bool, alg_id: int) -> None:
        lib, _ = _load()
        self.handle = _handle(device_index)
        h = self.handle.ptr
        self.mat_a, self.mat_b, self.mat_c, self.matmul, self.alg, self.plan = (_Struct() for _ in range(6))
        t = _CUDA_TYPES[dtype]
        with torch.cuda.device(device_index):
            _check(lib.cusparseLtStructuredDescriptorInit(h, self.mat_a.ptr, m, k, k, 16, t, _ORDER_ROW,
                                                          _SPARSITY_50), "structured descriptor")
            if weight_col_major:   # memory is the row-major [n, k] = weight^T; op T gives weight
                _check(lib.cusparseLtDenseDescriptorInit(h, self.mat_b.ptr, n, k, k, 16, t, _ORDER_ROW), "B")
            else:
                _check(lib.cusparseLtDenseDescriptorInit(h, self.mat_b.ptr, k, n, n, 16, t, _ORDER_ROW), "B")
            order, ld = (_ORDER_COL, m) if transpose_result else (_ORDER_ROW, n)
            _check(lib.cusparseLtDenseDescriptorInit(h, self.mat_c.ptr, m, n, ld, 16, t, order), "C/D")
            _check(lib.cusparseLtMatmulDescriptorInit(h, self.matmul.ptr, _OP_N, _OP_T if weight_col_major else _OP_N,
                                                      self.mat_a.ptr, self.mat_b.ptr, self.mat_c.ptr, self.mat_c.ptr,
                                                      _COMPUTE_32F), "matmul descriptor")
            _check(lib.cusparseLtMatmulAlgSelectionInit(h, self.alg.ptr, self.matmul.ptr, _ALG_DEFAULT),
                   "algorithm selection")
            alg = ctypes.c_int(alg_id)
            _check(lib.cusparseLtMatmulAlgSetAttribute(h, self.alg.ptr, _ALG_CONFIG_ID, ctypes.addressof(alg),
                                                       ctypes.sizeof(alg)), f"algorithm id {alg_id}")
            _check(lib.cusparseLtMatmulPlanInit(h, self.plan.ptr, self.matmul.ptr, self.alg.ptr), "plan")
            size = ctypes.c_size_t(0)
            _check(lib.cusparseLtMatmulGetWorkspace(h, self.plan.ptr, ctypes.addressof(size)), "workspace query")
        self.workspace_bytes = size.value
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def run(self, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> None:
        lib, _ = _load()
        stream = torch.cuda.current_stream(a.device)
        ws = torch.empty(self.workspace_bytes, dtype=torch.uint8, device=a.device) if self.workspace_bytes else None
        streams = (ctypes.c_void_p * 1)(stream.cuda_stream)
        _check(lib.cusparseLtMatmul(self.handle.ptr, self.plan.ptr, ctypes.addressof(self.alpha), a.data_ptr(),
                                    b.data_ptr(), ctypes.addressof(self.beta), d.data_ptr(), d.data_ptr(),
                                    ws.data_ptr() if ws is not None else None, ctypes.addressof(streams), 1),
               "cusparseLtMatmul")


_PLANS: dict[tuple, _Plan] = {}


def clear_lib_plans() -> None:
    _PLANS.clear()


def lib_mm(compressed: torch.Tensor, weight: torch.Tensor, *, weight_col_major: bool = False,
           transpose_result: bool = False, alg_id: int = 0) -> torch.Tensor:
    """``s @ weight`` from cuSPARSELt's compressed ``s`` (``[m, k*9/16]``) with a cached plan.

    Same contract as ``torch._cslt_sparse_mm(compressed, dense_operand, alg_id=..., transpose_result=...)``:
    ``weight`` is ``[k, n]`` (row-major contiguous, or column-major when ``weight_col_major``); returns ``[m, n]``,
    or its transpose ``[n, m]`` (contiguous) when ``transpose_result``.
    """
    k, n = weight.shape
    m = compressed.shape[0]
    if weight_col_major and weight.stride() != (1, k) or not weight_col_major and weight.stride() != (n, 1):
        raise ValueError(f"weight {tuple(weight.shape)} with strides {weight.stride()} is not "
                         f"{'column' if weight_col_major else 'row'}-major")
    device = compressed.device.index if compressed.device.index is not None else torch.cuda.current_device()
    key = (device, m, k, n, compressed.dtype, weight_col_major, transpose_result, alg_id)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _Plan(device, m, k, n, compressed.dtype, weight_col_major, transpose_result, alg_id)
    out = torch.empty((n, m) if transpose_result else (m, n), dtype=compressed.dtype, device=compressed.device)
    plan.run(compressed, weight, out)
    return out


@functools.lru_cache(maxsize=None)
def binding_unavailable_reason(device_index: int, dtype: torch.dtype) -> str | None:
    """``None`` when :func:`lib_mm` loads and reproduces ``torch._cslt_sparse_mm`` bit for bit here (checked once
    per device and dtype, both operand orders), else why not."""
    if dtype not in _CUDA_TYPES:
        return f"cuSPARSELt 2:4 needs a 16-bit dtype, got {dtype}"
    lib, reason = _load()
    if lib is None:
        return reason
    dev = torch.device("cuda", device_index)
    g = torch.Generator(device=dev).manual_seed(0)
    mask = torch.tensor([1, 1, 0, 0], dtype=torch.bool, device=dev).repeat(256, 64)
    dense = torch.where(mask, torch.randn(256, 256, device=dev, generator=g), 0).to(dtype)
    weight = torch.randn(256, 128, device=dev, generator=g).to(dtype)
    try:
        compressed = torch._cslt_compress(dense)
        for col_major in (False, True):
            for transpose_result in (False, True) if transposed_result_ok(dtype) else (False,):
                w = weight.t().contiguous().t() if col_major else weight
                want = torch._cslt_sparse_mm(compressed, w, transpose_result=transpose_result)
                got = lib_mm(compressed, w, weight_col_major=col_major, transpose_result=transpose_result)
                if got.shape != want.shape or not torch.equal(got, want):
                    return (f"the ctypes cuSPARSELt binding differs from torch._cslt_sparse_mm (B col-major "
                            f"{col_major}, transposed result {transpose_result})")
    except RuntimeError as exc:
        return f"the ctypes cuSPARSELt binding failed its self-check: {exc}"
    return None
