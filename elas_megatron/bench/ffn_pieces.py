# SPDX-License-Identifier: Apache-2.0
"""The pieces of the elas FFN measured alone (``elas-bench ffn --pieces ...``): what the whole-FFN rows of
:mod:`elas_megatron.bench.ffn` are made of, to see where its time goes and how far each kernel is from its bound.

Sections (:data:`PIECES`), each a table:

* ``ceilings``: device-to-device copy bandwidth (read + write) and a square GEMM's FLOP/s, measured in this run;
  the copy bandwidth is the yardstick of ``fused``.
* ``tiles`` / ``gemm_tiles``: sweeps of the Triton kernels' tile sizes at the first shape and the largest T;
  the fastest stays set for the rest of the run (the shipped defaults came from such a sweep).
* ``fused``: the fused 2:4 kernels (compress in both layouts, with the dense ``s``, the masked-gradient pass,
  decompress) against their memory-bandwidth bound, bytes read + written over the measured copy bandwidth; for
  scale, torch's dense ``relu(y1)**2`` and, at the first shape and largest T, PyTorch's own 2:4 compressors.
* ``core``: the sparse core ``z = sparse24(relu(y1)**2) @ A_down`` alone, fwd and fwd+bwd, for the reference,
  each fixed GPU variant and the autotuned backends, against plain-torch dense ``relu(y1)**2 @ W``.
* ``gemms``: the core's GEMMs one by one (cuBLAS, the fused Triton GEMMs, every cuSPARSELt configuration).
* ``sparse_bwd``: the sparse GEMMs through ``torch._cslt_sparse_mm`` and through the cached-plan binding, each
  once synchronised after every call (a call's host time shows when it exceeds its GPU time) and back to back
  (host time hidden); and the masked-gradient pass with and without the compressed ``grad_y1``.

Times are medians of synchronised calls (the ``reps`` / ``warmup`` of the FFN table). The Triton kernels need CUDA,
or ``TRITON_INTERPRET=1`` on a CPU (a smoke test: numbers mean nothing there); rows that need the fused GPU path's
autograd functions or cuSPARSELt are left out where those cannot run, and a section that fails records its error
and the run goes on.
"""
from __future__ import annotations

import logging
import traceback
from collections.abc import Callable

import torch

from elas_megatron.bench.ffn import _timer, ffn_shape
from elas_megatron.kernels import cusparselt as cslt
from elas_megatron.kernels import triton_gemm as tg
from elas_megatron.kernels import triton_sparse24 as tk
from elas_megatron.kernels.reference import relu2_sparse24_matmul_reference

logger = logging.getLogger(__name__)

__all__ = ["PIECES", "DEFAULT_PIECES", "parse_pieces", "fused_bytes", "run_pieces", "format_pieces"]

PIECES = ("ceilings", "tiles", "gemm_tiles", "fused", "core", "gemms", "sparse_bwd")
DEFAULT_PIECES = ("ceilings", "fused", "core", "gemms", "sparse_bwd")
"""What ``--pieces all`` runs (the tile sweeps change the kernels' tiles for the rest of the run: ask for them)."""

TILE_CANDIDATES = [(32, 128, 4), (16, 256, 4), (32, 256, 8), (64, 128, 8), (64, 256, 8), (128, 128, 8), (16, 128, 4)]
ELEMWISE_TILE_CANDIDATES = [(32, 128, 4), (16, 256, 4), (32, 256, 8), (64, 128, 8), (64, 256, 8)]
GEMM_TILE_CANDIDATES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3), (128, 128, 32, 4, 4)]


def parse_pieces(text: str) -> list[str]:
    """``"all"`` or a comma list of :data:`PIECES`, in the order given; unknown names are a ``ValueError``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(DEFAULT_PIECES)
    unknown = [n for n in names if n not in PIECES]
    if unknown or not names:
        raise ValueError(f"--pieces {text!r}: choose 'all' or a comma list of {', '.join(PIECES)}")
    return names


def fused_bytes(tokens: int, f: int, itemsize: int = 2) -> dict[str, int]:
    """Bytes read + written by each fused kernel on ``y1 [tokens, f]``: the dense tensor is ``tokens*f``
    elements, the compressed ``s`` 9/16 of it (half the values plus 4 bits of code per group of 4)."""
    dense = tokens * f * itemsize
    comp = tokens * f * 9 // 16 * itemsize
    return {"compress": dense + comp, "compress + dense s": 2 * dense + comp,
            "masked grad (in place) + dense s": 3 * dense + comp, "decompress": dense + comp,
            "relu(y1)**2 (torch, dense, for scale)": 2 * dense,
            "torch._sparse_semi_structured_tile (2-way)": dense + 2 * comp,
            "torch._cslt_compress (of masked s)": dense + comp}


def search_config(buffer: torch.Tensor, w: torch.Tensor, col_major: bool, transpose: bool) -> cslt.CsltConfig:
    """A cuSPARSELt configuration with the algorithm cuSPARSELt's own search picks (algorithm 0 if it fails)."""
    cfg = cslt.CsltConfig(0, col_major, transpose)
    try:
        cfg.alg_id = cslt.cslt_search_alg_id(buffer, w, cfg)
    except RuntimeError as exc:
        logger.warning("cuSPARSELt algorithm search failed for %s: %s", cfg, exc)
    return cfg


