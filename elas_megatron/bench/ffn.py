# SPDX-License-Identifier: Apache-2.0
"""The FFN on its own: full-rank SwiGLU, cola's low-rank SwiGLU, elas computed dense and elas (the dispatched
2:4 op, as ``ElasMLP`` calls it), side by side in one run for each model size and token count.

Per row: forward, backward (fwd+bwd minus fwd) and fwd+bwd time, the bytes autograd saves for the backward
(parameters and input excluded), on CUDA the peak memory of one fwd+bwd above what was allocated before it, and
for elas the speed-up over elas computed dense next to its ceiling. The ceiling counts GEMM FLOPs only: of the
FFN's 12 GEMMs, 3 reduce over ``d_ff`` along the 2:4 pattern (``s @ A_down``, ``s^T @ grad_z`` and
``grad_y1 @ B_up^T``), ``3 r d_ff`` of ``6 r (d + d_ff)`` MACs per token; at 2x on those the fwd+bwd can be at
most ``1 / (1 - 3 r d_ff / (12 r (d + d_ff)))`` faster (1.22x at d 2048, d_ff 5632, r 512). The second ceiling
counts the two of them this code can run sparse (the weight gradient needs ``s^T`` 2:4 along tokens). Every elas
row also reports how far its output and input gradient are from the reference op's on the same weights
(relative max-abs difference).

``compare`` adds more elas rows (:data:`COMPARE`): other kernel backends, the up-projection's ``B_up`` outside
the op (``grad_h`` then always dense), ``grad_h`` forced onto cuBLAS, and cuSPARSELt through
``torch._cslt_sparse_mm`` instead of the cached-plan binding. The pieces of the elas core measured alone
(kernels against their memory-bandwidth bound, the core op, the GEMMs, tile sweeps) are in
:mod:`elas_megatron.bench.ffn_pieces`.
"""
from __future__ import annotations

import contextlib
import os
import re
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from elas_megatron.config.loader import load_yaml_tree
from elas_megatron.kernels.dispatch import lowrank_relu2_sparse24_matmul, relu2_sparse24_matmul

__all__ = ["ffn_shape", "ceilings", "run_ffn_bench", "format_rows", "VARIANTS", "COMPARE", "check_compare"]

VARIANTS = ("dense SwiGLU", "cola SwiGLU", "elas computed dense", "elas")

COMPARE = {
    "reference": "elas, backend reference",
    "triton": "elas, backend triton",
    "cusparselt": "elas, backend cusparselt",
    "auto": "elas, backend auto",
    "outside": "elas, B_up outside the op",
    "dense-grad-h": "elas, grad_h on cuBLAS",
    "torch-cslt": "elas, torch._cslt_sparse_mm",
}
"""``--compare`` names and their row labels. ``outside`` is ``relu2_sparse24_matmul(h @ B_up, A_down)`` with
``--backend``: ``B_up`` outside the op, so ``grad_h`` is always a dense GEMM. ``dense-grad-h`` is the GPU path
(auto plan) with ``grad_h`` pinned to cuBLAS; ``torch-cslt`` is ``--backend`` with every cuSPARSELt GEMM through
``torch._cslt_sparse_mm`` (plans timed afresh for that row and dropped after it)."""

_CUDA_ONLY = ("triton", "cusparselt", "dense-grad-h", "torch-cslt")
_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)$")


def ffn_shape(size: str, config_dir: Path = Path("configs")) -> tuple[int, int, int]:
    """``(hidden, d_ff, rank)`` of ``<config_dir>/model/<size>.yaml`` (run from the repository root), or of an
    explicit ``HIDDENxDFFxRANK`` such as ``2048x5632x512``."""
    explicit = _SHAPE.match(size)
    if explicit:
        d, f, r = (int(v) for v in explicit.groups())
        if min(d, f, r) < 1 or f % 4:
            raise ValueError(f"shape {size!r}: hidden, d_ff and rank must be positive and d_ff a multiple of 4 "
                             f"(2:4 groups)")
        return d, f, r
    path = config_dir / "model" / f"{size}.yaml"
    if not path.exists():
        choices = sorted(p.stem for p in (config_dir / "model").glob("*.yaml"))
        raise ValueError(f"no model config {path}; choose --sizes from {choices} or give HIDDENxDFFxRANK "
                         f"(run from the repository root)")
    m = load_yaml_tree(path)["model"]
    return int(m["hidden_size"]), int(m["ffn_hidden_size"]), int(m["rank"])


