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

__all__ = ["relu2_sparse24_matmul_gpu", "lowrank_relu2_sparse24_matmul_gpu", "Plan", "FWD_CHOICES", "BWD_CHOICES",
           "GRAD_H_CHOICES", "plan_for", "clear_plan_cache", "plan_cache"]

FWD_CHOICES = ("auto", "fused", "cublas", "cusparselt", "dense-only")
BWD_CHOICES = ("auto", "fused", "cublas", "fused-input", "fused-weight")
GRAD_H_CHOICES = ("auto", "dense", "sparse")


class Plan:
    """How one shape runs: forward GEMM (+ cuSPARSELt config), grad-input and grad-weight implementations, and
    for the op with the up-projection inside (:func:`lowrank_relu2_sparse24_matmul_gpu`) how its input gradient
    ``grad_h = grad_y1 @ B_up^T`` runs ("dense" cuBLAS or "sparse" cuSPARSELt, + config)."""

    __slots__ = ("fwd", "cslt", "grad_input", "grad_weight", "grad_h", "cslt_h", "timings_ms")

    def __init__(self, fwd: str = "cublas", cslt_cfg: cslt.CsltConfig | None = None, grad_input: str = "cublas",
                 grad_weight: str = "cublas", timings_ms: dict | None = None, grad_h: str = "dense",
                 cslt_h: cslt.CsltConfig | None = None):
        self.fwd, self.cslt, self.grad_input, self.grad_weight = fwd, cslt_cfg, grad_input, grad_weight
        self.grad_h, self.cslt_h = grad_h, cslt_h
        self.timings_ms = timings_ms or {}

    @property
    def layout(self) -> str:
        """Layout of the saved ``s``: the sparse GEMMs read cuSPARSELt's, the Triton forward writes row-major."""
        return "cusparselt" if self.fwd == "cusparselt" or self.grad_h == "sparse" else "rowmajor"

    def __repr__(self) -> str:
        cfg = f", cslt={self.cslt!r}" if self.fwd == "cusparselt" else ""
        gh = f", grad_h='sparse', cslt_h={self.cslt_h!r}" if self.grad_h == "sparse" else ""
        return (f"Plan(fwd={self.fwd!r}{cfg}, grad_input={self.grad_input!r}, grad_weight={self.grad_weight!r}"
                f"{gh})")


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
    c, dense = tk.relu2_sparse24_compress(y2d, layout=plan.layout, write_dense=True)
    return dense @ weight, c


def _backward(gz: torch.Tensor, weight: torch.Tensor, c: tk.Compressed | None, y2d: torch.Tensor | None,
              plan: Plan, need_input: bool, need_weight: bool, compressed: bool = False):
    """``(grad_y1 [T, F] or None, grad_W [F, r] or None, compressed grad_y1 or None)``; masked mode when ``c`` is
    given, else straight-through. ``compressed``: also write ``grad_y1`` compressed with ``s``'s pattern."""
    masked = c is not None
    grad_y1 = s_dense = grad_w = gyc = None
    if compressed and not (masked and need_input and plan.grad_input == "cublas" and c.layout == "cusparselt"):
        raise RuntimeError(f"a compressed grad_y1 needs masked mode, the cuBLAS grad-input variant and s in "
                           f"cuSPARSELt's layout; plan {plan!r}")
    if need_input:
        if plan.grad_input == "fused":
            if masked:
                grad_y1, s_dense = tg.fused_grad_input(gz, weight, c=c,
                                                       write_dense=need_weight and plan.grad_weight == "cublas")
            else:
                grad_y1, _ = tg.fused_grad_input(gz, weight, y1=y2d)
        else:
            grad_s = gz @ weight.t()                                            # [T, F], our own temporary
            write_dense = need_weight and plan.grad_weight == "cublas"
            if masked and compressed:
                grad_y1, s_dense, gyc = tk.relu2_sparse24_masked_grad_compressed(
                    grad_s, c, write_dense=write_dense, out=grad_s)
            elif masked:   # in place over grad_s; s decompressed in the same pass when cuBLAS needs it
                grad_y1, s_dense = tk.relu2_sparse24_masked_grad(grad_s, c, write_dense=write_dense, out=grad_s)
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
    return grad_y1, grad_w, gyc