class _Run:
    """One ``--pieces`` run: device, dtype, timer, the shapes and token counts, and what the sections found."""

    def __init__(self, sizes: list[str], tokens: list[int], device: torch.device, dtype: torch.dtype,
                 reps: int, warmup: int, log: Callable[[str], None]):
        self.shapes = [(size, *ffn_shape(size)) for size in sizes]
        self.tokens, self.device, self.dtype, self.log = tokens, device, dtype, log
        self.time = _timer(device, reps, warmup)
        self.gpu = device.type == "cuda"                         # the fused path's autograd functions
        self.cslt = cslt.cusparselt_unavailable_reason(device, dtype) is None if self.gpu else False
        self.copy_tbps = 3.0                                     # until "ceilings" measures it
        self.sections: dict[str, dict] = {}

    def randn(self, *shape: int, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
        t = (torch.randn(*shape, device=self.device) * scale).to(self.dtype)
        return t.requires_grad_() if grad else t

    def table(self, name: str, title: str, columns: list[str], rows: list[list], **extra) -> None:
        self.sections[name] = {"title": title, "columns": columns, "rows": rows, **extra}
        self.log("\n" + format_pieces({name: self.sections[name]}))

    def back_to_back(self, fn: Callable[[], object], calls: int = 10) -> float:
        """Mean ms per call of ``calls`` calls issued without a sync in between (host time hidden)."""
        def run():
            for _ in range(calls):
                fn()
        return _timer(self.device, 5, 1)(run) / calls

    def cslt_layouts(self) -> list[tuple[bool, bool]]:
        """(weight column-major, transposed result) pairs to try; no transposed result where cuSPARSELt faults."""
        transposes = (False, True) if cslt.transposed_result_ok(self.dtype) else (False,)
        return [(col_major, transpose) for col_major in (False, True) for transpose in transposes]

    def best_cslt_config(self, buffer: torch.Tensor, w: torch.Tensor) -> cslt.CsltConfig:
        best = None
        for col_major, transpose in self.cslt_layouts():
            cfg = search_config(buffer, w, col_major, transpose)
            ms = self.time(lambda cfg=cfg: cslt.cslt_mm(buffer, w, cfg, impl="lib"))
            if best is None or ms < best[0]:
                best = (ms, cfg)
        return best[1]

    def free(self) -> None:
        if self.gpu:
            torch.cuda.empty_cache()


def _ceilings(run: _Run) -> None:
    n = (1 << 30) if run.gpu else (1 << 24)
    a = torch.empty(n, dtype=torch.uint8, device=run.device)
    b = torch.empty_like(a)
    run.copy_tbps = 2 * n / run.time(lambda: b.copy_(a)) / 1e9
    k = 8192 if run.gpu else 512
    x = torch.randn(k, k, device=run.device).to(run.dtype)
    tflops = 2 * k ** 3 / run.time(lambda: x @ x) / 1e9
    run.table("ceilings", "Ceilings measured in this run",
              ["device-to-device copy (TB/s, read+write)", f"GEMM {k}^3, {run.dtype} (TFLOP/s)"],
              [[run.copy_tbps, tflops]], copy_TBps=run.copy_tbps, gemm_TFLOPs=tflops)


def _tiles(run: _Run) -> None:
    _, _, f, _ = run.shapes[0]
    y = run.randn(max(run.tokens), f)
    rows, best = [], None
    for tile in TILE_CANDIDATES:
        tk.set_tiles(compress=tile)
        ms = run.time(lambda: tk.relu2_sparse24_compress(y, layout="cusparselt"))
        rows.append([f"compress {tile}", ms])
        if best is None or ms < best[0]:
            best = (ms, tile)
    tk.set_tiles(compress=best[1])
    gs = torch.randn_like(y)
    c, _ = tk.relu2_sparse24_compress(y, layout="cusparselt")
    best_e = None
    for tile in ELEMWISE_TILE_CANDIDATES:
        tk.set_tiles(elementwise=tile)
        ms = run.time(lambda: tk.relu2_sparse24_masked_grad(gs, c, write_dense=True, out=gs))
        rows.append([f"masked_grad {tile}", ms])
        if best_e is None or ms < best_e[0]:
            best_e = (ms, tile)
    tk.set_tiles(elementwise=best_e[1])
    run.table("tiles", f"Tile sweep, T={max(run.tokens)}, F={f} (ms)", ["kernel tile (rows, features, warps)", "ms"],
              rows, chosen={"compress": best[1], "elementwise": best_e[1]})


def _gemm_tiles(run: _Run) -> None:
    _, _, f, r = run.shapes[0]
    t = max(run.tokens)
    y, w, gz = run.randn(t, f), run.randn(f, r, scale=f ** -0.5), run.randn(t, r)
    c, _ = tk.relu2_sparse24_compress(y)
    kernels = {"fwd": lambda: tg.fused_forward(y, w), "grad_input": lambda: tg.fused_grad_input(gz, w, c=c),
               "grad_weight": lambda: tg.fused_grad_weight(gz, c)}
    rows, best = [], {}
    time_gemm = _timer(run.device, 10, 2)
    for name, fn in kernels.items():
        for tile in GEMM_TILE_CANDIDATES:
            tg.set_gemm_tiles(**{name: tile})
            try:
                ms = time_gemm(fn)
            except Exception as exc:  # out of shared memory / registers for this tile: skip it
                rows.append([name, str(tile), f"failed: {type(exc).__name__}"])
                continue
            rows.append([name, str(tile), ms])
            if name not in best or ms < best[name][0]:
                best[name] = (ms, tile)
        if name in best:
            tg.set_gemm_tiles(**{name: best[name][1]})
    run.table("gemm_tiles", f"Fused Triton GEMM tile sweep, T={t}, F={f}, r={r} (ms)",
              ["GEMM", "tile (BM, BN, BK, warps, stages)", "ms"], rows, chosen={k: v[1] for k, v in best.items()})


def _fused(run: _Run) -> None:
    rows = []
    for i, (size, _, f, _) in enumerate(run.shapes):
        for t in run.tokens:
            y = run.randn(t, f)
            c, s = tk.relu2_sparse24_compress(y, layout="cusparselt", write_dense=True)
            gs = torch.randn_like(y)
            nbytes = fused_bytes(t, f, y.element_size())
            cases = {
                "compress (rowmajor meta)": (lambda: tk.relu2_sparse24_compress(y), "compress"),
                "compress (cuSPARSELt layout)": (lambda: tk.relu2_sparse24_compress(y, layout="cusparselt"),
                                                 "compress"),
                "compress + dense s": (lambda: tk.relu2_sparse24_compress(y, write_dense=True), None),
                "masked grad (in place) + dense s": (
                    lambda: tk.relu2_sparse24_masked_grad(gs, c, write_dense=True, out=gs), None),
                "decompress": (lambda: tk.sparse24_decompress(c), None),
                "relu(y1)**2 (torch, dense, for scale)": (lambda: torch.relu(y).square(), None),
            }
            if i == 0 and t == max(run.tokens) and run.gpu:   # PyTorch's own compressors, for scale
                if hasattr(torch, "_sparse_semi_structured_tile"):
                    cases["torch._sparse_semi_structured_tile (2-way)"] = (
                        lambda: torch._sparse_semi_structured_tile(s, algorithm="", use_cutlass=False), None)
                if run.cslt:
                    cases["torch._cslt_compress (of masked s)"] = (lambda: torch._cslt_compress(s), None)
            for label, (fn, key) in cases.items():
                ms = run.time(fn)
                bound = nbytes[key or label] / (run.copy_tbps * 1e12) * 1e3
                rows.append([size, t, label, ms, bound, ms / bound])
            del y, c, s, gs
            run.free()
    run.table("fused", f"Fused kernels vs memory-bandwidth bound (bytes read+written / {run.copy_tbps:.3g} TB/s)",
              ["shape", "T", "kernel", "ms", "bound ms", "time/bound"], rows)


def _fwd_bwd(fn: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...],
             grad: torch.Tensor) -> Callable[[], None]:
    def run():
        fn().backward(grad)
        for p in inputs:
            p.grad = None
    return run


