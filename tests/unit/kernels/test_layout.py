# SPDX-License-Identifier: Apache-2.0
"""CPU tests of the compressed 2:4 layouts (elas_megatron/kernels/layout.py) the GPU kernels write."""
from __future__ import annotations

import pytest
import torch

from elas_megatron.kernels import layout as L
from elas_megatron.sparsity.masks import sparse24_mask


def _y1(rows, cols, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(rows, cols, generator=g)
    y[0, :16] = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, -1, -2, -3, -4, 2, 3, 3, 2.0])
    y[1::2, 4::8] = y[1::2, 5::8]                               # ties inside groups
    return y.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols", [(5, 16), (37, 96), (128, 256)])
def test_compress_roundtrip_matches_sparse24(dtype, rows, cols):
    y = _y1(rows, cols, dtype)
    vals, words = L.compress_reference(y)
    assert vals.shape == (rows, cols // 2) and vals.dtype == dtype
    assert words.shape == (rows, cols // 16) and words.dtype == torch.int16
    r = torch.relu(y)
    assert torch.equal(L.decompress_reference(vals, words), r * r * sparse24_mask(r))
    nib = L.words_to_nibbles(words)
    i0, i1 = L.kept_indices(sparse24_mask(r))
    assert torch.equal(nib & 3, i0) and torch.equal(nib >> 2, i1)
    assert bool((i0 < i1).all())


def test_group_codes_are_the_tensor_core_codes():
    # keep {0,1} -> 0x4, {2,3} -> 0xE, {0,3} -> 0xC, {1,2} -> 0x9 ; group j of a word sits at bits 4j
    y = torch.tensor([[2.0, 1, 0, 0, 0, 0, 1, 2, 3, 0, 0, 3, 0, 5, 5, 0]])
    _, words = L.compress_reference(y)
    assert int(words[0, 0]) & 0xFFFF == 0x9CE4


def test_words_roundtrip_uses_all_16_bits():
    nib = torch.randint(0, 16, (7, 32))
    assert torch.equal(L.words_to_nibbles(L.nibbles_to_words(nib)), nib)


def test_kept_indices_rejects_bad_masks():
    with pytest.raises(ValueError):
        L.kept_indices(torch.tensor([[True, True, True, False]]))


@pytest.mark.parametrize("rows,cols", [(128, 128), (256, 384), (384, 128)])
def test_cslt_positions_are_a_bijection(rows, cols):
    word, nibble = L.cslt_meta_positions(rows, cols)
    bit = (word * 4 + nibble).reshape(-1)                 # nibble slot of every group
    assert torch.equal(bit.sort().values, torch.arange(rows * cols // 4))


# Read off torch._cslt_compress on an H100 (cuSPARSELt 0.8) by benchmarks/probe_cslt_layout.py, 256x256 matrix:
# (row, group) -> (word, nibble).
PROBED = {(0, 0): (0, 0), (0, 1): (1, 0), (0, 4): (0, 2), (0, 8): (128, 0), (0, 16): (256, 0), (1, 0): (4, 0),
          (2, 0): (8, 0), (4, 0): (16, 0), (8, 0): (0, 1), (16, 0): (32, 0), (64, 0): (1024, 0), (9, 5): (5, 3),
          (255, 63): (3071 + 1024, 3)}


def test_cslt_positions_match_the_probe():
    word, nibble = L.cslt_meta_positions(256, 256)
    for (i, g), (w, n) in PROBED.items():
        assert (int(word[i, g]), int(nibble[i, g])) == (w, n), (i, g)


def test_cslt_layout_needs_padding():
    with pytest.raises(ValueError, match="multiples of 128"):
        L.cslt_meta_positions(100, 128)


def test_cslt_buffer_roundtrip_and_size():
    y = _y1(256, 384, torch.bfloat16)
    vals, words = L.compress_reference(y)
    buf = L.pack_cslt_buffer(vals, words)
    assert buf.numel() == 256 * 384 * 9 // 16
    assert buf.numel() * 2 == L.compressed_nbytes(256, 384, torch.bfloat16)
    v2, w2 = L.unpack_cslt_buffer(buf, 256, 384)
    assert torch.equal(v2, vals) and torch.equal(w2, words)
    with pytest.raises(TypeError):
        L.pack_cslt_buffer(vals.float(), words)