def _up_operand(up_weight: torch.Tensor, cols_pad: int) -> torch.Tensor:
    """``B_up^T`` ``[F_pad, r_up]`` for the sparse ``grad_h`` GEMM (a view; zero rows for padded features)."""
    w = up_weight.t()
    if cols_pad != w.shape[0]:
        w = torch.nn.functional.pad(w, (0, 0, 0, cols_pad - w.shape[0]))
    return w


def _grad_h(grad_y1: torch.Tensor, gyc: tk.Compressed | None, up_weight: torch.Tensor, plan: Plan) -> torch.Tensor:
    """``grad_y1 @ B_up^T`` ``[T, r_up]``: from the compressed ``grad_y1`` on the 2:4 tensor cores, or cuBLAS."""
    if gyc is None:
        return grad_y1 @ up_weight.t()
    return cslt.cslt_mm(gyc.buffer, _up_operand(up_weight, gyc.cols_pad), plan.cslt_h)[: gyc.rows]


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


def plan_for(y2d: torch.Tensor, weight: torch.Tensor, grad_mode: str, fwd: str = "auto", bwd: str = "auto",
             up_weight: torch.Tensor | None = None, grad_h: str = "dense") -> Plan:
    """The plan for this shape: forced choices are taken as given, "auto" ones are timed once and cached.

    ``up_weight`` (``B_up [r_up, F]``) is given by the op that owns the up-projection; ``grad_h`` then chooses
    how its input gradient runs ("auto" times cuBLAS against the cuSPARSELt configurations).
    """
    fwds, bwds = _candidates(y2d, fwd, bwd)
    grad_hs = _grad_h_candidates(y2d, grad_mode, grad_h) if up_weight is not None else ["dense"]
    if grad_hs == ["sparse"]:   # forced: only variants that leave s in cuSPARSELt's layout and grad_y1 to cuBLAS
        fwds = [f for f in fwds if f != "fused"]
        bwds = [b for b in bwds if b[0] == "cublas"]
        if not fwds or not bwds:
            raise RuntimeError(f"grad_h 'sparse' cannot follow fwd={fwd!r}, bwd={bwd!r}: it needs the cuBLAS "
                               f"grad-input variant and a forward that writes s in cuSPARSELt's layout")
    if len(bwds) == 1 and len(fwds) == 1 and fwds[0] != "cusparselt" and grad_hs == ["dense"]:
        return Plan(fwds[0], None, *bwds[0])
    key = (tuple(y2d.shape), weight.shape[1], y2d.dtype, y2d.device, grad_mode, fwd, bwd,
           None if up_weight is None else (up_weight.shape[0], grad_h))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _autotune(y2d, weight, grad_mode, fwds, bwds)
        if grad_hs != ["dense"]:
            _autotune_grad_h(plan, y2d, up_weight, grad_hs)
        _PLANS[key] = plan
        logger.info("ELAS core plan for y1 %s @ W %s (%s, %s): %s; timings (ms) %s", tuple(y2d.shape),
                    tuple(weight.shape), y2d.dtype, grad_mode, plan,
                    {k: round(v, 4) for k, v in plan.timings_ms.items()})
    return plan


def _grad_h_candidates(y2d: torch.Tensor, grad_mode: str, grad_h: str) -> list[str]:
    if grad_h not in GRAD_H_CHOICES:
        raise ValueError(f"grad_h={grad_h!r}: choose one of {GRAD_H_CHOICES}")
    reason = cslt.cusparselt_unavailable_reason(y2d.device, y2d.dtype)
    if grad_mode != "masked":
        reason = reason or "the straight-through (dense) gradient mode has a dense grad_y1"
    if grad_h == "sparse" and reason is not None:
        raise RuntimeError(f"grad_h 'sparse' unavailable for {y2d.dtype} on {y2d.device}: {reason}")
    if grad_h == "auto":
        return ["dense"] + (["sparse"] if reason is None else [])
    return [grad_h]