def _core(run: _Run) -> None:
    from elas_megatron.kernels.dispatch import relu2_sparse24_matmul

    rows, plans = [], {}
    for size, _, f, r in run.shapes:
        for t in run.tokens:
            y = run.randn(t, f, grad=True)
            w = run.randn(f, r, scale=f ** -0.5, grad=True)
            gz = run.randn(t, r)
            variants = {"dense relu(y1)**2 @ W (torch)": lambda: torch.relu(y).square() @ w,
                        "reference (torch, 2:4)": lambda: relu2_sparse24_matmul_reference(y, w)}
            if run.gpu:
                from elas_megatron.kernels.elas_core import relu2_sparse24_matmul_gpu as gpu

                variants.update({
                    "GPU: compress pass + cuBLAS GEMMs": lambda: gpu(y, w, fwd="cublas", bwd="cublas"),
                    "GPU: Triton fused GEMMs": lambda: gpu(y, w, fwd="fused", bwd="fused")})
                if run.cslt:
                    variants["GPU: cuSPARSELt fwd + fused bwd"] = lambda: gpu(y, w, fwd="cusparselt", bwd="fused")
                variants.update({
                    "backend=triton (autotuned)": lambda: relu2_sparse24_matmul(y, w, backend="triton"),
                    "backend=auto (autotuned)": lambda: relu2_sparse24_matmul(y, w, backend="auto")})
            base = None
            for label, fn in variants.items():
                with torch.no_grad():
                    fwd = run.time(fn)
                both = run.time(_fwd_bwd(fn, (y, w), gz))
                base = base or (fwd, both)
                rows.append([size, t, label, fwd, both, base[0] / fwd, base[1] / both])
            del y, w, gz
            run.free()
    if run.gpu:
        from elas_megatron.kernels.elas_core import plan_cache

        plans = {str(k[:2] + k[5:]): {"plan": repr(v), "timings_ms": dict(v.timings_ms)}
                 for k, v in plan_cache().items()}
    run.table("core", "ELAS sparse core z = sparse24(relu(y1)^2) @ A_down (ms; speed-up vs dense torch)",
              ["shape", "T", "variant", "fwd", "fwd+bwd", "fwd speed-up", "fwd+bwd speed-up"], rows, plans=plans)


