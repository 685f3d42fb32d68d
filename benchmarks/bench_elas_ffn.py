# SPDX-License-Identifier: Apache-2.0
"""ELAS FFN GPU benchmark (issue 4): fused kernel vs its memory-bandwidth bound, the sparse core and the whole
low-rank FFN (fwd, fwd+bwd) vs elas computed dense vs cola SwiGLU, at 1B and 7B shapes, T = 32k/64k, bf16,
and the activation memory saved. Prints markdown tables (pasted into docs/kernels.md) and writes JSON.

Usage (on a CUDA machine): ``python benchmarks/bench_elas_ffn.py [--json out.json] [--quick]``.
Times are medians of CUDA-event-timed repetitions after warm-up (as the anchor probe does).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F

from elas_megatron.kernels import cusparselt as cslt
from elas_megatron.kernels import triton_gemm as tg
from elas_megatron.kernels import triton_sparse24 as tk
from elas_megatron.kernels.dispatch import lowrank_relu2_sparse24_matmul, relu2_sparse24_matmul
from elas_megatron.kernels.elas_core import (lowrank_relu2_sparse24_matmul_gpu, plan_cache,
                                             relu2_sparse24_matmul_gpu)

logger = logging.getLogger("bench_elas_ffn")
RESULTS: dict = {}
SHAPES = {"1B": (2048, 5632, 512), "7B": (4096, 11008, 1024)}


def bench(fn, iters=20, warm=5) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def table(title, header, rows):
    out = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    print("\n".join(out), flush=True)


def section(fn):
    def run(*a, **k):
        try:
            fn(*a, **k)
        except Exception:  # a benchmark keeps going and reports what failed
            print(f"\n!!! section {fn.__name__} failed:\n{traceback.format_exc()}", flush=True)
        torch.cuda.empty_cache()
    return run


@section
def ceilings():
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a))
    bw = 2 * n / t / 1e9   # TB/s, read + write
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t2 = bench(lambda: x @ x, iters=10)
    RESULTS["ceilings"] = {"copy_TBps": bw, "bf16_gemm_TFLOPs": 2 * 8192 ** 3 / t2 / 1e9}
    table("Ceilings measured in this run", ["device-to-device copy (TB/s, read+write)", "bf16 GEMM 8192^3 (TFLOP/s)"],
          [[f"{bw:.2f}", f"{2 * 8192 ** 3 / t2 / 1e9:.0f}"]])


def _bw():
    return RESULTS.get("ceilings", {}).get("copy_TBps", 3.0)


@section
def tile_sweep():
    y = torch.randn(65536, 5632, device="cuda", dtype=torch.bfloat16)
    rows = []
    best = None
    for tile in [(32, 128, 4), (16, 256, 4), (32, 256, 8), (64, 128, 8), (64, 256, 8), (128, 128, 8), (16, 128, 4)]:
        tk.set_tiles(compress=tile)
        t = bench(lambda: tk.relu2_sparse24_compress(y, layout="cusparselt"))
        rows.append([str(tile), f"{t:.3f}"])
        if best is None or t < best[0]:
            best = (t, tile)
    tk.set_tiles(compress=best[1])
    gs = torch.randn_like(y)
    c, _ = tk.relu2_sparse24_compress(y, layout="cusparselt")
    best_e = None
    for tile in [(32, 128, 4), (16, 256, 4), (32, 256, 8), (64, 128, 8), (64, 256, 8)]:
        tk.set_tiles(elementwise=tile)
        t = bench(lambda: tk.relu2_sparse24_masked_grad(gs, c, write_dense=True, out=gs))
        rows.append([f"masked_grad {tile}", f"{t:.3f}"])
        if best_e is None or t < best_e[0]:
            best_e = (t, tile)
    tk.set_tiles(elementwise=best_e[1])
    RESULTS["tiles"] = {"compress": best[1], "elementwise": best_e[1]}
    table("Tile sweep, T=64k, F=5632 (ms)", ["kernel tile (rows, features, warps)", "ms"], rows)


GEMM_TILE_CANDIDATES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3), (128, 128, 32, 4, 4)]


@section
def gemm_tile_sweep():
    t, f, r = 65536, 5632, 512
    y = torch.randn(t, f, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(f, r, device="cuda", dtype=torch.bfloat16) / f ** 0.5
    gz = torch.randn(t, r, device="cuda", dtype=torch.bfloat16)
    c, _ = tk.relu2_sparse24_compress(y)
    kernels = {"fwd": lambda: tg.fused_forward(y, w), "grad_input": lambda: tg.fused_grad_input(gz, w, c=c),
               "grad_weight": lambda: tg.fused_grad_weight(gz, c)}
    rows, best = [], {}
    for name, fn in kernels.items():
        for tile in GEMM_TILE_CANDIDATES:
            tg.set_gemm_tiles(**{name: tile})
            try:
                ms = bench(fn, iters=10, warm=2)
            except Exception as exc:  # out of shared memory / registers for this tile: skip it
                rows.append([name, str(tile), f"failed: {type(exc).__name__}"])
                continue
            rows.append([name, str(tile), f"{ms:.3f}"])
            if name not in best or ms < best[name][0]:
                best[name] = (ms, tile)
        tg.set_gemm_tiles(**{name: best[name][1]})
    RESULTS["gemm_tiles"] = {k: v[1] for k, v in best.items()}
    table("Fused Triton GEMM tile sweep, 1B T=64k (ms)", ["GEMM", "tile (BM, BN, BK, warps, stages)", "ms"], rows)


@section
def fused_kernels(tokens):
    rows = []
    for name, (_, f, _) in SHAPES.items():
        for t in tokens:
            y = torch.randn(t, f, device="cuda", dtype=torch.bfloat16)
            dense_b = t * f * 2
            comp_b = t * f * 9 // 16 * 2
            cases = {
                "compress (rowmajor meta)": (lambda: tk.relu2_sparse24_compress(y), dense_b + comp_b),
                "compress (cuSPARSELt layout)": (lambda: tk.relu2_sparse24_compress(y, layout="cusparselt"),
                                                 dense_b + comp_b),
                "compress + dense s": (lambda: tk.relu2_sparse24_compress(y, write_dense=True),
                                       2 * dense_b + comp_b),
            }
            c, s = tk.relu2_sparse24_compress(y, layout="cusparselt", write_dense=True)
            gs = torch.randn_like(y)
            cases["masked grad (in place) + dense s"] = (
                lambda: tk.relu2_sparse24_masked_grad(gs, c, write_dense=True, out=gs), 3 * dense_b + comp_b)
            cases["decompress"] = (lambda: tk.sparse24_decompress(c), dense_b + comp_b)
            cases["relu(y1)**2 (torch, dense, for scale)"] = (lambda: torch.relu(y).square(), 2 * dense_b)
            if t == 65536 and name == "1B":
                if hasattr(torch, "_sparse_semi_structured_tile"):
                    cases["torch._sparse_semi_structured_tile (2-way)"] = (
                        lambda: torch._sparse_semi_structured_tile(s, algorithm="", use_cutlass=False),
                        dense_b + 2 * comp_b)
                if cslt.cusparselt_unavailable_reason() is None:
                    cases["torch._cslt_compress (of masked s)"] = (lambda: torch._cslt_compress(s),
                                                                    dense_b + comp_b)
            for label, (fn, nbytes) in cases.items():
                ms = bench(fn)
                bound = nbytes / (_bw() * 1e12) * 1e3
                rows.append([name, t, label, f"{ms:.3f}", f"{bound:.3f}", f"{ms / bound:.2f}x"])
                RESULTS.setdefault("fused", []).append(
                    {"shape": name, "T": t, "kernel": label, "ms": ms, "bound_ms": bound})
            del y, c, s, gs
            torch.cuda.empty_cache()
    table("Fused kernels vs memory-bandwidth bound (bytes read+written / measured copy bandwidth)",
          ["shape", "T", "kernel", "ms", "bound ms", "time/bound"], rows)


@section
def gemms(tokens):
    rows = []
    for name, (_, f, r) in SHAPES.items():
        for t in tokens:
            y = torch.randn(t, f, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(f, r, device="cuda", dtype=torch.bfloat16) / f ** 0.5
            c, s = tk.relu2_sparse24_compress(y, layout="cusparselt", write_dense=True)
            rows.append([name, t, "dense cuBLAS s @ W", f"{bench(lambda: s @ w):.3f}"])
            rows.append([name, t, "Triton fused fwd (from y1: relu^2 + 2:4 + GEMM + compressed s)",
                         f"{bench(lambda: tg.fused_forward(y, w)):.3f}"])
            rows.append([name, t, "Triton fused fwd, no compressed-s write",
                         f"{bench(lambda: tg.fused_forward(y, w, save=False)):.3f}"])
            rows.append([name, t, "compress (cuSPARSELt layout) alone",
                         f"{bench(lambda: tk.relu2_sparse24_compress(y, layout='cusparselt')):.3f}"])
            if cslt.cusparselt_unavailable_reason() is None:
                for col_major in (False, True):
                    for tres in (False, True):
                        cfg = cslt.CsltConfig(0, col_major, tres)
                        try:
                            cfg.alg_id = cslt.cslt_search_alg_id(c.buffer, w, cfg)
                        except RuntimeError as exc:
                            print("search failed", exc)
                        ms = bench(lambda: cslt.cslt_mm(c.buffer, w, cfg))
                        rows.append([name, t, f"cuSPARSELt {cfg}", f"{ms:.3f}"])
            gz = torch.randn(t, r, device="cuda", dtype=torch.bfloat16)
            rows.append([name, t, "grad_s = grad_z @ W^T (cuBLAS)", f"{bench(lambda: gz @ w.t()):.3f}"])
            rows.append([name, t, "grad_y1 = (grad_z @ W^T) * 2 sqrt(s) (Triton, fused epilogue)",
                              f"{bench(lambda: tg.fused_grad_input(gz, w, c=c)):.3f}"])
            rows.append([name, t, "grad_W = s^T @ grad_z (cuBLAS, dense s)", f"{bench(lambda: s.t() @ gz):.3f}"])
            rows.append([name, t, "grad_W (Triton, s decoded in the GEMM)",
                         f"{bench(lambda: tg.fused_grad_weight(gz, c)):.3f}"])
            del y, c, s, gz
            torch.cuda.empty_cache()
    table("GEMMs of the core (ms)", ["shape", "T", "GEMM", "ms"], rows)


@contextlib.contextmanager
def cslt_impl(impl):
    """Route every cuSPARSELt GEMM through ``impl`` ("lib": cached plans, "torch": torch._cslt_sparse_mm)."""
    old = os.environ.get(cslt.IMPL_ENV)
    os.environ[cslt.IMPL_ENV] = impl
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(cslt.IMPL_ENV)
        else:
            os.environ[cslt.IMPL_ENV] = old


def _best_cfg(buffer, w):
    best = None
    for col_major in (False, True):
        for tres in (False, True):
            cfg = cslt.CsltConfig(0, col_major, tres)
            try:
                cfg.alg_id = cslt.cslt_search_alg_id(buffer, w, cfg)
            except RuntimeError as exc:
                print("search failed", exc)
            ms = bench(lambda: cslt.cslt_mm(buffer, w, cfg, impl="lib"))
            if best is None or ms < best[0]:
                best = (ms, cfg)
    return best[1]


@section
def sparse_backward(tokens):
    """The pieces of the sparse grad_h and of the cuSPARSELt binding, each synchronized after every call (so a
    call's host time shows when it exceeds its GPU time) and back to back (host time hidden)."""
    rows = []
    for name, (d, f, r) in SHAPES.items():
        for t in tokens:
            y = torch.randn(t, f, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(f, r, device="cuda", dtype=torch.bfloat16) / f ** 0.5
            up = torch.randn(r, f, device="cuda", dtype=torch.bfloat16) / r ** 0.5
            c, s = tk.relu2_sparse24_compress(y, layout="cusparselt", write_dense=True)
            gs = torch.randn(t, f, device="cuda", dtype=torch.bfloat16)
            gy = torch.empty_like(gs)
            _, _, gyc = tk.relu2_sparse24_masked_grad_compressed(gs, c, out=gy)
            up_t = up.t()
            cfg_f, cfg_h = _best_cfg(c.buffer, w), _best_cfg(gyc.buffer, up_t)

            def b2b(fn, n=10):
                def run():
                    for _ in range(n):
                        fn()
                return bench(run, iters=5, warm=1) / n

            for label, fn in {
                "fwd s @ A_down: cuBLAS (dense s)": lambda: s @ w,
                "fwd s @ A_down: cuSPARSELt via torch._cslt_sparse_mm": lambda: cslt.cslt_mm(c.buffer, w, cfg_f,
                                                                                              impl="torch"),
                "fwd s @ A_down: cuSPARSELt via our binding (cached plan)": lambda: cslt.cslt_mm(c.buffer, w, cfg_f,
                                                                                                 impl="lib"),
                "grad_h = grad_y1 @ B_up^T: cuBLAS (dense grad_y1)": lambda: gy @ up_t,
                "grad_h: cuSPARSELt via torch._cslt_sparse_mm": lambda: cslt.cslt_mm(gyc.buffer, up_t, cfg_h,
                                                                                     impl="torch"),
                "grad_h: cuSPARSELt via our binding (cached plan)": lambda: cslt.cslt_mm(gyc.buffer, up_t, cfg_h,
                                                                                         impl="lib"),
                "masked-grad pass (+ dense s)": lambda: tk.relu2_sparse24_masked_grad(gs, c, write_dense=True,
                                                                                     out=gy),
                "masked-grad pass (+ dense s) + compressed grad_y1": lambda: tk.relu2_sparse24_masked_grad_compressed(
                    gs, c, write_dense=True, out=gy),
            }.items():
                rows.append([name, t, label, f"{bench(fn):.3f}", f"{b2b(fn):.3f}"])
            RESULTS.setdefault("sparse_backward_cfg", {})[f"{name} {t}"] = {"fwd": repr(cfg_f), "grad_h": repr(cfg_h)}
            del y, c, s, gs, gy, gyc
            torch.cuda.empty_cache()
    table("Sparse-GEMM pieces (ms): one synchronized call / back-to-back mean",
          ["shape", "T", "piece", "synchronized", "back to back"], rows)
    RESULTS["sparse_backward"] = rows


def _fwd_bwd(fn, inputs, grad):
    def run():
        out = fn()
        out.backward(grad)
        for p in inputs:
            p.grad = None
    return run


@section
def core_op(tokens):
    rows = []
    for name, (_, f, r) in SHAPES.items():
        for t in tokens:
            y = torch.randn(t, f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            w = (torch.randn(f, r, device="cuda", dtype=torch.bfloat16) / f ** 0.5).requires_grad_()
            gz = torch.randn(t, r, device="cuda", dtype=torch.bfloat16)
            variants = {
                "dense relu(y1)**2 @ W (torch)": lambda: torch.relu(y).square() @ w,
                "reference (torch, 2:4)": lambda: relu2_sparse24_matmul(y, w, backend="reference"),
                "GPU: compress pass + cuBLAS GEMMs": lambda: relu2_sparse24_matmul_gpu(y, w, fwd="cublas",
                                                                                       bwd="cublas"),
                "GPU: Triton fused GEMMs": lambda: relu2_sparse24_matmul_gpu(y, w, fwd="fused", bwd="fused"),
                "GPU: cuSPARSELt fwd + fused bwd": lambda: relu2_sparse24_matmul_gpu(y, w, fwd="cusparselt",
                                                                                     bwd="fused"),
                "backend=triton (autotuned)": lambda: relu2_sparse24_matmul(y, w, backend="triton"),
                "backend=auto (autotuned)": lambda: relu2_sparse24_matmul(y, w, backend="auto"),
            }
            base = None
            for label, fn in variants.items():
                with torch.no_grad():
                    fwd = bench(fn)
                fb = bench(_fwd_bwd(fn, (y, w), gz))
                base = base or (fwd, fb)
                rows.append([name, t, label, f"{fwd:.3f}", f"{fb:.3f}", f"{base[0] / fwd:.2f}x", f"{base[1] / fb:.2f}x"])
                RESULTS.setdefault("core", []).append({"shape": name, "T": t, "variant": label, "fwd_ms": fwd,
                                                       "fwd_bwd_ms": fb})
            del y, w, gz
            torch.cuda.empty_cache()
    table("ELAS sparse core z = sparse24(relu(y1)^2) @ A_down (ms; speed-up vs dense torch)",
          ["shape", "T", "variant", "fwd", "fwd+bwd", "fwd speed-up", "fwd+bwd speed-up"], rows)
    plans = {str(k[:2] + k[5:]): repr(v) + " " + str({a: round(b, 3) for a, b in v.timings_ms.items()})
             for k, v in plan_cache().items()}
    RESULTS["plans"] = plans
    print("\nauto plans:", json.dumps(plans, indent=1))


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@section
def ffn(tokens):
    rows = []
    for name, (d, f, r) in SHAPES.items():
        for t in tokens:
            x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

            def p(*shape):
                return (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) / shape[0] ** 0.5).requires_grad_()

            ag, bg, au, bu, ad, bd = p(d, r), p(r, f), p(d, r), p(r, f), p(f, r), p(r, d)
            params = (x, ag, bg, au, bu, ad, bd)
            go = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)

            def lr(v, a, b):
                return F.silu(v @ a) @ b

            def elas_outside(backend):   # B_up outside the op (sessions 1-3): grad_h always dense cuBLAS
                return lambda: F.silu(relu2_sparse24_matmul(lr(x, au, bu), ad, backend=backend)) @ bd

            def elas(backend):            # as ElasMLP runs it: B_up inside the op
                return lambda: F.silu(lowrank_relu2_sparse24_matmul(F.silu(x @ au), bu, ad, backend=backend)) @ bd

            def elas_dense_grad_h():
                return lambda: F.silu(lowrank_relu2_sparse24_matmul_gpu(F.silu(x @ au), bu, ad,
                                                                        grad_h="dense")) @ bd

            variants = {
                "cola SwiGLU (low-rank)": lambda: lr(F.silu(lr(x, ag, bg)) * lr(x, au, bu), ad, bd),
                "elas computed dense": lambda: lr(F.relu(lr(x, au, bu)).square(), ad, bd),
                "elas reference (torch 2:4)": elas("reference"),
                "elas GPU triton": elas("triton"),
                "elas GPU cusparselt": elas("cusparselt"),
                "elas GPU auto, B_up outside the op (before)": elas_outside("auto"),
                "elas GPU auto, grad_h forced dense": elas_dense_grad_h(),
                "elas GPU auto": elas("auto"),
                "elas GPU auto, torch._cslt_sparse_mm": ("torch", elas("auto")),
            }
            res = {}
            for label, fn in variants.items():
                if isinstance(fn, tuple):   # plans timed afresh under the other implementation, then dropped
                    impl, fn = fn
                    plan_cache().clear()
                    with cslt_impl(impl):
                        res[label] = _measure_ffn(fn, params, go, name, t, label)
                    plan_cache().clear()
                else:
                    res[label] = _measure_ffn(fn, params, go, name, t, label)
            cola = res["cola SwiGLU (low-rank)"]
            dense = res["elas computed dense"]
            for label, (fwd, fb, saved, peak) in res.items():
                rows.append([name, t, label, f"{fwd:.2f}", f"{fb:.2f}", f"{cola[1] / fb:.2f}x", f"{dense[1] / fb:.2f}x",
                             f"{saved / 2 ** 30:.2f}", f"{peak / 2 ** 30:.2f}"])
            del x, ag, bg, au, bu, ad, bd, go, params
            torch.cuda.empty_cache()
    table("Low-rank FFN, bf16 (ms; speed-up of fwd+bwd vs cola SwiGLU and vs elas computed dense; "
          "GiB saved for backward by the FFN; peak GiB over fwd+bwd)",
          ["shape", "T", "variant", "fwd", "fwd+bwd", "vs cola", "vs elas dense", "saved GiB", "peak GiB"], rows)


def _measure_ffn(fn, params, go, name, t, label):
    with torch.no_grad():
        fwd = bench(fn)
    fb = bench(_fwd_bwd(fn, params, go))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    out, saved = _saved_bytes(fn)
    out.backward(go)
    for q in params:
        q.grad = None
    del out
    peak = torch.cuda.max_memory_allocated() - base_mem
    RESULTS.setdefault("ffn", []).append({"shape": name, "T": t, "variant": label, "fwd_ms": fwd,
                                          "fwd_bwd_ms": fb, "saved_bytes": saved, "peak_bytes": peak})
    return fwd, fb, saved, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write all numbers to this file")
    ap.add_argument("--quick", action="store_true", help="T = 64k only")
    ap.add_argument("--only", default=None, help="comma list of sections to run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    tokens = (65536,) if args.quick else (32768, 65536)
    import triton
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}; triton {triton.__version__}; "
          f"cuSPARSELt {torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None}")
    RESULTS["env"] = {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
                      "argv": sys.argv}
    sections = {"ceilings": lambda: ceilings(), "tiles": lambda: tile_sweep(), "gemm_tiles": lambda: gemm_tile_sweep(),
                "fused": lambda: fused_kernels(tokens),
                "gemms": lambda: gemms(tokens), "core": lambda: core_op(tokens), "ffn": lambda: ffn(tokens),
                "sparse_bwd": lambda: sparse_backward(tokens)}
    only = args.only.split(",") if args.only else ["ceilings", "fused", "core", "ffn", "gemms", "sparse_bwd"]
    for key in only:
        sections[key]()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(RESULTS, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