def _autotune_grad_h(plan: Plan, y2d: torch.Tensor, up_weight: torch.Tensor, grad_hs: list[str]) -> None:
    """Choose how ``grad_h`` runs, given the plan's forward and backward (in place on ``plan``).

    The sparse variant needs the cuBLAS grad-input variant (its pass writes the compressed ``grad_y1``) and a
    forward that leaves ``s`` in cuSPARSELt's layout; with the Triton fused forward or grad-input it is not
    considered. Timed: the masked-gradient pass plus the ``grad_h`` GEMM, both ways.
    """
    if plan.fwd == "fused" or plan.grad_input != "cublas":
        grad_hs = [g for g in grad_hs if g != "sparse"]
        if not grad_hs:
            raise RuntimeError(f"grad_h 'sparse' cannot follow {plan!r}: it needs the cuBLAS grad-input variant "
                               f"and a forward that writes s in cuSPARSELt's layout")
    if grad_hs == ["dense"]:
        plan.grad_h = "dense"
        return
    with torch.no_grad():
        y2d, up_weight = y2d.detach(), up_weight.detach()
        c, _ = tk.relu2_sparse24_compress(y2d, layout="cusparselt")
        gs = torch.randn_like(y2d)
        gy = torch.empty_like(gs)
        write_dense = plan.grad_weight == "cublas"
        best: tuple[float, str, cslt.CsltConfig | None] | None = None
        if "dense" in grad_hs:
            t = _time_ms(lambda: tk.relu2_sparse24_masked_grad(gs, c, write_dense=write_dense, out=gy)[0]
                         @ up_weight.t())
            plan.timings_ms["grad_h dense"] = t
            best = (t, "dense", None)
        _, _, gyc = tk.relu2_sparse24_masked_grad_compressed(gs, c, write_dense=write_dense, out=gy)
        w = _up_operand(up_weight, c.cols_pad)
        for cfg in _cslt_configs_for(gyc.buffer, w):
            trial = Plan(grad_h="sparse", cslt_h=cfg)
            t = _time_ms(lambda: _grad_h(gy, tk.relu2_sparse24_masked_grad_compressed(
                gs, c, write_dense=write_dense, out=gy)[2], up_weight, trial))
            plan.timings_ms[f"grad_h sparse {cfg}"] = t
            if best is None or t < best[0]:
                best = (t, "sparse", cfg)
    assert best is not None
    plan.grad_h, plan.cslt_h = best[1], best[2]


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
    return _cslt_configs_for(c.buffer, w)


def _cslt_configs_for(buffer: torch.Tensor, w: torch.Tensor) -> list[cslt.CsltConfig]:
    """Algorithm 0 and cuSPARSELt's own pick, for each dense-operand order and result order."""
    configs = []
    orders = (False, True) if cslt.transposed_result_ok(buffer.dtype) else (False,)
    for col_major in (False, True):
        for transpose_result in orders:
            base = cslt.CsltConfig(0, col_major, transpose_result)
            alg_ids = {0}
            try:
                alg_ids.add(cslt.cslt_search_alg_id(buffer, w, base))
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
        grad_y1, grad_w, _ = _backward(gz, weight, c, y2d, ctx.plan, ctx.needs_input_grad[0],
                                       ctx.needs_input_grad[1])
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