def check_compare(names: list[str], device: torch.device) -> None:
    """Raise ``ValueError`` naming the problem when a ``--compare`` name is unknown or cannot run on ``device``."""
    for name in names:
        if name not in COMPARE:
            raise ValueError(f"--compare {name!r} is unknown; choose from {', '.join(COMPARE)}")
        if name in _CUDA_ONLY and device.type != "cuda":
            raise ValueError(f"--compare {name} runs the fused GPU path and needs CUDA; leave it out on {device}")


def ceilings(d: int, f: int, r: int) -> tuple[float, float]:
    """fwd+bwd speed-up bounds over elas computed dense: 3 (all) / 2 (those run sparse here) GEMMs at 2x."""
    total = 6 * r * (d + f)           # MACs per token, fwd + bwd (3 GEMMs per linear map, 4 maps)
    return total / (total - 1.5 * r * f), total / (total - 1.0 * r * f)


def _timer(device: torch.device, reps: int, warmup: int) -> Callable[[Callable[[], object]], float]:
    """Median ms of ``reps`` calls after ``warmup`` calls, the device synchronised after each call."""
    def run(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return run


@contextlib.contextmanager
def cusparselt_impl(impl: str) -> Iterator[None]:
    """Every cuSPARSELt GEMM through ``impl`` ("lib": cached plans, "torch": ``torch._cslt_sparse_mm``), with the
    ELAS plans timed afresh inside and dropped after (a plan timed under one implementation is not the other's)."""
    from elas_megatron.kernels import cusparselt as cslt
    from elas_megatron.kernels.elas_core import clear_plan_cache

    old = os.environ.get(cslt.IMPL_ENV)
    os.environ[cslt.IMPL_ENV] = impl
    clear_plan_cache()
    try:
        yield
    finally:
        clear_plan_cache()
        if old is None:
            os.environ.pop(cslt.IMPL_ENV, None)
        else:
            os.environ[cslt.IMPL_ENV] = old


def _lowrank(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(v @ a) @ b


def _elas(x: torch.Tensor, p: dict[str, torch.Tensor], backend: str, kind: str = "elas") -> Callable[[], torch.Tensor]:
    """The elas FFN as ``ElasMLP`` runs it (``kind`` "elas"), or one of the :data:`COMPARE` forms of it."""
    if kind == "outside":
        return lambda: F.silu(relu2_sparse24_matmul(_lowrank(x, p["au"], p["bu"]), p["ad"], backend=backend)) @ p["bd"]
    if kind == "dense-grad-h":
        from elas_megatron.kernels.elas_core import lowrank_relu2_sparse24_matmul_gpu

        return lambda: F.silu(lowrank_relu2_sparse24_matmul_gpu(F.silu(x @ p["au"]), p["bu"], p["ad"],
                                                                grad_h="dense")) @ p["bd"]
    if kind in ("reference", "triton", "cusparselt", "auto"):
        backend = kind
    return lambda: F.silu(lowrank_relu2_sparse24_matmul(F.silu(x @ p["au"]), p["bu"], p["ad"],
                                                        backend=backend)) @ p["bd"]


def _variants(x: torch.Tensor, p: dict[str, torch.Tensor], backend: str) -> dict[str, Callable[[], torch.Tensor]]:
    return {
        "dense SwiGLU": lambda: (F.silu(x @ p["wg"]) * (x @ p["wu"])) @ p["wd"],
        "cola SwiGLU": lambda: _lowrank(F.silu(_lowrank(x, p["ag"], p["bg"])) * _lowrank(x, p["au"], p["bu"]),
                                        p["ad"], p["bd"]),
        "elas computed dense": lambda: _lowrank(torch.relu(_lowrank(x, p["au"], p["bu"])).square(), p["ad"], p["bd"]),
        "elas": _elas(x, p, backend),
    }


def _saved_bytes(fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> int:
    skip = {t.data_ptr() for t in params}
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in skip:
            seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _peak_bytes(fn_bwd: Callable[[], None], device: torch.device) -> int | None:
    """Peak bytes allocated during one fwd+bwd above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn_bwd()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _agreement(make: Callable[[torch.Tensor], Callable[[], torch.Tensor]], x: torch.Tensor,
               p: dict[str, torch.Tensor], grad: torch.Tensor) -> float:
    """Relative max-abs difference of an elas form's output and input gradient from the reference op's."""
    worst = 0.0
    results = []
    for build in (make, lambda xi: _elas(xi, p, "reference")):
        xi = x.detach().clone().requires_grad_()
        out = build(xi)()
        (gx,) = torch.autograd.grad(out, xi, grad)
        results.append((out.detach().float(), gx.float()))
    for got, want in zip(*results):
        worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp_min(1e-30)))
    return worst


def run_ffn_bench(sizes: list[str], tokens: list[int], *, device: torch.device, dtype: torch.dtype,
                  backend: str = "auto", reps: int = 10, warmup: int = 3, compare: tuple[str, ...] = (),
                  log: Callable[[str], None] = print) -> list[dict]:
    """One row per (size, T, variant), the :data:`COMPARE` rows after the four variants; see the module
    docstring."""
    check_compare(list(compare), device)
    timer = _timer(device, reps, warmup)
    rows: list[dict] = []
    for size in sizes:
        d, f, r = ffn_shape(size)
        ceil_all, ceil_used = ceilings(d, f, r)
        for t in tokens:
            g = torch.Generator(device=device).manual_seed(0)

            def param(*shape):
                w = torch.randn(*shape, device=device, generator=g) / shape[0] ** 0.5
                return w.to(dtype).requires_grad_()

            p = {"wg": param(d, f), "wu": param(d, f), "wd": param(f, d), "ag": param(d, r), "bg": param(r, f),
                 "au": param(d, r), "bu": param(r, f), "ad": param(f, r), "bd": param(r, d)}
            x = torch.randn(t, d, device=device, generator=g).to(dtype).requires_grad_()
            grad = torch.randn(t, d, device=device, generator=g).to(dtype)
            params = [x, *p.values()]
            forms: dict[str, tuple[Callable[[], torch.Tensor], str | None]] = {
                name: (fn, None) for name, fn in _variants(x, p, backend).items()}
            forms.update({COMPARE[kind]: (_elas(x, p, backend, kind), kind) for kind in compare})
            res = {}
            for name, (fn, kind) in forms.items():
                scope = cusparselt_impl("torch") if kind == "torch-cslt" else contextlib.nullcontext()
                with scope:
                    with torch.no_grad():
                        fwd = timer(fn)

                    def fwd_bwd(fn=fn):
                        fn().backward(grad)
                        for q in params:
                            q.grad = None

                    both = timer(fwd_bwd)
                    row = {"size": size, "hidden": d, "ffn_hidden": f, "rank": r, "tokens": t, "variant": name,
                           "fwd_ms": fwd, "bwd_ms": both - fwd, "fwd_bwd_ms": both,
                           "saved_bytes": _saved_bytes(fn, params), "peak_bytes": _peak_bytes(fwd_bwd, device)}
                    if name == "elas" or kind is not None:
                        row["rel_diff_vs_reference"] = _agreement(
                            lambda xi, kind=kind: _elas(xi, p, backend, kind or "elas"), x, p, grad)
                res[name] = row
            base, cola = res["elas computed dense"], res["cola SwiGLU"]
            for name, row in res.items():
                if "rel_diff_vs_reference" in row:
                    row.update(vs_elas_dense=base["fwd_bwd_ms"] / row["fwd_bwd_ms"],
                               vs_cola=cola["fwd_bwd_ms"] / row["fwd_bwd_ms"],
                               saved_vs_elas_dense=row["saved_bytes"] / base["saved_bytes"],
                               ceiling_3_sparse=ceil_all, ceiling_2_sparse=ceil_used)
            rows += res.values()
            log(format_rows(list(res.values()), header=not rows[:-len(res)]))
            del x, grad, p, params, forms
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def format_rows(rows: list[dict], header: bool = True) -> str:
    """Markdown table rows (with the header when ``header``)."""
    lines = []
    if header:
        lines += ["| size | T | variant | fwd ms | bwd ms | fwd+bwd ms | saved MiB | peak MiB | elas vs elas dense "
                  "(ceiling 3 / 2 sparse GEMMs) | elas vs cola | saved vs elas dense | rel. diff vs reference |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for row in rows:
        extra = ["", "", "", ""]
        if "vs_elas_dense" in row:
            extra = [f"{row['vs_elas_dense']:.2f}x ({row['ceiling_3_sparse']:.2f}x / {row['ceiling_2_sparse']:.2f}x)",
                     f"{row['vs_cola']:.2f}x", f"{row['saved_vs_elas_dense']:.3f}",
                     f"{row['rel_diff_vs_reference']:.1e}"]
        peak = "-" if row.get("peak_bytes") is None else f"{row['peak_bytes'] / 2 ** 20:.1f}"
        lines.append(f"| {row['size']} | {row['tokens']} | {row['variant']} | {row['fwd_ms']:.3f} | "
                     f"{row['bwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f} | {row['saved_bytes'] / 2 ** 20:.1f} | {peak} | "
                     + " | ".join(extra) + " |")
    return "\n".join(lines)
