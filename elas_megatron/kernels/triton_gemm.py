# SPDX-License-Identifier: Apache-2.0
"""Triton GEMMs of the ELAS sparse core with the 2:4 work fused in (arXiv 2605.03667, Sec. 3).

The three GEMMs of ``z = sparse24(relu(y1)**2) @ W`` and its backward, each fused with the element-wise work next
to it so that no dense ``[T, F]`` temporary goes through memory:
  * forward ``z = s @ W``: the A-operand tiles are computed from ``y1`` in registers (relu^2, 2:4 selection), and
    the programs of the first column block also write the compressed ``s`` (the saved activation). One read of
    ``y1``, no dense ``s``.
  * ``grad_y1 = (grad_z @ W^T) * 2 sqrt(s)`` (masked) or ``* 2 relu(y1)`` (straight-through): the factor is
    applied in the epilogue, reading the compressed ``s``; ``grad_s`` never exists in memory.
  * ``grad_W^T = grad_z^T @ s``: the B-operand tiles are decoded from the compressed ``s`` (split over tokens,
    partial sums in fp32, reduced in a fixed order, so the result is deterministic).
Dense math on the tensor cores (the 2:4 sparse instructions are not reachable from Triton); the sparse-tensor-core
forward is :mod:`elas_megatron.kernels.cusparselt`. 16-bit dtypes only (fp32 takes the cuBLAS path).
"""
from __future__ import annotations

import torch

from elas_megatron.kernels import triton_sparse24 as tk

__all__ = ["fused_forward", "fused_grad_input", "fused_grad_weight", "set_gemm_tiles", "GEMM_TILES"]

