# SPDX-License-Identifier: Apache-2.0
"""GPU path of the ELAS sparse core vs the plain-PyTorch reference: pattern, compressed bytes, cuSPARSELt layout,
values and gradients, for fp32/bf16/fp16 and odd shapes (rows not a multiple of 128, features not of 16/128).

Run on a CUDA machine: ``python -m pytest tests/gpu -m gpu -q``. Skipped without CUDA (tests/conftest.py).
"""
from __future__ import annotations

import pytest
import torch

from elas_megatron.kernels import layout as L
from elas_megatron.kernels.dispatch import KernelUnavailableError, relu2_sparse24_matmul
from elas_megatron.kernels.reference import relu2_sparse24_matmul_reference
from elas_megatron.sparsity.masks import sparse24_mask

pytestmark = pytest.mark.gpu

tk = pytest.importorskip("elas_megatron.kernels.triton_sparse24")
if not tk.HAS_TRITON:  # pragma: no cover
    pytest.skip("no triton", allow_module_level=True)

from elas_megatron.kernels import cusparselt as cslt  # noqa: E402
from elas_megatron.kernels import triton_gemm as tg  # noqa: E402
from elas_megatron.kernels.elas_core import plan_cache, relu2_sparse24_matmul_gpu  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One tolerance table for outputs and gradients (inputs are scaled so that every result is O(1)).
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=5e-3, atol=5e-3)}
SHAPES = [(1000, 256, 64), (130, 100, 24), (2, 333, 512, 96), (4096 + 7, 704, 128)]
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _needs_cslt(dtype, engine=False):
    """Skip unless cuSPARSELt runs; ``engine``: the full GPU path (16-bit; fp16 without column-major results)."""
    reason = cslt.cusparselt_unavailable_reason(None, dtype if engine else None)
    if reason is not None:
        pytest.skip(f"needs cuSPARSELt: {reason}")
    if dtype == torch.float32:
        pytest.skip("cuSPARSELt 2:4 is for 16-bit dtypes")


