# SPDX-License-Identifier: Apache-2.0
"""GPU path of the ELAS sparse core ``z = sparse24(relu(y1)**2) @ W`` (arXiv 2605.03667, Sec. 3) as an autograd
function, with a per-shape choice (timed once, cached) of how each of its three GEMMs runs.

The only activation saved is the compressed ``s`` (kept values + 4-bit codes, 0.5625x of dense 16-bit bytes).

Forward, one of:
  * ``"fused"``: one Triton GEMM computes relu^2 + the 2:4 selection on its A tiles and writes compressed ``s``
    (no dense ``s`` in memory; :mod:`elas_megatron.kernels.triton_gemm`);
  * ``"cusparselt"``: the fused compress kernel writes ``s`` in cuSPARSELt's format and the GEMM runs on the 2:4
    sparse tensor cores (:mod:`elas_megatron.kernels.cusparselt`);
  * ``"cublas"``: the fused compress kernel also writes the dense masked ``s`` (a temporary) for cuBLAS.
Backward (same math as :mod:`elas_megatron.kernels.reference`; ``s^T`` is not 2:4 along its K, so the weight
gradient is dense math):
  * grad input ``"fused"``: ``(grad_z @ W^T) * 2 sqrt(s)`` with the factor in the Triton GEMM's epilogue, or
    ``"cublas"``: cuBLAS ``grad_s`` then one Triton pass (in place) that applies the factor;
  * grad weight ``"fused"``: ``grad_z^T @ s`` with ``s`` decoded inside the Triton GEMM, or ``"cublas"`` on a
    decompressed ``s``.
  * dense (straight-through) mode saves ``y1`` instead and recomputes the compressed ``s`` in the backward.
fp32 inputs use the cuBLAS variants (the fused GEMMs are 16-bit).
"""
from __future__ import annotations

import logging

import torch

from elas_megatron.kernels import cusparselt as cslt
from elas_megatron.kernels import triton_gemm as tg
from elas_megatron.kernels import triton_sparse24 as tk

logger = logging.getLogger(__name__)

__all__ = ["relu2_sparse24_matmul_gpu", "Plan", "FWD_CHOICES", "BWD_CHOICES", "plan_for", "clear_plan_cache",
           "plan_cache"]

FWD_CHOICES = ("auto", "fused", "cublas", "cusparselt", "dense-only")
BWD_CHOICES = ("auto", "fused", "cublas", "fused-input", "fused-weight")


class Plan:
    """How one shape runs: forward GEMM (+ cuSPARSELt config), grad-input and grad-weight implementations."""

    __slots__ = ("fwd", "cslt", "grad_input", "grad_weight", "timings_ms")

    def __init__(self, fwd: str = "cublas", cslt_cfg: cslt.CsltConfig | None = None, grad_input: str = "cublas",
                 grad_weight: str = "cublas", timings_ms: dict | None = None):
        self.fwd, self.cslt, self.grad_input, self.grad_weight = fwd, cslt_cfg, grad_input, grad_weight
        self.timings_ms = timings_ms or {}

    def __repr__(self) -> str:
        cfg = f", cslt={self.cslt!r}" if self.fwd == "cusparselt" else ""
        return f"Plan(fwd={self.fwd!r}{cfg}, grad_input={self.grad_input!r}, grad_weight={self.grad_weight!r})"


_PLANS: dict[tuple, Plan] = {}


def plan_cache() -> dict[tuple, Plan]:
    """The per-shape cache ``(rows, features, r, dtype, device, grad_mode, fwd, bwd) -> Plan`` (read it only)."""
    return _PLANS


def clear_plan_cache() -> None:
    _PLANS.clear()