class _LowRankRelu2Sparse24GPU(torch.autograd.Function):
    """``sparse24(relu(h @ B_up)**2) @ A_down`` with the up-projection's second GEMM inside the op, so that its
    input gradient can use the 2:4 pattern too (masked mode only). Saves ``h``, the weights and the compressed
    ``s``: the same as the two-op path (where autograd saves ``h`` for ``grad_B_up``), ``y1`` is a temporary."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, up_weight: torch.Tensor, weight: torch.Tensor, fwd: str, bwd: str,
                grad_h: str) -> torch.Tensor:
        h2d = h.reshape(-1, h.shape[-1])                                      # [T, r_up]
        y2d = h2d @ up_weight                                                 # [T, F], a temporary
        plan = plan_for(y2d, weight, "masked", fwd, bwd, up_weight=up_weight, grad_h=grad_h)
        z, c = _forward(y2d, weight, plan, save=True)
        del y2d
        ctx.plan, ctx.h_shape = plan, h.shape
        ctx.c_meta = (c.rows, c.cols, c.rows_pad, c.cols_pad, c.layout)
        ctx.save_for_backward(h2d, up_weight, weight, *c.tensors())
        return z.reshape(*h.shape[:-1], weight.shape[1])

    @staticmethod
    def backward(ctx, grad_z: torch.Tensor):
        h2d, up_weight, weight, *saved = ctx.saved_tensors
        need_h, need_up, need_w = ctx.needs_input_grad[:3]
        gz = grad_z.reshape(-1, grad_z.shape[-1])
        gz = gz.to(weight.dtype) if gz.dtype != weight.dtype else gz
        gz = gz if gz.stride(-1) == 1 else gz.contiguous()
        c = tk.Compressed.from_tensors(saved, *ctx.c_meta)
        sparse_h = need_h and ctx.plan.grad_h == "sparse"
        grad_y1, grad_w, gyc = _backward(gz, weight, c, None, ctx.plan, need_h or need_up, need_w,
                                         compressed=sparse_h)
        grad_h = grad_up = None
        if need_h:
            grad_h = _grad_h(grad_y1, gyc, up_weight, ctx.plan).reshape(ctx.h_shape)
        if need_up:
            grad_up = h2d.t() @ grad_y1                                       # [r_up, F]
        return grad_h, grad_up, grad_w, None, None, None


def lowrank_relu2_sparse24_matmul_gpu(h: torch.Tensor, up_weight: torch.Tensor, weight: torch.Tensor, *,
                                      fwd: str = "auto", bwd: str = "auto", grad_h: str = "auto") -> torch.Tensor:
    """``sparse24(relu(h @ up_weight)**2) @ weight`` on CUDA, masked gradient mode.

    The ELAS FFN's core with the up-projection's second factor inside (``h = sigma(x A_up)``, ``up_weight`` =
    ``B_up``, ``weight`` = ``A_down``). Besides the forward's sparse GEMM, the input gradient
    ``grad_h = grad_y1 @ B_up^T`` can then run on the 2:4 sparse tensor cores: ``grad_y1`` is zero wherever
    ``s`` is, so it is 2:4 along ``F`` with ``s``'s own pattern (same math as the reference, no new selection).

    Args:
        h: ``[..., r_up]`` CUDA tensor.
        up_weight: ``[r_up, F]`` (F a multiple of 4), same dtype as ``h``.
        weight: ``[F, r]``, same dtype.
        fwd, bwd: as :func:`relu2_sparse24_matmul_gpu`.
        grad_h: one of :data:`GRAD_H_CHOICES` ("auto" times cuBLAS against cuSPARSELt per shape; "sparse"
            needs 16-bit inputs and cuSPARSELt).
    """
    if fwd not in FWD_CHOICES or bwd not in BWD_CHOICES or grad_h not in GRAD_H_CHOICES:
        raise ValueError(f"fwd={fwd!r}, bwd={bwd!r}, grad_h={grad_h!r}: choose fwd from {FWD_CHOICES}, bwd from "
                         f"{BWD_CHOICES} and grad_h from {GRAD_H_CHOICES}")
    if not (h.is_cuda and up_weight.is_cuda and weight.is_cuda):
        raise ValueError("the GPU path needs CUDA tensors for h, up_weight and weight")
    if not h.dtype == up_weight.dtype == weight.dtype:
        raise TypeError(f"h ({h.dtype}), up_weight ({up_weight.dtype}) and weight ({weight.dtype}) must share a "
                        f"dtype; cast the weights")
    if up_weight.dim() != 2 or up_weight.shape[0] != h.shape[-1]:
        raise ValueError(f"up_weight must be [r_up, F] with r_up = h.shape[-1] = {h.shape[-1]}, "
                         f"got {tuple(up_weight.shape)}")
    if weight.dim() != 2 or weight.shape[0] != up_weight.shape[1]:
        raise ValueError(f"weight must be [F, r] with F = up_weight.shape[1] = {up_weight.shape[1]}, "
                         f"got {tuple(weight.shape)}")
    return _LowRankRelu2Sparse24GPU.apply(h, up_weight, weight, fwd, bwd, grad_h)