def _y1(rows, cols, dtype, seed=0, specials=True):
    """Random y1 with ties inside groups, all-zero / all-negative groups and equal magnitudes across signs."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    y = torch.randn(rows, cols, device="cuda", generator=g)
    if specials and rows >= 4 and cols >= 16:
        y[0, :16] = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, -1, -2, -3, -4, 2, 3, 3, 2.0])
        y[1, :8] = torch.tensor([0.5, -0.5, 0.5, 0.25, 0, 0, 0, 1e-30])
        y[2::3, 4::8] = y[2::3, 5::8]                     # ties between neighbours, many rows
        y[3, :] = y[3, :].abs().round()                    # many exact ties (0, 1, 2 ...)
    return y.to(dtype)


def _bits(x):
    return x.contiguous().view(_INT_VIEW[x.dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", [(1000, 256), (130, 100), (257, 5632 // 8)])
@pytest.mark.parametrize("layout", ["rowmajor", "cusparselt"])
def test_compress_is_bit_exact(dtype, rows, cols, layout):
    if layout == "cusparselt" and dtype == torch.float32:
        pytest.skip("cuSPARSELt layout is for 16-bit dtypes")
    y = _y1(rows, cols, dtype)
    c, dense = tk.relu2_sparse24_compress(y, layout=layout, write_dense=True)
    r = torch.relu(y)
    mask = sparse24_mask(r)
    s_ref = r * r * mask
    # Dense outputs (fused write and decompression) are bit-identical to the reference s.
    assert torch.equal(_bits(dense), _bits(s_ref))
    assert torch.equal(_bits(tk.sparse24_decompress(c)), _bits(s_ref))
    # Pattern: the stored codes are exactly the reference mask's kept indices; values bit-exact.
    cols16 = -(-cols // 16) * 16
    y_pad = torch.nn.functional.pad(y, (0, cols16 - cols))
    vals_ref, words_ref = L.compress_reference(y_pad)
    if layout == "rowmajor":
        vals, words = c.vals, c.meta
    else:
        vals, words = L.unpack_cslt_buffer(c.buffer, c.rows_pad, c.cols_pad)
        assert c.buffer.numel() == c.rows_pad * c.cols_pad * 9 // 16
        # Padding rows/features are zeros with the code of "keep {0, 1}" (0x4444 per word).
        assert bool((vals[rows:] == 0).all()) and bool((words[rows:] == 0x4444).all())
        vals, words = vals[:rows, : cols16 // 2], words[:rows, : cols16 // 16]
    assert torch.equal(words, words_ref)
    assert torch.equal(_bits(vals), _bits(vals_ref))
    nib = L.words_to_nibbles(words)[:, : cols // 4]
    i0, i1 = L.kept_indices(mask)
    assert torch.equal(nib & 3, i0) and torch.equal(nib >> 2, i1)
    # The 2:4 invariant on its own: at most 2 non-zeros in every group of 4.
    assert int((s_ref.reshape(rows, -1, 4) != 0).sum(-1).max()) <= 2


def test_nan_is_kept_and_propagates():
    y = _y1(64, 64, torch.bfloat16, specials=False)
    y[5, 8:12] = torch.tensor([float("nan"), 1.0, 2.0, 3.0], dtype=torch.bfloat16)
    c, dense = tk.relu2_sparse24_compress(y, write_dense=True)
    assert torch.isnan(dense[5, 8]) and dense[5, 9] == 0 and dense[5, 10] == 0 and dense[5, 11] == 9
    assert torch.equal(sparse24_mask(dense[5:6, 8:12]), sparse24_mask(torch.relu(y[5:6, 8:12])))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows,cols", [(128, 128), (256, 384), (384, 1024)])
def test_cusparselt_layout_matches_cslt_compress(dtype, rows, cols):
    """Our fused kernel writes exactly the bytes torch._cslt_compress writes (unambiguous patterns only)."""
    _needs_cslt(dtype)
    y = (_y1(rows, cols, torch.float32, specials=False).abs() + 0.1).to(dtype)   # 2 non-zeros per group
    c, dense = tk.relu2_sparse24_compress(y, layout="cusparselt", write_dense=True)
    ref = torch._cslt_compress(dense).reshape(-1)
    assert ref.numel() == c.buffer.numel()
    n_vals = rows * cols // 2
    got, want = c.buffer.view(torch.int16), ref.view(torch.int16)
    assert torch.equal(got[:n_vals], want[:n_vals]), "values region"
    assert torch.equal(got[n_vals:], want[n_vals:]), "metadata region"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cusparselt_gemm_consumes_fused_output(dtype):
    _needs_cslt(dtype)
    y = _y1(1000, 640, dtype)
    w = (torch.randn(640, 96, device="cuda") / 640 ** 0.5).to(dtype)
    c, dense = tk.relu2_sparse24_compress(y, layout="cusparselt", write_dense=True)
    w_pad = torch.nn.functional.pad(w, (0, 0, 0, c.cols_pad - c.cols))
    for cfg in (cslt.CsltConfig(), cslt.CsltConfig(0, True, False), cslt.CsltConfig(0, False, True)):
        if cfg.transpose_result and not cslt.transposed_result_ok(dtype):
            with pytest.raises(ValueError, match="column-major result"):
                cslt.cslt_mm(c.buffer, w_pad, cfg)
            continue
        z = cslt.cslt_mm(c.buffer, w_pad, cfg)[:1000]
        torch.testing.assert_close(z.float(), (dense.float() @ w.float()), **TOL[dtype])


def _run(fn, y, w, gz):
    y = y.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    z = fn(y, w)
    gy, gw = torch.autograd.grad(z, (y, w), gz)
    return z, gy, gw


# Dispatcher backends, and explicit (forward, backward) variants of the GPU path.
PATHS = ["triton", "cusparselt", "auto", ("fused", "fused"), ("cublas", "cublas"), ("fused", "fused-input"),
         ("cusparselt", "fused-weight"), ("cublas", "fused-weight")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("path", PATHS, ids=str)
@pytest.mark.parametrize("grad_mode", ["masked", "dense"])
def test_matches_reference(dtype, shape, path, grad_mode):
    if "cusparselt" in path:
        _needs_cslt(dtype, engine=True)
    if isinstance(path, tuple) and dtype == torch.float32 and path != ("cublas", "cublas"):
        pytest.skip("the fused Triton GEMMs are for 16-bit dtypes")
    *lead, f, r = shape
    n_tok = 1
    for d in lead:
        n_tok *= d
    y = _y1(n_tok, f, dtype, seed=1).reshape(*lead, f)
    w = (torch.randn(f, r, device="cuda") / f ** 0.5).to(dtype)
    gz = (torch.randn(*lead, r, device="cuda") / n_tok ** 0.5).to(dtype)
    if isinstance(path, tuple):
        def fn(a, b):
            return relu2_sparse24_matmul_gpu(a, b, grad_mode=grad_mode, fwd=path[0], bwd=path[1])
    else:
        def fn(a, b):
            return relu2_sparse24_matmul(a, b, grad_mode=grad_mode, backend=path)
    ref = _run(lambda a, b: relu2_sparse24_matmul_reference(a, b, grad_mode=grad_mode), y, w, gz)
    out = _run(fn, y, w, gz)
    for name, a, b in zip(("z", "grad_y1", "grad_w"), out, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype], msg=lambda m: f"{name}: {m}")


def test_fused_forward_writes_the_compressed_activation():
    y = _y1(1000, 200, torch.bfloat16)
    w = (torch.randn(200, 64, device="cuda") / 200 ** 0.5).to(torch.bfloat16)
    z, c = tg.fused_forward(y, w)
    c_ref, s = tk.relu2_sparse24_compress(y, write_dense=True)
    assert torch.equal(c.meta, c_ref.meta) and torch.equal(_bits(c.vals), _bits(c_ref.vals))
    torch.testing.assert_close(z.float(), s.float() @ w.float(), **TOL[torch.bfloat16])


def _saved_for_backward(fn):
    """``(fn(), the tensors autograd saved while it ran)``."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_masked_mode_saves_only_compressed_activation():
    y = _y1(1000, 512, torch.bfloat16).requires_grad_()
    w = (torch.randn(512, 64, device="cuda") / 512 ** 0.5).to(torch.bfloat16).requires_grad_()
    _, saved = _saved_for_backward(lambda: relu2_sparse24_matmul(y, w, backend="triton"))
    act = [t for t in saved if t.data_ptr() != w.data_ptr()]
    nbytes = sum(t.numel() * t.element_size() for t in act)
    assert nbytes == L.compressed_nbytes(1000, 512, torch.bfloat16)
    assert nbytes / (y.numel() * y.element_size()) == pytest.approx(0.5625)