def _time_ms(fn, warmup: int = 2, reps: int = 6) -> float:
    """Mean of back-to-back calls (as in a training step: host overheads overlap device work)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


# --- the pieces ---------------------------------------------------------------------------------------------------

def _forward(y2d: torch.Tensor, weight: torch.Tensor, plan: Plan, save: bool):
    """``(z [T, r], compressed s or None)``."""
    if plan.fwd == "fused":
        return tg.fused_forward(y2d, weight, save=save)
    if plan.fwd == "cusparselt":
        c, _ = tk.relu2_sparse24_compress(y2d, layout="cusparselt")
        w = weight
        if c.cols_pad != c.cols:
            w = torch.nn.functional.pad(weight, (0, 0, 0, c.cols_pad - c.cols))   # zero rows for padded features
        return cslt.cslt_mm(c.buffer, w, plan.cslt)[: c.rows], c
    c, dense = tk.relu2_sparse24_compress(y2d, layout="rowmajor", write_dense=True)
    return dense @ weight, c


def _backward(gz: torch.Tensor, weight: torch.Tensor, c: tk.Compressed | None, y2d: torch.Tensor | None,
              plan: Plan, need_input: bool, need_weight: bool):
    """``(grad_y1 [T, F] or None, grad_W [F, r] or None)``; masked mode when ``c`` is given, else straight-through."""
    masked = c is not None
    grad_y1 = s_dense = grad_w = None
    if need_input:
        if plan.grad_input == "fused":
            if masked:
                grad_y1, s_dense = tg.fused_grad_input(gz, weight, c=c,
                                                       write_dense=need_weight and plan.grad_weight == "cublas")
            else:
                grad_y1, _ = tg.fused_grad_input(gz, weight, y1=y2d)
        else:
            grad_s = gz @ weight.t()                                            # [T, F], our own temporary
            if masked:   # in place over grad_s; s decompressed in the same pass when cuBLAS needs it
                grad_y1, s_dense = tk.relu2_sparse24_masked_grad(
                    grad_s, c, write_dense=need_weight and plan.grad_weight == "cublas", out=grad_s)
            else:
                grad_y1 = grad_s.mul_(2 * torch.relu(y2d))
    if need_weight:
        if not masked:   # straight-through saved y1: recompute the compressed s
            c, s_dense = tk.relu2_sparse24_compress(y2d, write_dense=plan.grad_weight == "cublas")
        if plan.grad_weight == "fused":
            grad_w = tg.fused_grad_weight(gz, c)
        else:
            if s_dense is None:
                s_dense = tk.sparse24_decompress(c)
            grad_w = (s_dense.t() @ gz).to(weight.dtype)                        # [F, r]
    return grad_y1, grad_w


# --- choosing -----------------------------------------------------------------------------------------------------

def _candidates(y2d: torch.Tensor, fwd: str, bwd: str) -> tuple[list[str], list[tuple[str, str]]]:
    sixteen = y2d.element_size() == 2
    sparse_ok = sixteen and cslt.cusparselt_unavailable_reason(y2d.device, y2d.dtype) is None
    if fwd == "auto":
        fwds = (["fused"] if sixteen else []) + ["cublas"] + (["cusparselt"] if sparse_ok else [])
    elif fwd == "dense-only":
        fwds = (["fused"] if sixteen else []) + ["cublas"]
    else:
        fwds = [fwd]
    if fwd in ("fused", "cusparselt") and not (sparse_ok if fwd == "cusparselt" else sixteen):
        raise RuntimeError(f"forward {fwd!r} unavailable for {y2d.dtype} on {y2d.device}: "
                           f"{cslt.cusparselt_unavailable_reason(y2d.device, y2d.dtype) or 'needs a 16-bit dtype'}")
    combos = {"fused": ("fused", "fused"), "cublas": ("cublas", "cublas"), "fused-input": ("fused", "cublas"),
              "fused-weight": ("cublas", "fused")}
    if bwd == "auto":
        bwds = list(combos.values()) if sixteen else [("cublas", "cublas")]
    else:
        if bwd != "cublas" and not sixteen:
            raise RuntimeError(f"backward {bwd!r} needs a 16-bit dtype, got {y2d.dtype}")
        bwds = [combos[bwd]]
    return fwds, bwds


def plan_for(y2d: torch.Tensor, weight: torch.Tensor, grad_mode: str, fwd: str = "auto", bwd: str = "auto") -> Plan:
    """The plan for this shape: forced choices are taken as given, "auto" ones are timed once and cached."""
    fwds, bwds = _candidates(y2d, fwd, bwd)
    if len(bwds) == 1 and len(fwds) == 1 and fwds[0] != "cusparselt":
        return Plan(fwds[0], None, *bwds[0])
    key = (tuple(y2d.shape), weight.shape[1], y2d.dtype, y2d.device, grad_mode, fwd, bwd)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _autotune(y2d, weight, grad_mode, fwds, bwds)
        _PLANS[key] = plan
        logger.info("ELAS core plan for y1 %s @ W %s (%s, %s): %s; timings (ms) %s", tuple(y2d.shape),
                    tuple(weight.shape), y2d.dtype, grad_mode, plan,
                    {k: round(v, 4) for k, v in plan.timings_ms.items()})
    return plan


def _autotune(y2d: torch.Tensor, weight: torch.Tensor, grad_mode: str, fwds: list[str],
              bwds: list[tuple[str, str]]) -> Plan:
    timings: dict[str, float] = {}
    best_fwd: tuple[float, str, cslt.CsltConfig | None] | None = None
    save = grad_mode == "masked"
    with torch.no_grad():
        y2d, weight = y2d.detach(), weight.detach()
        for fwd in fwds:
            configs: list[cslt.CsltConfig | None] = [None]
            if fwd == "cusparselt":
                configs = _cslt_configs(y2d, weight)
            for cfg in configs:
                plan = Plan(fwd, cfg)
                t = _time_ms(lambda: _forward(y2d, weight, plan, save))
                timings[f"fwd {fwd}" + (f" {cfg}" if cfg else "")] = t
                if best_fwd is None or t < best_fwd[0]:
                    best_fwd = (t, fwd, cfg)
        best_bwd: tuple[float, tuple[str, str]] | None = None
        if len(bwds) > 1:
            c = tk.relu2_sparse24_compress(y2d)[0] if save else None
            gz = torch.randn(y2d.shape[0], weight.shape[1], device=y2d.device, dtype=y2d.dtype)
            for gi, gw in bwds:
                plan = Plan("cublas", None, gi, gw)
                t = _time_ms(lambda: _backward(gz, weight, c, None if save else y2d, plan, True, True))
                timings[f"bwd input={gi} weight={gw}"] = t
                if best_bwd is None or t < best_bwd[0]:
                    best_bwd = (t, (gi, gw))
        else:
            best_bwd = (0.0, bwds[0])
    assert best_fwd is not None
    return Plan(best_fwd[1], best_fwd[2], *best_bwd[1], timings_ms=timings)


def _cslt_configs(y2d: torch.Tensor, weight: torch.Tensor) -> list[cslt.CsltConfig]:
    c, _ = tk.relu2_sparse24_compress(y2d, layout="cusparselt")
    w = weight
    if c.cols_pad != c.cols:
        w = torch.nn.functional.pad(weight, (0, 0, 0, c.cols_pad - c.cols))
    configs = []
    for col_major in (False, True):
        for transpose_result in (False, True):
            base = cslt.CsltConfig(0, col_major, transpose_result)
            alg_ids = {0}
            try:
                alg_ids.add(cslt.cslt_search_alg_id(c.buffer, w, base))
            except (RuntimeError, TypeError) as exc:  # the search is optional: alg 0 always exists
                logger.debug("cuSPARSELt algorithm search failed: %s", exc)
            configs += [cslt.CsltConfig(a, col_major, transpose_result) for a in sorted(alg_ids)]
    return configs


# --- autograd -----------------------------------------------------------------------------------------------------

class _Relu2Sparse24MatmulGPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y1: torch.Tensor, weight: torch.Tensor, grad_mode: str, fwd: str, bwd: str) -> torch.Tensor:
        f = y1.shape[-1]
        y2d = y1.reshape(-1, f)                                             # [T, F]
        if y2d.stride(-1) != 1:
            y2d = y2d.contiguous()
        plan = plan_for(y2d, weight, grad_mode, fwd, bwd)
        masked = grad_mode == "masked"
        z, c = _forward(y2d, weight, plan, save=masked)
        ctx.plan, ctx.y1_shape, ctx.masked = plan, y1.shape, masked
        if masked:
            ctx.c_meta = (c.rows, c.cols, c.rows_pad, c.cols_pad, c.layout)
            ctx.save_for_backward(weight, *c.tensors())                    # the compressed s, 0.5625x dense
        else:
            ctx.save_for_backward(weight, y2d)                               # straight-through needs relu(y1)
        return z.reshape(*y1.shape[:-1], weight.shape[1])                   # [..., r]

    @staticmethod
    def backward(ctx, grad_z: torch.Tensor):
        weight, *saved = ctx.saved_tensors
        gz = grad_z.reshape(-1, grad_z.shape[-1])                           # [T, r]
        gz = gz.to(weight.dtype) if gz.dtype != weight.dtype else gz
        gz = gz if gz.stride(-1) == 1 else gz.contiguous()
        if ctx.masked:
            c, y2d = tk.Compressed.from_tensors(saved, *ctx.c_meta), None
        else:
            c, (y2d,) = None, saved
        grad_y1, grad_w = _backward(gz, weight, c, y2d, ctx.plan, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if grad_y1 is not None:
            grad_y1 = grad_y1.reshape(ctx.y1_shape)
        return grad_y1, grad_w, None, None, None


def relu2_sparse24_matmul_gpu(y1: torch.Tensor, weight: torch.Tensor, *, grad_mode: str = "masked",
                              fwd: str = "auto", bwd: str = "auto") -> torch.Tensor:
    """``sparse24(relu(y1)**2) @ weight`` on CUDA with the fused kernels.

    Args:
        y1: ``[..., F]`` CUDA tensor, F a multiple of 4.
        weight: ``[F, r]``, same dtype and device as ``y1``.
        grad_mode: "masked" or "dense" (see :mod:`elas_megatron.kernels.reference`).
        fwd: one of :data:`FWD_CHOICES` ("auto" times fused/cublas/cusparselt per shape; "dense-only" leaves
            cuSPARSELt out).
        bwd: one of :data:`BWD_CHOICES` ("auto" times the combinations per shape).
    """
    if fwd not in FWD_CHOICES or bwd not in BWD_CHOICES:
        raise ValueError(f"fwd={fwd!r}, bwd={bwd!r}: choose fwd from {FWD_CHOICES} and bwd from {BWD_CHOICES}")
    if not y1.is_cuda or not weight.is_cuda:
        raise ValueError(f"the GPU path needs CUDA tensors, got y1 on {y1.device}, weight on {weight.device}")
    if y1.dtype != weight.dtype:
        raise TypeError(f"y1 ({y1.dtype}) and weight ({weight.dtype}) must share a dtype; cast the weight")
    if weight.dim() != 2 or weight.shape[0] != y1.shape[-1]:
        raise ValueError(f"weight must be [F, r] with F = y1.shape[-1] = {y1.shape[-1]}, got {tuple(weight.shape)}")
    return _Relu2Sparse24MatmulGPU.apply(y1, weight, grad_mode, fwd, bwd)
