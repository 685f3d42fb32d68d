# SPDX-License-Identifier: Apache-2.0
"""The FFN on its own (issue 4): full-rank SwiGLU, cola's low-rank SwiGLU, elas computed dense and elas (the
dispatched 2:4 op, as ``ElasMLP`` calls it), side by side in one run for each model size and token count.

Per row: forward, backward (fwd+bwd minus fwd) and fwd+bwd time, the bytes autograd saves for the backward
(parameters excluded), and for elas the speed-up over elas computed dense next to its ceiling. The ceiling
counts GEMM FLOPs only: of the FFN's 12 GEMMs, 3 reduce over ``d_ff`` along the 2:4 pattern
(``s @ A_down``, ``s^T @ grad_z`` and ``grad_y1 @ B_up^T``), ``3 r d_ff`` of ``6 r (d + d_ff)`` MACs per token;
at 2x on those the fwd+bwd can be at most ``1 / (1 - 3 r d_ff / (12 r (d + d_ff)))`` faster (1.22x at 1B).
The second ceiling counts the two of them this code can run sparse (the weight gradient needs ``s^T`` 2:4
along tokens). Every elas row also reports how far its output and input gradient are from the reference op's
on the same weights (relative max-abs difference).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from elas_megatron.config.loader import load_yaml_tree
from elas_megatron.kernels.dispatch import lowrank_relu2_sparse24_matmul

__all__ = ["ffn_shape", "ceilings", "run_ffn_bench", "format_rows", "VARIANTS"]

VARIANTS = ("dense SwiGLU", "cola SwiGLU", "elas computed dense", "elas")


def ffn_shape(size: str, config_dir: Path = Path("configs")) -> tuple[int, int, int]:
    """``(hidden, d_ff, rank)`` of ``<config_dir>/model/<size>.yaml`` (run from the repository root)."""
    path = config_dir / "model" / f"{size}.yaml"
    if not path.exists():
        choices = sorted(p.stem for p in (config_dir / "model").glob("*.yaml"))
        raise ValueError(f"no model config {path}; choose --sizes from {choices} (run from the repository root)")
    m = load_yaml_tree(path)["model"]
    return int(m["hidden_size"]), int(m["ffn_hidden_size"]), int(m["rank"])


def ceilings(d: int, f: int, r: int) -> tuple[float, float]:
    """fwd+bwd speed-up bounds over elas computed dense: 3 (all) / 2 (those run sparse here) GEMMs at 2x."""
    total = 6 * r * (d + f)           # MACs per token, fwd + bwd (3 GEMMs per linear map, 4 maps)
    return total / (total - 1.5 * r * f), total / (total - 1.0 * r * f)


def _timer(device: torch.device, reps: int, warmup: int) -> Callable[[Callable[[], object]], float]:
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


def _variants(x: torch.Tensor, p: dict[str, torch.Tensor], backend: str) -> dict[str, Callable[[], torch.Tensor]]:
    def lowrank(v, a, b):
        return F.silu(v @ a) @ b

    return {
        "dense SwiGLU": lambda: (F.silu(x @ p["wg"]) * (x @ p["wu"])) @ p["wd"],
        "cola SwiGLU": lambda: lowrank(F.silu(lowrank(x, p["ag"], p["bg"])) * lowrank(x, p["au"], p["bu"]),
                                       p["ad"], p["bd"]),
        "elas computed dense": lambda: lowrank(torch.relu(lowrank(x, p["au"], p["bu"])).square(), p["ad"], p["bd"]),
        "elas": lambda: F.silu(lowrank_relu2_sparse24_matmul(F.silu(x @ p["au"]), p["bu"], p["ad"],
                                                             backend=backend)) @ p["bd"],
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


def _agreement(x: torch.Tensor, p: dict[str, torch.Tensor], backend: str, grad: torch.Tensor) -> float:
    """Relative max-abs difference of elas's output and input gradient from the reference op's."""
    worst = 0.0
    results = []
    for b in (backend, "reference"):
        xi = x.detach().clone().requires_grad_()
        out = _variants(xi, p, b)["elas"]()
        (gx,) = torch.autograd.grad(out, xi, grad)
        results.append((out.detach().float(), gx.float()))
    for got, want in zip(*results):
        worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp_min(1e-30)))
    return worst


def run_ffn_bench(sizes: list[str], tokens: list[int], *, device: torch.device, dtype: torch.dtype,
                  backend: str = "auto", reps: int = 10, warmup: int = 3,
                  log: Callable[[str], None] = print) -> list[dict]:
    """One row per (size, T, variant); see the module docstring."""
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
            res = {}
            for name, fn in _variants(x, p, backend).items():
                with torch.no_grad():
                    fwd = timer(fn)

                def fwd_bwd(fn=fn):
                    fn().backward(grad)
                    for q in params:
                        q.grad = None

                both = timer(fwd_bwd)
                res[name] = {"size": size, "hidden": d, "ffn_hidden": f, "rank": r, "tokens": t, "variant": name,
                             "fwd_ms": fwd, "bwd_ms": both - fwd, "fwd_bwd_ms": both,
                             "saved_bytes": _saved_bytes(fn, params)}
            elas, base, cola = res["elas"], res["elas computed dense"], res["cola SwiGLU"]
            elas.update(vs_elas_dense=base["fwd_bwd_ms"] / elas["fwd_bwd_ms"],
                        vs_cola=cola["fwd_bwd_ms"] / elas["fwd_bwd_ms"],
                        saved_vs_elas_dense=elas["saved_bytes"] / base["saved_bytes"],
                        ceiling_3_sparse=ceil_all, ceiling_2_sparse=ceil_used,
                        rel_diff_vs_reference=_agreement(x, p, backend, grad))
            rows += res.values()
            log(format_rows(list(res.values()), header=not rows[:-len(res)]))
            del x, grad, p, params
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def format_rows(rows: list[dict], header: bool = True) -> str:
    """Markdown table rows (with the header when ``header``)."""
    lines = []
    if header:
        lines += ["| size | T | variant | fwd ms | bwd ms | fwd+bwd ms | saved MiB | elas vs elas dense "
                  "(ceiling 3 / 2 sparse GEMMs) | elas vs cola | saved vs elas dense | rel. diff vs reference |",
                  "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for row in rows:
        extra = ["", "", "", ""]
        if row["variant"] == "elas":
            extra = [f"{row['vs_elas_dense']:.2f}x ({row['ceiling_3_sparse']:.2f}x / {row['ceiling_2_sparse']:.2f}x)",
                     f"{row['vs_cola']:.2f}x", f"{row['saved_vs_elas_dense']:.3f}",
                     f"{row['rel_diff_vs_reference']:.1e}"]
        lines.append(f"| {row['size']} | {row['tokens']} | {row['variant']} | {row['fwd_ms']:.3f} | "
                     f"{row['bwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f} | {row['saved_bytes'] / 2 ** 20:.1f} | "
                     + " | ".join(extra) + " |")
    return "\n".join(lines)
