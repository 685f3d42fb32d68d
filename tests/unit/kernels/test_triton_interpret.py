# SPDX-License-Identifier: Apache-2.0
"""The Triton kernels' logic on a CPU, through Triton's interpreter (TRITON_INTERPRET=1, in a subprocess).

Skipped where `triton` is not installed (it is an optional dependency). fp32 values are compared bit for bit;
for 16-bit dtypes only the pattern and layout are (the interpreter truncates fp32 -> bf16 instead of rounding).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    from elas_megatron.kernels import layout as L, triton_sparse24 as tk
    from elas_megatron.kernels.elas_core import _LowRankRelu2Sparse24GPU, _Relu2Sparse24MatmulGPU
    from elas_megatron.kernels.reference import relu2_sparse24_matmul_reference
    from elas_megatron.sparsity.masks import sparse24_mask
    torch.manual_seed(0)
    for rows, cols in [(37, 96), (130, 100)]:
        y = torch.randn(rows, cols)
        y[0, :8] = torch.tensor([1., 1, 1, 1, -1, 0, 0, -2])
        r = torch.relu(y)
        s = r * r * sparse24_mask(r)
        c, d = tk.relu2_sparse24_compress(y, write_dense=True)
        assert torch.equal(d, s) and torch.equal(tk.sparse24_decompress(c), s)
        cols16 = -(-cols // 16) * 16
        v, w = L.compress_reference(torch.nn.functional.pad(y, (0, cols16 - cols)))
        assert torch.equal(c.vals, v) and torch.equal(c.meta, w)
        c2, _ = tk.relu2_sparse24_compress(y.bfloat16(), layout="cusparselt")
        _, w2 = L.unpack_cslt_buffer(c2.buffer, c2.rows_pad, c2.cols_pad)
        _, w_ref = L.compress_reference(torch.nn.functional.pad(y.bfloat16(), (0, c2.cols_pad - cols, 0, c2.rows_pad - rows)))
        assert torch.equal(w2, w_ref)
        gs = torch.randn(rows, cols)
        gy, d2 = tk.relu2_sparse24_masked_grad(gs, c, write_dense=True)
        assert torch.equal(d2, s)
        torch.testing.assert_close(gy, gs * 2 * torch.sqrt(s))
    # grad_y1 compressed with s's pattern (cuSPARSELt layout, padded to 128): the operand of the sparse grad_h GEMM
    for rows, cols in [(37, 96), (130, 132)]:
        y = torch.randn(rows, cols).bfloat16()
        c, _ = tk.relu2_sparse24_compress(y, layout="cusparselt")
        gs = torch.randn(rows, cols).bfloat16()
        gy, _, gyc = tk.relu2_sparse24_masked_grad_compressed(gs, c)
        gy_ref, _ = tk.relu2_sparse24_masked_grad(gs, c)
        assert torch.equal(gy, gy_ref)
        pad = (0, c.cols_pad - cols, 0, c.rows_pad - rows)
        vals, words = L.unpack_cslt_buffer(gyc.buffer, c.rows_pad, c.cols_pad)
        _, s_words = L.unpack_cslt_buffer(c.buffer, c.rows_pad, c.cols_pad)
        assert torch.equal(words, s_words)
        assert torch.equal(L.decompress_reference(vals, words), torch.nn.functional.pad(gy, pad))
        assert not vals[rows:].any()
    # the op with B_up inside (grad_h through cuBLAS here; its sparse variant needs cuSPARSELt, tests/gpu)
    h = torch.randn(2, 37, 16, requires_grad=True)
    up = (torch.randn(16, 96) / 4).requires_grad_()
    w = (torch.randn(96, 24) / 10).requires_grad_()
    z = _LowRankRelu2Sparse24GPU.apply(h, up, w, "cublas", "cublas", "dense")
    gz = torch.randn_like(z)
    got = (z, *torch.autograd.grad(z, (h, up, w), gz))
    z2 = relu2_sparse24_matmul_reference(h @ up, w)
    want = (z2, *torch.autograd.grad(z2, (h, up, w), gz))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    for mode in ("masked", "dense"):
        y = torch.randn(2, 37, 96, requires_grad=True)
        w = (torch.randn(96, 24) / 10).requires_grad_()
        z = _Relu2Sparse24MatmulGPU.apply(y, w, mode, "cublas", "cublas")
        gz = torch.randn_like(z)
        got = (z, *torch.autograd.grad(z, (y, w), gz))
        z2 = relu2_sparse24_matmul_reference(y, w, grad_mode=mode)
        want = (z2, *torch.autograd.grad(z2, (y, w), gz))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    print("INTERPRET-OK")
""")


def test_kernels_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "INTERPRET-OK" in proc.stdout, proc.stdout + proc.stderr