def _gemms(run: _Run) -> None:
    rows = []
    for size, _, f, r in run.shapes:
        for t in run.tokens:
            y, w, gz = run.randn(t, f), run.randn(f, r, scale=f ** -0.5), run.randn(t, r)
            c, s = tk.relu2_sparse24_compress(y, layout="cusparselt", write_dense=True)
            cases = {
                "dense cuBLAS s @ W": lambda: s @ w,
                "Triton fused fwd (from y1: relu^2 + 2:4 + GEMM + compressed s)": lambda: tg.fused_forward(y, w),
                "Triton fused fwd, no compressed-s write": lambda: tg.fused_forward(y, w, save=False),
                "compress (cuSPARSELt layout) alone": lambda: tk.relu2_sparse24_compress(y, layout="cusparselt"),
            }
            if run.cslt:
                for col_major, transpose in run.cslt_layouts():
                    cfg = search_config(c.buffer, w, col_major, transpose)
                    cases[f"cuSPARSELt {cfg}"] = lambda cfg=cfg: cslt.cslt_mm(c.buffer, w, cfg)
            cases.update({
                "grad_s = grad_z @ W^T (cuBLAS)": lambda: gz @ w.t(),
                "grad_y1 = (grad_z @ W^T) * 2 sqrt(s) (Triton, fused epilogue)":
                    lambda: tg.fused_grad_input(gz, w, c=c),
                "grad_W = s^T @ grad_z (cuBLAS, dense s)": lambda: s.t() @ gz,
                "grad_W (Triton, s decoded in the GEMM)": lambda: tg.fused_grad_weight(gz, c)})
            rows += [[size, t, label, run.time(fn)] for label, fn in cases.items()]
            del y, w, gz, c, s
            run.free()
    run.table("gemms", "GEMMs of the core (ms)", ["shape", "T", "GEMM", "ms"], rows)