def test_explicit_backend_fails_loudly():
    y = torch.randn(4, 16, device="cuda")
    w = torch.randn(16, 8, device="cuda")
    with pytest.raises(KernelUnavailableError, match="16-bit"):
        relu2_sparse24_matmul(y, w, backend="cusparselt")
    with pytest.raises(KernelUnavailableError, match="CUDA"):
        relu2_sparse24_matmul(y.cpu(), w.cpu(), backend="triton")


def test_auto_caches_a_plan_per_shape():
    y = _y1(2048, 512, torch.bfloat16)
    w = (torch.randn(512, 64, device="cuda") / 512 ** 0.5).to(torch.bfloat16)
    before = len(plan_cache())
    relu2_sparse24_matmul(y, w, backend="auto")
    relu2_sparse24_matmul(y, w, backend="auto")
    assert len(plan_cache()) == before + 1


# --- the op with B_up inside: sparse input gradient of the up-projection; the direct cuSPARSELt binding -----------

from elas_megatron.kernels import cusparselt_lib  # noqa: E402
from elas_megatron.kernels.dispatch import lowrank_relu2_sparse24_matmul  # noqa: E402
from elas_megatron.kernels.elas_core import lowrank_relu2_sparse24_matmul_gpu  # noqa: E402

LOWRANK_SHAPES = [(1000, 32, 256, 64), (130, 24, 100, 24), (2, 333, 48, 512, 96), (4096 + 7, 64, 704, 128)]


def _run_lowrank(fn, h, up, w, gz):
    h, up, w = (t.detach().clone().requires_grad_() for t in (h, up, w))
    z = fn(h, up, w)
    return (z, *torch.autograd.grad(z, (h, up, w), gz))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOWRANK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("path", [("cublas", "dense"), ("cublas", "sparse"), ("cusparselt", "sparse"),
                                  ("cusparselt", "dense"), ("auto", "auto"), "backend=auto", "backend=cusparselt"],
                         ids=str)
def test_lowrank_op_matches_reference(dtype, shape, path):
    """z, grad_h, grad_B_up, grad_A_down of sparse24(relu(h @ B_up)^2) @ A_down against the reference."""
    if "sparse" in str(path) or "cusparselt" in str(path):
        _needs_cslt(dtype, engine=True)
    *lead, r_up, f, r = shape
    n_tok = 1
    for d in lead:
        n_tok *= d
    g = torch.Generator(device="cuda").manual_seed(2)
    h = torch.randn(*lead, r_up, device="cuda", generator=g).to(dtype)
    up = (torch.randn(r_up, f, device="cuda", generator=g) / r_up ** 0.5).to(dtype)
    w = (torch.randn(f, r, device="cuda", generator=g) / f ** 0.5).to(dtype)
    gz = (torch.randn(*lead, r, device="cuda", generator=g) / n_tok ** 0.5).to(dtype)
    if isinstance(path, tuple):
        def fn(a, b, c):
            return lowrank_relu2_sparse24_matmul_gpu(a, b, c, fwd=path[0], bwd="cublas", grad_h=path[1])
    else:
        def fn(a, b, c):
            return lowrank_relu2_sparse24_matmul(a, b, c, backend=path.split("=")[1])
    ref = _run_lowrank(lambda a, b, c: relu2_sparse24_matmul_reference(a @ b, c), h, up, w, gz)
    out = _run_lowrank(fn, h, up, w, gz)
    for name, a, b in zip(("z", "grad_h", "grad_B_up", "grad_A_down"), out, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype], msg=lambda m: f"{name}: {m}")


