# SPDX-License-Identifier: Apache-2.0
"""GPU path of the ELAS sparse core ``z = sparse24(relu(y1)**2) @ W`` (arXiv 2605.03667, Sec. 3) as an autograd
function, with a per-shape choice of the forward GEMM.

Forward: the fused Triton kernel reads ``y1`` once and writes the compressed ``s`` (kept values + 4-bit codes,
0.5625x of dense 16-bit bytes), which is the only activation saved. The GEMM ``s @ W`` then runs either
  * ``"cusparselt"``: on the 2:4 sparse tensor cores, consuming the compressed buffer directly, or
  * ``"cublas"``: dense, on the masked ``s`` that the same fused pass also writes (a temporary, freed at once).
``"auto"`` times both once per shape (and cuSPARSELt's algorithm/operand-order variants) and caches the winner.

Backward (same math as :mod:`elas_megatron.kernels.reference`):
  * ``grad_s = grad_z @ W^T`` (dense GEMM: its output is dense);
  * masked mode: one Triton pass turns ``grad_s`` into ``grad_y1 = grad_s * 2 sqrt(s)`` on kept entries (in
    place) and decompresses ``s`` for ``grad_W = s^T @ grad_z`` (dense GEMM: ``s^T`` is not 2:4 along its K);
  * dense (straight-through) mode saves ``y1`` instead and recomputes ``s`` with the fused kernel.
"""
from __future__ import annotations

import logging
import statistics

import torch

from elas_megatron.kernels import cusparselt as cslt
from elas_megatron.kernels import triton_sparse24 as tk

logger = logging.getLogger(__name__)

__all__ = ["relu2_sparse24_matmul_gpu", "ForwardPlan", "FWD_GEMMS", "plan_forward", "clear_plan_cache",
           "plan_cache"]

FWD_GEMMS = ("auto", "cublas", "cusparselt")


class ForwardPlan:
    """The forward GEMM chosen for one shape (``gemm`` is "cublas" or "cusparselt")."""

    __slots__ = ("gemm", "cslt", "timings_ms")

    def __init__(self, gemm: str, cslt_cfg: cslt.CsltConfig | None = None, timings_ms: dict | None = None):
        self.gemm, self.cslt, self.timings_ms = gemm, cslt_cfg, timings_ms or {}

    def __repr__(self) -> str:
        return f"ForwardPlan(gemm={self.gemm!r}, cslt={self.cslt!r})"


_PLANS: dict[tuple, ForwardPlan] = {}


def plan_cache() -> dict[tuple, ForwardPlan]:
    """The per-shape cache ``(rows, features, n, dtype, device) -> ForwardPlan`` (read-only use)."""
    return _PLANS


def clear_plan_cache() -> None:
    _PLANS.clear()


