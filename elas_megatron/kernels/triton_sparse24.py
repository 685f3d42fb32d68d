# SPDX-License-Identifier: Apache-2.0
"""Triton kernels of the ELAS sparse core (arXiv 2605.03667, Sec. 3): fused squared-ReLU + 2:4 selection +
compression, and the consumers of the compressed activation in the backward pass.

Kernels (all one pass over the data; layouts in :mod:`elas_megatron.kernels.layout`):
  * :func:`relu2_sparse24_compress` -- reads ``y1 [R, F]`` once, writes the kept values of ``relu(y1)**2``
    ``[R, F/2]`` and 4 bits of metadata per group of 4, either row-major or directly in cuSPARSELt's compressed
    format (then ``torch._cslt_sparse_mm`` consumes it with no further pass). Optionally it also writes the dense
    masked ``s`` for a dense GEMM in the same pass.
  * :func:`sparse24_decompress` -- compressed -> dense ``s``.
  * :func:`relu2_sparse24_masked_grad` -- ``grad_y1 = grad_s * 2 * sqrt(s)`` on the kept entries, 0 elsewhere
    (the exact gradient of the sparsified function, as in the reference), reading only the compressed ``s``;
    optionally writes dense ``s`` in the same pass for the weight-gradient GEMM, and (``..._compressed``)
    ``grad_y1`` compressed with ``s``'s pattern for the sparse input gradient of the up-projection.

The 2:4 selection is the one of :func:`elas_megatron.sparsity.masks.sparse24_mask` applied to ``relu(y1)``:
six comparisons per group, ties toward the lower index, NaN as +inf; the GPU tests check it bit for bit.
Triton is an optional dependency: importing this module without it works, calling a kernel raises.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    _TRITON_IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # pragma: no cover - depends on the install
    HAS_TRITON = False
    _TRITON_IMPORT_ERROR = exc

__all__ = [
    "HAS_TRITON",
    "Compressed",
    "relu2_sparse24_compress",
    "sparse24_decompress",
    "relu2_sparse24_masked_grad",
    "relu2_sparse24_masked_grad_compressed",
]


class Compressed:
    """The compressed activation ``s`` of an ``[rows, cols]`` matrix (the tensors the autograd function saves).

    Attributes:
        vals: ``[rows_pad, cols_pad/2]`` kept values (a view into ``buffer`` for the cuSPARSELt layout).
        meta: int16 metadata words (``[rows_pad, cols_pad/16]`` row-major, or flat in cuSPARSELt order).
        buffer: the single cuSPARSELt buffer (values then metadata) or ``None`` for the row-major layout.
        rows, cols: the logical (unpadded) shape; ``rows_pad``/``cols_pad`` the stored one.
        layout: ``"rowmajor"`` or ``"cusparselt"``.
    """

    __slots__ = ("vals", "meta", "buffer", "rows", "cols", "rows_pad", "cols_pad", "layout")

    def __init__(self, vals, meta, buffer, rows, cols, rows_pad, cols_pad, layout):
        self.vals, self.meta, self.buffer = vals, meta, buffer
        self.rows, self.cols, self.rows_pad, self.cols_pad, self.layout = rows, cols, rows_pad, cols_pad, layout

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.buffer,) if self.buffer is not None else (self.vals, self.meta)

    @classmethod
    def from_tensors(cls, tensors, rows, cols, rows_pad, cols_pad, layout) -> "Compressed":
        if layout == "cusparselt":
            (buf,) = tensors
            vals, meta = _split_cslt_buffer(buf, rows_pad, cols_pad)
            return cls(vals, meta, buf, rows, cols, rows_pad, cols_pad, layout)
        vals, meta = tensors
        return cls(vals, meta, None, rows, cols, rows_pad, cols_pad, layout)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("the Triton ELAS kernels need the `triton` package") from _TRITON_IMPORT_ERROR


def _split_cslt_buffer(buf: torch.Tensor, rows_pad: int, cols_pad: int):
    n_vals = rows_pad * cols_pad // 2
    return buf[:n_vals].view(rows_pad, cols_pad // 2), buf[n_vals:].view(torch.int16)


if HAS_TRITON:

    @triton.jit
    def _cslt_word_offsets(rows, groups, cols_pad):
        """cuSPARSELt metadata: 16-bit word offset and nibble of group (row, g); see layout.py."""
        word = ((rows // 64) * (4 * cols_pad) + (groups // 8) * 128 + ((rows % 64) // 16) * 32
                + (rows % 8) * 4 + groups % 4)
        nibble = (rows // 8) % 2 + 2 * ((groups // 4) % 2)
        return word, nibble

    @triton.jit
    def _split4(x, BT: tl.constexpr, G: tl.constexpr):
        """[BT, 4G] -> the four members (a, b, c, d) of each group, each [BT, G]."""
        x4 = tl.reshape(x, (BT, G, 2, 2))
        lo, hi = tl.split(x4)          # lo: features 4g+{0,2}, hi: 4g+{1,3}
        a, c = tl.split(lo)
        b, d = tl.split(hi)
        return a, b, c, d

    @triton.jit
    def _join4(a, b, c, d, BT: tl.constexpr, G: tl.constexpr):
        """Inverse of _split4."""
        return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), (BT, 4 * G))

    @triton.jit
    def _load_meta_nibbles(meta_ptr, rows, wcol0, stride_m, cols_pad, n_wcols, row_ok,
                           BT: tl.constexpr, W: tl.constexpr, CSLT: tl.constexpr):
        """int32 [BT, 4W]: the 4-bit code (i0 | i1 << 2) of each group of the tile (rows: int64 [BT])."""
        if CSLT:
            groups = wcol0 * 4 + tl.arange(0, 4 * W)
            ok = row_ok[:, None] & (groups < n_wcols * 4)[None, :]
            word, nibble = _cslt_word_offsets(rows[:, None], groups[None, :], cols_pad)
            words = tl.load(meta_ptr + word, mask=ok, other=0x4444).to(tl.int32) & 0xFFFF
            return (words >> (4 * nibble).to(tl.int32)) & 0xF
        else:
            wcols = wcol0 + tl.arange(0, W)
            ok = row_ok[:, None] & (wcols < n_wcols)[None, :]
            words = tl.load(meta_ptr + rows[:, None] * stride_m + wcols[None, :], mask=ok,
                            other=0x4444).to(tl.int32) & 0xFFFF                                  # [BT, W]
            shifts = (tl.arange(0, 4) * 4)[None, None, :]
            nib = (words[:, :, None] >> shifts) & 0xF                                          # [BT, W, 4]
            return tl.reshape(nib, (BT, 4 * W))

    @triton.jit
    def _relu2_select(y, BT: tl.constexpr, G: tl.constexpr):
        """relu(y) split into group members (ra..rd, fp32 [BT, G]) and which two are kept (ka..kd)."""
        y = y.to(tl.float32)
        r = tl.where(y < 0, 0.0, y)                                        # relu, NaN kept (as torch.relu)
        m = tl.where(r != r, float("inf"), r)                              # NaN ranks as +inf (r >= 0: |r| = r)
        ma, mb, mc, md = _split4(m, BT, G)
        ra, rb, rc, rd = _split4(r, BT, G)
        # Six comparisons; "i beats j" for i < j is m_i >= m_j (ties go to the lower index).
        ab = ma >= mb
        ac = ma >= mc
        ad = ma >= md
        bc = mb >= mc
        bd = mb >= md
        cd = mc >= md
        beaten_a = (~ab).to(tl.int32) + (~ac).to(tl.int32) + (~ad).to(tl.int32)
        beaten_b = ab.to(tl.int32) + (~bc).to(tl.int32) + (~bd).to(tl.int32)
        beaten_c = ac.to(tl.int32) + bc.to(tl.int32) + (~cd).to(tl.int32)
        beaten_d = ad.to(tl.int32) + bd.to(tl.int32) + cd.to(tl.int32)
        return beaten_a < 2, beaten_b < 2, beaten_c < 2, beaten_d < 2, ra, rb, rc, rd

    @triton.jit
    def _pack_words(i0, i1, BT: tl.constexpr, W: tl.constexpr):
        """int32 [BT, W] 16-bit words from the kept positions [BT, 4W] (group j of a word at bits 4j)."""
        nib = tl.reshape(i0 | (i1 << 2), (BT, W, 4))
        shifts = (tl.arange(0, 4) * 4)[None, None, :]
        return tl.sum(nib << shifts, axis=2)

    @triton.jit
    def _compress_kernel(y_ptr, vals_ptr, meta_ptr, dense_ptr,
                         n_rows, n_cols, rows_pad, cols_pad,
                         stride_y, stride_v, stride_m, stride_d,
                         BT: tl.constexpr, BF: tl.constexpr, CSLT: tl.constexpr, WRITE_DENSE: tl.constexpr):
        G: tl.constexpr = BF // 4
        W: tl.constexpr = BF // 16
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_r * BT + tl.arange(0, BT)                               # [BT]
        cols = pid_c * BF + tl.arange(0, BF)                               # [BF]
        in_ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        y = tl.load(y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :], mask=in_ok, other=0.0)
        ka, kb, kc, kd, ra, rb, rc, rd = _relu2_select(y, BT, G)
        i0 = tl.where(ka, 0, tl.where(kb, 1, 2))                           # first kept position
        i1 = tl.where(kd, 3, tl.where(kc, 2, 1))                           # second kept position
        v0 = tl.where(ka, ra, tl.where(kb, rb, rc))
        v1 = tl.where(kd, rd, tl.where(kc, rc, rb))
        out_dtype = vals_ptr.dtype.element_ty
        s0 = (v0 * v0).to(out_dtype)                                       # one rounding, as torch's r * r
        s1 = (v1 * v1).to(out_dtype)

        store_rows_ok = rows < rows_pad
        hcols = pid_c * (BF // 2) + tl.arange(0, BF // 2)
        v_ok = store_rows_ok[:, None] & (hcols < cols_pad // 2)[None, :]
        vals = tl.reshape(tl.join(s0, s1), (BT, BF // 2))
        tl.store(vals_ptr + rows[:, None].to(tl.int64) * stride_v + hcols[None, :], vals, mask=v_ok)

        if CSLT:
            # Words hold rows c, c+8 of groups f, f+4 of each 16-row x 32-feature block (rows 16A + 8b + c,
            # groups 8D + 4e + f): nibble b + 2e. Needs BT % 16 == 0 and BF % 32 == 0.
            nib = tl.reshape(i0 | (i1 << 2), (BT // 16, 2, 8, G))
            nib = tl.sum(nib << (tl.arange(0, 2) * 4)[None, :, None, None], axis=1)              # [BT/16, 8, G]
            nib = tl.reshape(nib, (BT // 16, 8, G // 8, 2, 4))
            words = tl.sum(nib << (tl.arange(0, 2) * 8)[None, None, None, :, None], axis=3)     # [BT/16, 8, G/8, 4]
            blk_r = (pid_r * (BT // 16) + tl.arange(0, BT // 16)).to(tl.int64)[:, None, None, None]
            c = tl.arange(0, 8)[None, :, None, None]
            blk_f = (pid_c * (G // 8) + tl.arange(0, G // 8))[None, None, :, None]
            f = tl.arange(0, 4)[None, None, None, :]
            offs = (blk_r // 4) * (4 * cols_pad) + blk_f * 128 + (blk_r % 4) * 32 + c * 4 + f
            ok = (blk_r * 16 < rows_pad) & (blk_f * 32 < cols_pad) & (c >= 0) & (f >= 0)
            tl.store(meta_ptr + offs, words.to(tl.int16), mask=ok)
        else:
            words = _pack_words(i0, i1, BT, W)                             # [BT, W], 16 significant bits
            wcols = pid_c * W + tl.arange(0, W)
            w_ok = store_rows_ok[:, None] & (wcols < cols_pad // 16)[None, :]
            tl.store(meta_ptr + rows[:, None].to(tl.int64) * stride_m + wcols[None, :], words.to(tl.int16),
                     mask=w_ok)

        if WRITE_DENSE:
            zero = tl.zeros_like(ra)
            dense = _join4(tl.where(ka, ra * ra, zero), tl.where(kb, rb * rb, zero),
                           tl.where(kc, rc * rc, zero), tl.where(kd, rd * rd, zero), BT, G)
            tl.store(dense_ptr + rows[:, None].to(tl.int64) * stride_d + cols[None, :],
                     dense.to(dense_ptr.dtype.element_ty), mask=in_ok)

    @triton.jit
    def _expand(v0, v1, nib, BT: tl.constexpr, G: tl.constexpr):
        """Dense [BT, 4G] tile from kept values (v0, v1 [BT, G]) and the group codes."""
        i0 = nib & 3
        i1 = nib >> 2
        zero = tl.zeros_like(v0)
        d0 = tl.where(i0 == 0, v0, zero)
        d1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
        d2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
        d3 = tl.where(i1 == 3, v1, zero)
        return _join4(d0, d1, d2, d3, BT, G)

    @triton.jit
    def _load_compressed_tile(vals_ptr, meta_ptr, n_rows, n_cols, cols_pad, stride_v, stride_m,
                              BT: tl.constexpr, BF: tl.constexpr, CSLT: tl.constexpr):
        """The compressed tile (program_id(0) rows x program_id(1) features) of an element-wise kernel: its rows
        ([BT]) and row mask, the half-width columns ([BF/2]) of the kept values, the kept values (v0, v1: [BT, BF/4])
        and the group codes ([BT, BF/4])."""
        G: tl.constexpr = BF // 4
        W: tl.constexpr = BF // 16
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_r * BT + tl.arange(0, BT)
        row_ok = rows < n_rows
        n_half = (n_cols + 1) // 2
        hcols = pid_c * (BF // 2) + tl.arange(0, BF // 2)
        v = tl.load(vals_ptr + rows[:, None].to(tl.int64) * stride_v + hcols[None, :],
                    mask=row_ok[:, None] & (hcols < n_half)[None, :], other=0.0)
        v0, v1 = tl.split(tl.reshape(v, (BT, G, 2)))
        nib = _load_meta_nibbles(meta_ptr, rows.to(tl.int64), pid_c * W, stride_m, cols_pad,
                                 (n_cols + 15) // 16, row_ok, BT, W, CSLT)
        return rows, row_ok, hcols, v0, v1, nib

    @triton.jit
    def _decompress_kernel(vals_ptr, meta_ptr, out_ptr, n_rows, n_cols, cols_pad,
                           stride_v, stride_m, stride_o,
                           BT: tl.constexpr, BF: tl.constexpr, CSLT: tl.constexpr):
        G: tl.constexpr = BF // 4
        pid_c = tl.program_id(1)
        rows, row_ok, hcols, v0, v1, nib = _load_compressed_tile(vals_ptr, meta_ptr, n_rows, n_cols, cols_pad,
                                                                 stride_v, stride_m, BT, BF, CSLT)
        dense = _expand(v0, v1, nib, BT, G)
        cols = pid_c * BF + tl.arange(0, BF)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :], dense,
                 mask=row_ok[:, None] & (cols < n_cols)[None, :])

    @triton.jit
    def _masked_grad_kernel(gs_ptr, vals_ptr, meta_ptr, gy_ptr, dense_ptr, gyc_ptr, n_rows, n_cols, rows_pad,
                            cols_pad, stride_g, stride_v, stride_m, stride_gy, stride_d, stride_c,
                            BT: tl.constexpr, BF: tl.constexpr, CSLT: tl.constexpr, WRITE_DENSE: tl.constexpr,
                            WRITE_COMPRESSED: tl.constexpr):
        G: tl.constexpr = BF // 4
        pid_c = tl.program_id(1)
        rows, row_ok, hcols, v0, v1, nib = _load_compressed_tile(vals_ptr, meta_ptr, n_rows, n_cols, cols_pad,
                                                                 stride_v, stride_m, BT, BF, CSLT)
        f0 = 2.0 * tl.sqrt(v0.to(tl.float32))                             # d(r^2)/dy1 = 2 r = 2 sqrt(s)
        f1 = 2.0 * tl.sqrt(v1.to(tl.float32))
        factor = _expand(f0, f1, nib, BT, G)
        cols = pid_c * BF + tl.arange(0, BF)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        gs = tl.load(gs_ptr + rows[:, None].to(tl.int64) * stride_g + cols[None, :], mask=ok, other=0.0)
        gy = (gs.to(tl.float32) * factor).to(gy_ptr.dtype.element_ty)
        tl.store(gy_ptr + rows[:, None].to(tl.int64) * stride_gy + cols[None, :], gy, mask=ok)
        if WRITE_DENSE:
            dense = _expand(v0, v1, nib, BT, G)
            tl.store(dense_ptr + rows[:, None].to(tl.int64) * stride_d + cols[None, :], dense, mask=ok)
        if WRITE_COMPRESSED:
            # grad_y1 is zero off the pattern, so its kept entries under s's codes are grad_y1 compressed with
            # s's metadata: a 2:4 operand for the sparse GEMM grad_h = grad_y1 @ B_up^T. Padding rows/features
            # (up to rows_pad/cols_pad) are written as zeros (gs and v load as 0 there).
            ga, gb, gc, gd = _split4(gy, BT, G)
            i0 = nib & 3
            i1 = nib >> 2
            c0 = tl.where(i0 == 0, ga, tl.where(i0 == 1, gb, gc))
            c1 = tl.where(i1 == 3, gd, tl.where(i1 == 2, gc, gb))
            comp = tl.reshape(tl.join(c0, c1), (BT, BF // 2))
            c_ok = (rows < rows_pad)[:, None] & (hcols < cols_pad // 2)[None, :]
            tl.store(gyc_ptr + rows[:, None].to(tl.int64) * stride_c + hcols[None, :], comp, mask=c_ok)


# Tile sizes: (rows, features, warps), the fastest of `elas-bench ffn --pieces tiles` on an H100 (1B shape,
# T=64k; the spread over tiles was under 15%). The cuSPARSELt writer needs rows % 16 == 0 and features % 32 == 0.
_COMPRESS_TILE = (16, 128, 4)
_ELEMWISE_TILE = (16, 256, 4)


def set_tiles(compress: tuple[int, int, int] | None = None, elementwise: tuple[int, int, int] | None = None):
    """Override the tile sizes (rows, features, num_warps) of the kernels (used by the benchmark's sweep)."""
    global _COMPRESS_TILE, _ELEMWISE_TILE
    if compress is not None:
        _COMPRESS_TILE = tuple(compress)
    if elementwise is not None:
        _ELEMWISE_TILE = tuple(elementwise)


def _check_2d(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, features], got shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def relu2_sparse24_compress(y1: torch.Tensor, *, layout: str = "rowmajor", write_dense: bool = False,
                            dense_dtype: torch.dtype | None = None) -> tuple[Compressed, torch.Tensor | None]:
    """Fused ``relu(y1)**2`` + 2:4 selection + compression, one read of ``y1``.

    Args:
        y1: ``[R, F]`` CUDA tensor (fp32/bf16/fp16), ``F % 4 == 0``.
        layout: ``"rowmajor"`` (pads F to 16) or ``"cusparselt"`` (16-bit dtypes; pads R and F to 128, padding
            rows/features are zeros and the buffer is what ``torch._cslt_sparse_mm`` takes).
        write_dense: also write the dense masked ``s`` ``[R, F]`` (for a dense GEMM), same pass.
        dense_dtype: dtype of that dense output (default ``y1.dtype``).
    Returns:
        ``(Compressed, dense_or_None)``.
    """
    _require_triton()
    y1 = _check_2d("y1", y1)
    n_rows, n_cols = y1.shape
    if n_cols % 4:
        raise ValueError(f"2:4 sparsity needs the feature dimension to be a multiple of 4, got {n_cols}")
    if layout == "cusparselt":
        if y1.element_size() != 2:
            raise TypeError(f"the cuSPARSELt layout needs a 16-bit dtype, got {y1.dtype}")
        rows_pad, cols_pad = _round_up(n_rows, 128), _round_up(n_cols, 128)
        buf = torch.empty(rows_pad * cols_pad * 9 // 16, dtype=y1.dtype, device=y1.device)
        vals, meta = _split_cslt_buffer(buf, rows_pad, cols_pad)
        stride_m = 0
    elif layout == "rowmajor":
        rows_pad, cols_pad = n_rows, _round_up(n_cols, 16)
        buf = None
        vals = torch.empty(rows_pad, cols_pad // 2, dtype=y1.dtype, device=y1.device)
        meta = torch.empty(rows_pad, cols_pad // 16, dtype=torch.int16, device=y1.device)
        stride_m = meta.stride(0)
    else:
        raise ValueError(f"layout={layout!r}: choose 'rowmajor' or 'cusparselt'")
    dense = None
    if write_dense:
        dense = torch.empty(n_rows, n_cols, dtype=dense_dtype or y1.dtype, device=y1.device)
    bt, bf, nw = _COMPRESS_TILE
    if layout == "cusparselt" and (bt % 16 or bf % 32):
        raise ValueError(f"compress tile {_COMPRESS_TILE} must be a multiple of (16, 32) for the cuSPARSELt layout")
    grid = (triton.cdiv(rows_pad, bt), triton.cdiv(cols_pad, bf))
    _compress_kernel[grid](
        y1, vals, meta, dense if dense is not None else vals,
        n_rows, n_cols, rows_pad, cols_pad,
        y1.stride(0), vals.stride(0), stride_m, dense.stride(0) if dense is not None else 0,
        BT=bt, BF=bf, CSLT=layout == "cusparselt", WRITE_DENSE=write_dense, num_warps=nw)
    return Compressed(vals, meta, buf, n_rows, n_cols, rows_pad, cols_pad, layout), dense


def _meta_stride(c: Compressed) -> int:
    return c.meta.stride(0) if c.layout == "rowmajor" else 0


def sparse24_decompress(c: Compressed, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``s`` ``[rows, cols]`` from its compressed form (one read of the compressed bytes)."""
    _require_triton()
    if out is None:
        out = torch.empty(c.rows, c.cols, dtype=c.vals.dtype, device=c.vals.device)
    bt, bf, nw = _ELEMWISE_TILE
    grid = (triton.cdiv(c.rows, bt), triton.cdiv(c.cols, bf))
    _decompress_kernel[grid](c.vals, c.meta, out, c.rows, c.cols, c.cols_pad,
                             c.vals.stride(0), _meta_stride(c), out.stride(0),
                             BT=bt, BF=bf, CSLT=c.layout == "cusparselt", num_warps=nw)
    return out


def relu2_sparse24_masked_grad(grad_s: torch.Tensor, c: Compressed, *, write_dense: bool = False,
                               out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``grad_y1 = grad_s * 2 sqrt(s)`` on kept entries (0 elsewhere); optionally dense ``s`` in the same pass.

    Args:
        grad_s: ``[rows, cols]`` gradient w.r.t. ``s`` (``grad_z @ W^T``).
        c: the compressed ``s`` saved by the forward.
        write_dense: also return dense ``s`` (for the weight-gradient GEMM).
        out: where to write ``grad_y1``; may be ``grad_s`` itself (each element is read before it is written).
    Returns:
        ``(grad_y1 [rows, cols] of grad_s.dtype, dense s or None)``.
    """
    grad_y1, dense, _ = _masked_grad(grad_s, c, write_dense, out, compressed=False)
    return grad_y1, dense


def relu2_sparse24_masked_grad_compressed(grad_s: torch.Tensor, c: Compressed, *, write_dense: bool = False,
                                          out: torch.Tensor | None = None
                                          ) -> tuple[torch.Tensor, torch.Tensor | None, Compressed]:
    """As :func:`relu2_sparse24_masked_grad`, and in the same pass ``grad_y1`` compressed with ``s``'s pattern.

    ``grad_y1`` is zero wherever ``s`` is, so it is 2:4 sparse along the features with exactly ``s``'s codes:
    only its kept values are written, into a new cuSPARSELt buffer whose metadata is a copy of ``c``'s (1/9 of
    the buffer). ``torch._cslt_sparse_mm`` then computes the up-projection's input gradient
    ``grad_y1 @ B_up^T`` on the sparse tensor cores. Needs ``c`` in the ``"cusparselt"`` layout.

    Returns:
        ``(grad_y1 dense, dense s or None, grad_y1 compressed)``.
    """
    if c.layout != "cusparselt":
        raise ValueError("the compressed gradient reuses s's cuSPARSELt metadata: compress s with "
                         f"layout='cusparselt' (got {c.layout!r})")
    return _masked_grad(grad_s, c, write_dense, out, compressed=True)


def _masked_grad(grad_s: torch.Tensor, c: Compressed, write_dense: bool, out: torch.Tensor | None,
                 compressed: bool) -> tuple[torch.Tensor, torch.Tensor | None, Compressed | None]:
    _require_triton()
    grad_s = _check_2d("grad_s", grad_s)
    if tuple(grad_s.shape) != (c.rows, c.cols):
        raise ValueError(f"grad_s shape {tuple(grad_s.shape)} != compressed shape {(c.rows, c.cols)}")
    grad_y1 = torch.empty_like(grad_s) if out is None else out
    dense = torch.empty(c.rows, c.cols, dtype=c.vals.dtype, device=c.vals.device) if write_dense else None
    gyc = None
    if compressed:
        buf = torch.empty_like(c.buffer)
        n_vals = c.vals.numel()
        buf[n_vals:].copy_(c.buffer[n_vals:])                                  # same pattern: same metadata
        vals, meta = _split_cslt_buffer(buf, c.rows_pad, c.cols_pad)
        gyc = Compressed(vals, meta, buf, c.rows, c.cols, c.rows_pad, c.cols_pad, c.layout)
    bt, bf, nw = _ELEMWISE_TILE
    rows, cols = (c.rows_pad, c.cols_pad) if compressed else (c.rows, c.cols)
    grid = (triton.cdiv(rows, bt), triton.cdiv(cols, bf))
    _masked_grad_kernel[grid](grad_s, c.vals, c.meta, grad_y1, dense if dense is not None else grad_y1,
                              gyc.vals if gyc is not None else grad_y1,
                              c.rows, c.cols, c.rows_pad, c.cols_pad,
                              grad_s.stride(0), c.vals.stride(0), _meta_stride(c), grad_y1.stride(0),
                              dense.stride(0) if dense is not None else 0,
                              gyc.vals.stride(0) if gyc is not None else 0,
                              BT=bt, BF=bf, CSLT=c.layout == "cusparselt", WRITE_DENSE=write_dense,
                              WRITE_COMPRESSED=compressed, num_warps=nw)
    return grad_y1, dense, gyc