def _sparse_bwd(run: _Run) -> None:
    rows, configs = [], {}
    for size, _, f, r in run.shapes:
        for t in run.tokens:
            y, w = run.randn(t, f), run.randn(f, r, scale=f ** -0.5)
            up_t = run.randn(r, f, scale=r ** -0.5).t()
            c, s = tk.relu2_sparse24_compress(y, layout="cusparselt", write_dense=True)
            gs = run.randn(t, f)
            gy = torch.empty_like(gs)
            _, _, gyc = tk.relu2_sparse24_masked_grad_compressed(gs, c, out=gy)
            cases = {"fwd s @ A_down: cuBLAS (dense s)": lambda: s @ w}
            if run.cslt:
                cfg_f, cfg_h = run.best_cslt_config(c.buffer, w), run.best_cslt_config(gyc.buffer, up_t)
                configs[f"{size} {t}"] = {"fwd": repr(cfg_f), "grad_h": repr(cfg_h)}
                cases.update({
                    "fwd s @ A_down: cuSPARSELt via torch._cslt_sparse_mm":
                        lambda: cslt.cslt_mm(c.buffer, w, cfg_f, impl="torch"),
                    "fwd s @ A_down: cuSPARSELt via our binding (cached plan)":
                        lambda: cslt.cslt_mm(c.buffer, w, cfg_f, impl="lib")})
            cases["grad_h = grad_y1 @ B_up^T: cuBLAS (dense grad_y1)"] = lambda: gy @ up_t
            if run.cslt:
                cases.update({
                    "grad_h: cuSPARSELt via torch._cslt_sparse_mm":
                        lambda: cslt.cslt_mm(gyc.buffer, up_t, cfg_h, impl="torch"),
                    "grad_h: cuSPARSELt via our binding (cached plan)":
                        lambda: cslt.cslt_mm(gyc.buffer, up_t, cfg_h, impl="lib")})
            cases.update({
                "masked-grad pass (+ dense s)": lambda: tk.relu2_sparse24_masked_grad(gs, c, write_dense=True, out=gy),
                "masked-grad pass (+ dense s) + compressed grad_y1":
                    lambda: tk.relu2_sparse24_masked_grad_compressed(gs, c, write_dense=True, out=gy)})
            rows += [[size, t, label, run.time(fn), run.back_to_back(fn)] for label, fn in cases.items()]
            del y, w, up_t, c, s, gs, gy, gyc
            run.free()
    run.table("sparse_bwd", "Sparse-GEMM pieces (ms): one synchronized call / back-to-back mean",
              ["shape", "T", "piece", "synchronized", "back to back"], rows, cuSPARSELt_configs=configs)


_SECTIONS: dict[str, Callable[[_Run], None]] = {
    "ceilings": _ceilings, "tiles": _tiles, "gemm_tiles": _gemm_tiles, "fused": _fused, "core": _core,
    "gemms": _gemms, "sparse_bwd": _sparse_bwd}


def run_pieces(pieces: list[str], sizes: list[str], tokens: list[int], *, device: torch.device, dtype: torch.dtype,
               reps: int = 10, warmup: int = 3, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Run the named sections in order (``fused`` measures ``ceilings`` first when it was not asked for);
    return ``{section: {"title", "columns", "rows", ...}}``, or ``{"error": traceback}`` for a section that
    failed."""
    if not tk.HAS_TRITON:
        raise ValueError("--pieces runs the Triton kernels: install `triton`")
    run = _Run(sizes, tokens, device, dtype, reps, warmup, log)
    if "fused" in pieces and "ceilings" not in pieces[:pieces.index("fused")]:
        pieces = ["ceilings", *pieces]
    for name in pieces:
        try:
            _SECTIONS[name](run)
        except Exception:  # a benchmark keeps going and reports what failed
            logger.error("ffn pieces: section %s failed:\n%s", name, traceback.format_exc())
            run.sections[name] = {"error": traceback.format_exc()}
        run.free()
    return run.sections


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_pieces(sections: dict[str, dict]) -> str:
    """Markdown: one table per section (ratios as ``1.23x``), or the error of a failed section."""
    out = []
    for name, sec in sections.items():
        if "error" in sec:
            out.append(f"### {name}: failed\n\n```\n{sec['error'].strip()}\n```")
            continue
        lines = [f"### {sec['title']}", "", "| " + " | ".join(sec["columns"]) + " |",
                 "|" + "---|" * len(sec["columns"])]
        for row in sec["rows"]:
            cells = [f"{v:.2f}x" if isinstance(v, float) and ("speed-up" in col or col == "time/bound") else _cell(v)
                     for v, col in zip(row, sec["columns"])]
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)