def _time_ms(fn, warmup: int = 2, reps: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _forward_cublas(y2d: torch.Tensor, weight: torch.Tensor):
    c, dense = tk.relu2_sparse24_compress(y2d, layout="rowmajor", write_dense=True)
    return dense @ weight, c


def _forward_cslt(y2d: torch.Tensor, weight: torch.Tensor, cfg: cslt.CsltConfig):
    c, _ = tk.relu2_sparse24_compress(y2d, layout="cusparselt")
    w = weight
    if c.cols_pad != c.cols:
        w = torch.nn.functional.pad(weight, (0, 0, 0, c.cols_pad - c.cols))   # zero rows for padded features
    z = cslt.cslt_mm(c.buffer, w, cfg)
    return z[: c.rows], c


def plan_forward(y2d: torch.Tensor, weight: torch.Tensor, fwd_gemm: str = "auto") -> ForwardPlan:
    """The forward GEMM for this shape: forced by ``fwd_gemm``, or timed once and cached when "auto"."""
    if fwd_gemm == "cublas":
        return ForwardPlan("cublas")
    sparse_ok = y2d.element_size() == 2 and cslt.cusparselt_unavailable_reason(y2d.device) is None
    if fwd_gemm == "cusparselt":
        if not sparse_ok:
            raise RuntimeError(f"cuSPARSELt 2:4 GEMM unavailable for {y2d.dtype} on {y2d.device}: "
                               f"{cslt.cusparselt_unavailable_reason(y2d.device) or 'needs a 16-bit dtype'}")
        key = (tuple(y2d.shape), weight.shape[1], y2d.dtype, y2d.device, "cslt-only")
    else:
        if not sparse_ok:
            return ForwardPlan("cublas")
        key = (tuple(y2d.shape), weight.shape[1], y2d.dtype, y2d.device, "auto")
    plan = _PLANS.get(key)
    if plan is None:
        plan = _autotune(y2d, weight, include_dense=fwd_gemm == "auto")
        _PLANS[key] = plan
        logger.info("ELAS core forward GEMM for y1 %s @ W %s (%s): %s; timings (ms) %s", tuple(y2d.shape),
                    tuple(weight.shape), y2d.dtype, plan, {k: round(v, 4) for k, v in plan.timings_ms.items()})
    return plan


def _autotune(y2d: torch.Tensor, weight: torch.Tensor, include_dense: bool) -> ForwardPlan:
    timings: dict[str, float] = {}
    best: tuple[float, ForwardPlan] | None = None
    with torch.no_grad():
        y2d, weight = y2d.detach(), weight.detach()
        if include_dense:
            t = _time_ms(lambda: _forward_cublas(y2d, weight))
            timings["cublas"] = t
            best = (t, ForwardPlan("cublas"))
        c, _ = tk.relu2_sparse24_compress(y2d, layout="cusparselt")
        w = weight
        if c.cols_pad != c.cols:
            w = torch.nn.functional.pad(weight, (0, 0, 0, c.cols_pad - c.cols))
        for col_major in (False, True):
            for transpose_result in (False, True):
                base = cslt.CsltConfig(0, col_major, transpose_result)
                alg_ids = {0}
                try:
                    alg_ids.add(cslt.cslt_search_alg_id(c.buffer, w, base))
                except RuntimeError as exc:  # the search is optional: alg 0 always exists
                    logger.debug("cuSPARSELt algorithm search failed: %s", exc)
                for alg in sorted(alg_ids):
                    cfg = cslt.CsltConfig(alg, col_major, transpose_result)
                    t = _time_ms(lambda: _forward_cslt(y2d, weight, cfg))
                    timings[f"cslt(alg={alg},wcol={int(col_major)},tres={int(transpose_result)})"] = t
                    if best is None or t < best[0]:
                        best = (t, ForwardPlan("cusparselt", cfg))
    assert best is not None
    best[1].timings_ms = timings
    return best[1]


class _Relu2Sparse24MatmulGPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y1: torch.Tensor, weight: torch.Tensor, grad_mode: str, fwd_gemm: str) -> torch.Tensor:
        f = y1.shape[-1]
        y2d = y1.reshape(-1, f)                                             # [T, F]
        if y2d.stride(-1) != 1:
            y2d = y2d.contiguous()
        plan = plan_forward(y2d, weight, fwd_gemm)
        if plan.gemm == "cusparselt":
            z, c = _forward_cslt(y2d, weight, plan.cslt)
        else:
            z, c = _forward_cublas(y2d, weight)
        ctx.grad_mode = grad_mode
        ctx.y1_shape = y1.shape
        if grad_mode == "masked":
            ctx.meta = (c.rows, c.cols, c.rows_pad, c.cols_pad, c.layout)
            ctx.save_for_backward(weight, *c.tensors())                    # the compressed s, 0.5625x dense
        else:
            ctx.save_for_backward(weight, y2d)                               # straight-through needs relu(y1)
        return z.reshape(*y1.shape[:-1], weight.shape[1])                   # [..., r]

    @staticmethod
    def backward(ctx, grad_z: torch.Tensor):
        weight, *saved = ctx.saved_tensors
        gz = grad_z.reshape(-1, grad_z.shape[-1])                           # [T, r]
        if gz.dtype != weight.dtype:
            gz = gz.to(weight.dtype)
        need_w = ctx.needs_input_grad[1]
        grad_s = gz @ weight.t()                                            # [T, F], our own temporary
        if ctx.grad_mode == "masked":
            c = tk.Compressed.from_tensors(saved, *ctx.meta)
            # grad_y1 written in place over grad_s; s decompressed in the same pass for the weight gradient.
            grad_y1, s_dense = tk.relu2_sparse24_masked_grad(grad_s, c, write_dense=need_w, out=grad_s)
        else:
            (y2d,) = saved
            grad_y1 = grad_s.mul_(2 * torch.relu(y2d))
            s_dense = tk.relu2_sparse24_compress(y2d, write_dense=True)[1] if need_w else None
        grad_w = (s_dense.t() @ gz).to(weight.dtype) if need_w else None    # [F, r]
        return grad_y1.reshape(ctx.y1_shape), grad_w, None, None


def relu2_sparse24_matmul_gpu(y1: torch.Tensor, weight: torch.Tensor, *, grad_mode: str = "masked",
                              fwd_gemm: str = "auto") -> torch.Tensor:
    """``sparse24(relu(y1)**2) @ weight`` on CUDA with the fused kernels.

    Args:
        y1: ``[..., F]`` CUDA tensor, F a multiple of 4.
        weight: ``[F, r]``, same dtype and device as ``y1``.
        grad_mode: "masked" or "dense" (see :mod:`elas_megatron.kernels.reference`).
        fwd_gemm: "auto" (timed per shape), "cublas" or "cusparselt".
    """
    if fwd_gemm not in FWD_GEMMS:
        raise ValueError(f"fwd_gemm={fwd_gemm!r}: choose one of {FWD_GEMMS}")
    if not y1.is_cuda or not weight.is_cuda:
        raise ValueError(f"the GPU path needs CUDA tensors, got y1 on {y1.device}, weight on {weight.device}")
    if y1.dtype != weight.dtype:
        raise TypeError(f"y1 ({y1.dtype}) and weight ({weight.dtype}) must share a dtype; cast the weight")
    if weight.dim() != 2 or weight.shape[0] != y1.shape[-1]:
        raise ValueError(f"weight must be [F, r] with F = y1.shape[-1] = {y1.shape[-1]}, got {tuple(weight.shape)}")
    return _Relu2Sparse24MatmulGPU.apply(y1, weight, grad_mode, fwd_gemm)