def test_lowrank_sparse_grad_h_plan_and_saved_bytes():
    """Forced grad_h='sparse' really takes the sparse path; the op saves h + compressed s (+ weights) only."""
    _needs_cslt(torch.bfloat16, engine=True)
    h = torch.randn(1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    up = (torch.randn(64, 512, device="cuda") / 8).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(512, 64, device="cuda") / 512 ** 0.5).to(torch.bfloat16).requires_grad_()
    z, saved = _saved_for_backward(
        lambda: lowrank_relu2_sparse24_matmul_gpu(h, up, w, fwd="cublas", bwd="cublas", grad_h="sparse"))
    act = [t for t in saved if t.data_ptr() not in (up.data_ptr(), w.data_ptr(), h.data_ptr())]
    assert sum(t.numel() * t.element_size() for t in act) == 1024 * 512 * 9 // 16 * 2   # cuSPARSELt layout, padded
    plans = [p for k, p in plan_cache().items() if k[-1] == (64, "sparse") and k[0] == (1000, 512)]
    assert plans and plans[-1].grad_h == "sparse" and plans[-1].layout == "cusparselt"
    z.float().sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad.float()).all()


@pytest.mark.parametrize("rows,cols", [(1000, 640), (128, 128), (4099, 704)])
def test_masked_grad_compressed_feeds_the_sparse_gemm(rows, cols):
    _needs_cslt(torch.bfloat16, engine=True)
    y = _y1(rows, cols, torch.bfloat16)
    c, _ = tk.relu2_sparse24_compress(y, layout="cusparselt")
    gs = torch.randn(rows, cols, device="cuda").to(torch.bfloat16)
    gy, _, gyc = tk.relu2_sparse24_masked_grad_compressed(gs, c)
    assert torch.equal(tk.sparse24_decompress(gyc), gy)          # by value: gy has -0.0 where gs < 0 is dropped
    up = (torch.randn(96, cols, device="cuda") / cols ** 0.5).to(torch.bfloat16)
    w = torch.nn.functional.pad(up.t(), (0, 0, 0, c.cols_pad - cols))
    for cfg in (cslt.CsltConfig(), cslt.CsltConfig(0, True, False), cslt.CsltConfig(0, False, True)):
        got = cslt.cslt_mm(gyc.buffer, w, cfg)[:rows]
        torch.testing.assert_close(got.float(), gy.float() @ up.float().t(), **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,k,n", [(128, 128, 64), (1024, 768, 96), (4096, 5632, 512), (384, 1024, 1024)])
def test_cusparselt_binding_is_bit_identical_to_torch(dtype, m, k, n):
    """The ctypes binding (cached plans) returns exactly torch._cslt_sparse_mm's bytes for every configuration."""
    _needs_cslt(dtype)
    reason = cusparselt_lib.binding_unavailable_reason(torch.cuda.current_device(), dtype)
    assert reason is None, reason
    y = (_y1(m, k, torch.float32, specials=False).abs() + 0.1).to(dtype)
    c, dense = tk.relu2_sparse24_compress(y, layout="cusparselt", write_dense=True)
    weight = (torch.randn(k, n, device="cuda") / k ** 0.5).to(dtype)
    for col_major in (False, True):
        for transpose_result in (False, True) if cslt.transposed_result_ok(dtype) else (False,):
            base = cslt.CsltConfig(0, col_major, transpose_result)
            algs = {0, cslt.cslt_search_alg_id(c.buffer, weight, base)}
            for alg in sorted(algs):
                cfg = cslt.CsltConfig(alg, col_major, transpose_result)
                want = cslt.cslt_mm(c.buffer, weight, cfg, impl="torch")
                got = cslt.cslt_mm(c.buffer, weight, cfg, impl="lib")
                assert got.shape == want.shape and got.stride() == want.stride(), cfg
                assert torch.equal(got, want), cfg
                torch.testing.assert_close(got.float(), dense.float() @ weight.float(), **TOL[dtype])
    before = len(cusparselt_lib._PLANS)
    cslt.cslt_mm(c.buffer, weight, cslt.CsltConfig(), impl="lib")
    assert len(cusparselt_lib._PLANS) == before                      # the plan is reused, not rebuilt