if tk.HAS_TRITON:
    import triton
    import triton.language as tl

    from elas_megatron.kernels.triton_sparse24 import (_expand, _join4, _load_meta_nibbles, _pack_words,
                                                       _relu2_select)

    @triton.jit
    def _row_major_tile(M, N, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """The output tile of program_id(0), column blocks of one row block side by side (they share the A rows
        in L2): its column block, row (int64) and column offsets, the K offsets of one step, and the row mask."""
        pid = tl.program_id(0)
        num_pid_n = tl.cdiv(N, BN)
        pid_m = pid // num_pid_n
        pid_n = pid % num_pid_n
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        rm64 = rm.to(tl.int64)
        m_ok = rm < M
        return pid_n, rn, rk, rm64, m_ok

    @triton.jit
    def _fwd_kernel(y_ptr, w_ptr, z_ptr, vals_ptr, meta_ptr,
                    M, N, K, K_store, stride_y, stride_w, stride_z, stride_v, stride_m,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WRITE_S: tl.constexpr):
        G: tl.constexpr = BK // 4
        W: tl.constexpr = BK // 16
        pid_n, rn, rk, rm64, m_ok = _row_major_tile(M, N, BM, BN, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):                  # the last tile also covers the stored padding to 16
            cols = k0 + rk
            y = tl.load(y_ptr + rm64[:, None] * stride_y + cols[None, :],
                        mask=m_ok[:, None] & (cols < K)[None, :], other=0.0)
            ka, kb, kc, kd, ra, rb, rc, rd = _relu2_select(y, BM, G)
            zero = tl.zeros_like(ra)
            a = _join4(tl.where(ka, ra * ra, zero), tl.where(kb, rb * rb, zero),
                       tl.where(kc, rc * rc, zero), tl.where(kd, rd * rd, zero), BM, G)
            w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + rn[None, :],
                        mask=(cols < K)[:, None] & (rn < N)[None, :], other=0.0)
            acc = tl.dot(a.to(w.dtype), w, acc)
            if WRITE_S:
                if pid_n == 0:
                    i0 = tl.where(ka, 0, tl.where(kb, 1, 2))
                    i1 = tl.where(kd, 3, tl.where(kc, 2, 1))
                    v0 = tl.where(ka, ra, tl.where(kb, rb, rc))
                    v1 = tl.where(kd, rd, tl.where(kc, rc, rb))
                    vals = tl.reshape(tl.join(v0 * v0, v1 * v1), (BM, BK // 2)).to(vals_ptr.dtype.element_ty)
                    hcols = k0 // 2 + tl.arange(0, BK // 2)
                    tl.store(vals_ptr + rm64[:, None] * stride_v + hcols[None, :], vals,
                             mask=m_ok[:, None] & (hcols < K_store // 2)[None, :])
                    words = _pack_words(i0, i1, BM, W)
                    wcols = k0 // 16 + tl.arange(0, W)
                    tl.store(meta_ptr + rm64[:, None] * stride_m + wcols[None, :], words.to(tl.int16),
                             mask=m_ok[:, None] & (wcols < K_store // 16)[None, :])
        tl.store(z_ptr + rm64[:, None] * stride_z + rn[None, :], acc.to(z_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & (rn < N)[None, :])

    @triton.jit
    def _grad_input_kernel(gz_ptr, wt_ptr, gy_ptr, vals_ptr, meta_ptr, y_ptr, dense_ptr,
                           M, N, K, stride_gz, stride_wt, stride_gy, stride_v, stride_m, stride_y, stride_d, cols_pad,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                           MASKED: tl.constexpr, CSLT: tl.constexpr, WRITE_DENSE: tl.constexpr):
        G: tl.constexpr = BN // 4
        W: tl.constexpr = BN // 16
        pid_n, rn, rk, rm64, m_ok = _row_major_tile(M, N, BM, BN, BK)
        n_ok = rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + rk
            a = tl.load(gz_ptr + rm64[:, None] * stride_gz + ks[None, :], mask=m_ok[:, None] & (ks < K)[None, :],
                        other=0.0)
            b = tl.load(wt_ptr + ks[:, None] * stride_wt + rn[None, :],                   # W^T tile [BK, BN]
                        mask=(ks < K)[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
        if MASKED:
            n_half = (N + 1) // 2
            hcols = pid_n * (BN // 2) + tl.arange(0, BN // 2)
            v = tl.load(vals_ptr + rm64[:, None] * stride_v + hcols[None, :],
                        mask=m_ok[:, None] & (hcols < n_half)[None, :], other=0.0)
            v0, v1 = tl.split(tl.reshape(v, (BM, G, 2)))
            nib = _load_meta_nibbles(meta_ptr, rm64, pid_n * W, stride_m, cols_pad, (N + 15) // 16, m_ok,
                                     BM, W, CSLT)
            factor = _expand(2.0 * tl.sqrt(v0.to(tl.float32)), 2.0 * tl.sqrt(v1.to(tl.float32)), nib, BM, G)
            if WRITE_DENSE:   # s for a cuBLAS weight gradient, saving a separate decompression pass
                tl.store(dense_ptr + rm64[:, None] * stride_d + rn[None, :], _expand(v0, v1, nib, BM, G),
                         mask=m_ok[:, None] & n_ok[None, :])
        else:
            y = tl.load(y_ptr + rm64[:, None] * stride_y + rn[None, :], mask=m_ok[:, None] & n_ok[None, :],
                        other=0.0).to(tl.float32)
            factor = 2.0 * tl.where(y < 0, 0.0, y)
        tl.store(gy_ptr + rm64[:, None] * stride_gy + rn[None, :], (acc * factor).to(gy_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _grad_weight_kernel(gz_ptr, vals_ptr, meta_ptr, part_ptr,
                            T, R, N, tokens_per_split, stride_gz, stride_v, stride_m, stride_ps, stride_pr,
                            cols_pad,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CSLT: tl.constexpr):
        """part[split, R, N] = grad_z[tokens of split]^T @ s[tokens of split] (fp32)."""
        G: tl.constexpr = BN // 4
        W: tl.constexpr = BN // 16
        pid = tl.program_id(0)
        split = tl.program_id(1)
        num_pid_n = tl.cdiv(N, BN)
        pid_m = pid % tl.cdiv(R, BM)                  # r blocks of one feature block side by side (s tile in L2)
        pid_n = pid // tl.cdiv(R, BM)
        rm = pid_m * BM + tl.arange(0, BM)            # rank index (columns of grad_z)
        rn = pid_n * BN + tl.arange(0, BN)            # feature index
        rk = tl.arange(0, BK)
        hcols = pid_n * (BN // 2) + tl.arange(0, BN // 2)
        n_half = (N + 1) // 2
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        t_start = split * tokens_per_split
        t_end = tl.minimum(t_start + tokens_per_split, T)
        for t0 in range(t_start, t_end, BK):
            ts = t0 + rk
            t_ok = ts < t_end
            ts64 = ts.to(tl.int64)
            a = tl.load(gz_ptr + ts64[None, :] * stride_gz + rm[:, None],                 # grad_z^T tile [BM, BK]
                        mask=(rm < R)[:, None] & t_ok[None, :], other=0.0)
            v = tl.load(vals_ptr + ts64[:, None] * stride_v + hcols[None, :],
                        mask=t_ok[:, None] & (hcols < n_half)[None, :], other=0.0)
            v0, v1 = tl.split(tl.reshape(v, (BK, G, 2)))
            nib = _load_meta_nibbles(meta_ptr, ts64, pid_n * W, stride_m, cols_pad, (N + 15) // 16, t_ok,
                                     BK, W, CSLT)
            b = _expand(v0, v1, nib, BK, G)                                                # s tile [BK, BN]
            acc = tl.dot(a, b, acc)
        tl.store(part_ptr + split * stride_ps + rm[:, None] * stride_pr + rn[None, :], acc,
                 mask=(rm < R)[:, None] & (rn < N)[None, :])


# (BM, BN, BK, num_warps, num_stages) per kernel; `elas-bench ffn --pieces gemm_tiles` sweeps these on the GPU.
GEMM_TILES = {"fwd": (64, 256, 64, 8, 3), "grad_input": (128, 256, 64, 8, 3), "grad_weight": (128, 128, 64, 8, 3)}


def set_gemm_tiles(**tiles: tuple[int, int, int, int, int]) -> None:
    """Override tile configs, e.g. ``set_gemm_tiles(fwd=(128, 256, 64, 8, 3))``."""
    for name, cfg in tiles.items():
        if name not in GEMM_TILES:
            raise ValueError(f"unknown GEMM {name!r}; choose from {tuple(GEMM_TILES)}")
        GEMM_TILES[name] = tuple(cfg)


def _check16(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.element_size() != 2:
            raise TypeError(f"the fused Triton GEMMs take 16-bit dtypes, got {t.dtype}")


def fused_forward(y1: torch.Tensor, weight: torch.Tensor, *, save: bool = True
                  ) -> tuple[torch.Tensor, tk.Compressed | None]:
    """``z = sparse24(relu(y1)**2) @ weight`` and (``save``) the compressed ``s`` (row-major meta), one kernel.

    Args:
        y1: ``[T, F]`` (last dim contiguous), 16-bit dtype.
        weight: ``[F, r]`` same dtype.
    """
    tk._require_triton()
    _check16(y1, weight)
    y1 = tk._check_2d("y1", y1)
    weight = weight.contiguous()
    t, f = y1.shape
    n = weight.shape[1]
    f_pad = tk._round_up(f, 16)
    z = torch.empty(t, n, dtype=y1.dtype, device=y1.device)
    c = None
    if save:
        vals = torch.empty(t, f_pad // 2, dtype=y1.dtype, device=y1.device)
        meta = torch.empty(t, f_pad // 16, dtype=torch.int16, device=y1.device)
        c = tk.Compressed(vals, meta, None, t, f, t, f_pad, "rowmajor")
    bm, bn, bk, nw, ns = GEMM_TILES["fwd"]
    grid = (triton.cdiv(t, bm) * triton.cdiv(n, bn),)
    _fwd_kernel[grid](y1, weight, z, c.vals if c else z, c.meta if c else z,
                      t, n, f, f_pad, y1.stride(0), weight.stride(0), z.stride(0),
                      c.vals.stride(0) if c else 0, c.meta.stride(0) if c else 0,
                      BM=bm, BN=bn, BK=bk, WRITE_S=save, num_warps=nw, num_stages=ns)
    return z, c


def fused_grad_input(grad_z: torch.Tensor, weight: torch.Tensor, *, c: tk.Compressed | None = None,
                     y1: torch.Tensor | None = None, write_dense: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``grad_y1 = (grad_z @ W^T) * 2 sqrt(s)`` on kept entries (``c`` given) or ``* 2 relu(y1)`` (``y1`` given).

    Returns:
        ``(grad_y1 [T, F], dense s or None)``; ``write_dense`` (masked mode) also writes the decompressed ``s``
        from the epilogue, for a cuBLAS weight gradient.
    """
    tk._require_triton()
    _check16(grad_z, weight)
    grad_z = tk._check_2d("grad_z", grad_z)
    wt = weight.t().contiguous()                                                 # [r, F]: coalesced B tiles
    t, k = grad_z.shape
    f = weight.shape[0]
    gy = torch.empty(t, f, dtype=grad_z.dtype, device=grad_z.device)
    masked = c is not None
    write_dense = write_dense and masked
    dense = torch.empty(t, f, dtype=c.vals.dtype, device=grad_z.device) if write_dense else None
    if not masked:
        y1 = tk._check_2d("y1", y1)
    bm, bn, bk, nw, ns = GEMM_TILES["grad_input"]
    grid = (triton.cdiv(t, bm) * triton.cdiv(f, bn),)
    _grad_input_kernel[grid](
        grad_z, wt, gy, c.vals if masked else gy, c.meta if masked else gy, gy if masked else y1,
        dense if write_dense else gy,
        t, f, k, grad_z.stride(0), wt.stride(0), gy.stride(0),
        c.vals.stride(0) if masked else 0, tk._meta_stride(c) if masked else 0, 0 if masked else y1.stride(0),
        dense.stride(0) if write_dense else 0, c.cols_pad if masked else 0,
        BM=bm, BN=bn, BK=bk, MASKED=masked, CSLT=masked and c.layout == "cusparselt", WRITE_DENSE=write_dense,
        num_warps=nw, num_stages=ns)
    return gy, dense


def fused_grad_weight(grad_z: torch.Tensor, c: tk.Compressed, *, splits: int | None = None) -> torch.Tensor:
    """``grad_W = s^T @ grad_z`` ``[F, r]`` with ``s`` decoded from its compressed form inside the GEMM."""
    tk._require_triton()
    _check16(grad_z)
    grad_z = tk._check_2d("grad_z", grad_z)
    t, r = grad_z.shape
    f = c.cols
    bm, bn, bk, nw, ns = GEMM_TILES["grad_weight"]
    tiles = triton.cdiv(r, bm) * triton.cdiv(f, bn)
    if splits is None:
        sms = torch.cuda.get_device_properties(grad_z.device).multi_processor_count if grad_z.is_cuda else 1
        splits = max(1, min(triton.cdiv(4 * sms, tiles), triton.cdiv(t, 4 * bk)))
    tokens_per_split = tk._round_up(triton.cdiv(t, splits), bk)
    splits = triton.cdiv(t, tokens_per_split)
    part = torch.empty(splits, r, f, dtype=torch.float32, device=grad_z.device)
    _grad_weight_kernel[(tiles, splits)](
        grad_z, c.vals, c.meta, part, t, r, f, tokens_per_split, grad_z.stride(0), c.vals.stride(0),
        tk._meta_stride(c), part.stride(0), part.stride(1), c.cols_pad,
        BM=bm, BN=bn, BK=bk, CSLT=c.layout == "cusparselt", num_warps=nw, num_stages=ns)
    return part.sum(0).t().to(grad_z.dtype)                                       # [F, r]
