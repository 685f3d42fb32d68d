# SPDX-License-Identifier: Apache-2.0
"""Compressed 2:4 layouts of the saved activation ``s = sparse24(relu(y1)**2)``, in plain PyTorch.

The fused GPU kernels (:mod:`elas_megatron.kernels.triton_sparse24`) write ``s`` compressed: the 2 kept values of
every group of 4 and 4 bits of metadata per group, i.e. ``9/16 = 0.5625`` of the dense bytes for 16-bit dtypes.
This module is the executable description of those layouts, written with ordinary tensor ops so that it can be
checked on a CPU; the Triton kernels compute the same addresses and the GPU tests compare them byte for byte.

Per group ``g`` of a row (features ``4g .. 4g+3``) with kept indices ``i0 < i1``:
  * values: ``vals[row, 2g] = s[row, 4g+i0]``, ``vals[row, 2g+1] = s[row, 4g+i1]`` -- row-major ``[R, F/2]``;
  * nibble: ``i0 | i1 << 2`` (the sparse tensor cores' 2-bit index pairs, e.g. keep {0,1} -> 0x4);
  * word: 4 consecutive groups (16 features) form one 16-bit word, group ``j`` of the word at bits ``4j``.

Two placements of the codes ("meta layouts"):
  * ``"rowmajor"``: words ``[R, F/16]`` row-major (int16), word = 4 consecutive groups of one row, group ``j`` of
    the word at bits ``4j``. Any ``R``, ``F % 16 == 0``.
  * ``"cusparselt"``: the order of cuSPARSELt's compressed matrix (``torch._cslt_compress``: ``[R, F/2]`` values,
    then the 16-bit metadata words), so that ``torch._cslt_sparse_mm`` consumes the kernel's output directly.
    Measured on an H100 with cuSPARSELt 0.8 (``benchmarks/probe_cslt_layout.py``): blocks of 64 rows x 32
    features (128 words) stored row-block-major; in a block, the code of row ``i``, group ``g`` sits in word
    ``((i % 64) // 16) * 32 + (i % 8) * 4 + g % 4`` at nibble ``(i // 8) % 2 + 2 * ((g // 4) % 2)`` (a word
    holds rows ``i`` and ``i + 8`` of groups ``g`` and ``g + 4``, the sparse MMA's fragment order). It is *not*
    the sm80 order described in PyTorch's ``SparseSemiStructuredTile.cu``. Needs ``R % 64 == 0``,
    ``F % 32 == 0``; we pad both to 128. The GPU tests compare it byte for byte with ``torch._cslt_compress``,
    and the dispatcher checks it once per device before using cuSPARSELt.
"""
from __future__ import annotations

import torch

from elas_megatron.sparsity.masks import sparse24_mask

__all__ = [
    "META_LAYOUTS",
    "CSLT_ROW_ALIGN",
    "CSLT_COL_ALIGN",
    "kept_indices",
    "nibbles_to_words",
    "words_to_nibbles",
    "cslt_meta_positions",
    "compress_reference",
    "decompress_reference",
    "pack_cslt_buffer",
    "unpack_cslt_buffer",
    "compressed_nbytes",
]

META_LAYOUTS = ("rowmajor", "cusparselt")
CSLT_ROW_ALIGN = 128
CSLT_COL_ALIGN = 128
_NIBBLE_SHIFTS = torch.tensor([0, 4, 8, 12])


def kept_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(i0, i1)`` int64 ``[..., F/4]``: positions of the two kept entries of each group (``i0 < i1``).

    Args:
        mask: bool ``[..., F]`` with exactly 2 True per group of 4 (as :func:`sparse24_mask` returns).
    """
    g = mask.reshape(*mask.shape[:-1], mask.shape[-1] // 4, 4).to(torch.int64)
    if not bool((g.sum(-1) == 2).all()):
        raise ValueError("mask must keep exactly 2 entries in every group of 4")
    pos = torch.arange(4, device=mask.device)
    # i0 = first kept position, i1 = last kept position (exactly two are kept).
    i0 = torch.where(g.bool(), pos, 4).amin(-1)
    i1 = torch.where(g.bool(), pos, -1).amax(-1)
    return i0, i1


def nibbles_to_words(nib: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit group codes ``[..., G]`` (G % 4 == 0) into 16-bit words ``[..., G/4]`` (int16 bit pattern)."""
    if nib.shape[-1] % 4:
        raise ValueError(f"need a multiple of 4 groups per row (16 features), got {nib.shape[-1]} groups")
    n = nib.to(torch.int32).reshape(*nib.shape[:-1], nib.shape[-1] // 4, 4)
    w = (n << _NIBBLE_SHIFTS.to(device=nib.device, dtype=torch.int32)).sum(-1)   # [..., G/4] in 0..65535
    return w.to(torch.int16)                                                      # two's-complement wrap


def words_to_nibbles(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`nibbles_to_words`: int16 words ``[..., W]`` -> int64 nibbles ``[..., 4W]``."""
    w = words.to(torch.int32) & 0xFFFF
    n = (w[..., None] >> _NIBBLE_SHIFTS.to(device=words.device, dtype=torch.int32)) & 0xF
    return n.reshape(*words.shape[:-1], words.shape[-1] * 4).to(torch.int64)


def cslt_meta_positions(rows: int, cols: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the code of group ``(row, g)`` lives in cuSPARSELt's metadata: ``(word offset, nibble)``,
    each int64 ``[rows, cols/4]`` (offsets in 16-bit units from the start of the metadata).

    Args:
        rows: rows of the sparse matrix (multiple of 128).
        cols: dense columns, the 2:4 dimension (multiple of 128).
    """
    if rows % CSLT_ROW_ALIGN or cols % CSLT_COL_ALIGN:
        raise ValueError(f"cuSPARSELt layout needs rows and cols multiples of 128, got {rows}x{cols}; pad first")
    i = torch.arange(rows, device=device)[:, None]
    g = torch.arange(cols // 4, device=device)[None, :]
    word = (i // 64) * (4 * cols) + (g // 8) * 128 + ((i % 64) // 16) * 32 + (i % 8) * 4 + g % 4
    nibble = (i // 8) % 2 + 2 * ((g // 4) % 2)
    return word, nibble.expand_as(word)


def compress_reference(y1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch fused op: ``relu(y1)**2``, its 2:4 pattern, compressed.

    Args:
        y1: ``[R, F]`` float, ``F % 16 == 0``.
    Returns:
        ``(vals [R, F/2] of y1.dtype, words [R, F/16] int16)`` in the ``"rowmajor"`` meta layout.
    """
    if y1.dim() != 2 or y1.shape[-1] % 16:
        raise ValueError(f"compress_reference needs [R, F] with F % 16 == 0, got {tuple(y1.shape)}")
    r = torch.relu(y1)
    mask = sparse24_mask(r)
    i0, i1 = kept_indices(mask)
    g = (r * r).reshape(r.shape[0], -1, 4)
    vals = torch.stack([g.gather(-1, i0[..., None])[..., 0], g.gather(-1, i1[..., None])[..., 0]], -1)
    return vals.reshape(r.shape[0], -1), nibbles_to_words(i0 | (i1 << 2))


def decompress_reference(vals: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Dense ``[R, F]`` from ``vals [R, F/2]`` and row-major ``words [R, F/16]``."""
    nib = words_to_nibbles(words)                                   # [R, G]
    i0, i1 = nib & 3, nib >> 2
    v = vals.reshape(vals.shape[0], -1, 2)
    out = torch.zeros(*nib.shape, 4, dtype=vals.dtype, device=vals.device)
    out.scatter_(-1, i0[..., None], v[..., :1])
    out.scatter_(-1, i1[..., None], v[..., 1:])
    return out.reshape(vals.shape[0], -1)


def compressed_nbytes(rows: int, cols: int, dtype: torch.dtype) -> int:
    """Bytes of the compressed ``[rows, cols]`` matrix: values plus 4 bits per group of 4."""
    return rows * cols // 2 * torch.empty((), dtype=dtype).element_size() + rows * cols // 8


def pack_cslt_buffer(vals: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """One 1-D buffer in ``torch._cslt_compress``'s format from ``vals [R, F/2]`` and row-major ``words``.

    Only 16-bit value dtypes: the metadata is stored in the same buffer, in 16-bit units.
    """
    rows, half = vals.shape
    cols = 2 * half
    if vals.element_size() != 2:
        raise TypeError(f"cuSPARSELt 2:4 buffers hold 16-bit values, got {vals.dtype}")
    word, nibble = cslt_meta_positions(rows, cols, vals.device)
    codes = words_to_nibbles(words)                                        # [R, F/4]
    meta = torch.zeros(rows * cols // 16, dtype=torch.int64, device=vals.device)
    meta.scatter_add_(0, word.reshape(-1), (codes << (4 * nibble)).reshape(-1))   # distinct bits: add == or
    buf = torch.empty(rows * cols * 9 // 16, dtype=vals.dtype, device=vals.device)
    buf[: rows * half] = vals.reshape(-1)
    buf[rows * half:].view(torch.int16).copy_(meta.to(torch.int32).to(torch.int16))
    return buf


def unpack_cslt_buffer(buf: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_cslt_buffer`: ``(vals [R, F/2], row-major words [R, F/16])``."""
    buf = buf.reshape(-1)
    half = cols // 2
    vals = buf[: rows * half].reshape(rows, half)
    meta = buf[rows * half:].view(torch.int16).to(torch.int64) & 0xFFFF
    word, nibble = cslt_meta_positions(rows, cols, buf.device)
    codes = (meta[word] >> (4 * nibble)) & 0xF                              # [R, F/4]
    return vals, nibbles_to_words(codes)
