# SPDX-License-Identifier: Apache-2.0
"""Candidate fusions for the low-rank transformer measured alone at the 1B shape (fwd+bwd, bf16, one GPU).

    python benchmarks/probe_fusions.py [--tokens 40960]

Each line times a plain path and its candidate replacement side by side (median of CUDA-event timings): the
output layer + cross-entropy (megatron's bf16 logits -> fp32 vocab-parallel CE vs Liger-Kernel's fused linear
cross-entropy), RMSNorm and residual add + RMSNorm (torch vs Liger), a low-rank ``silu(x A) B`` eager vs
``torch.compile``, and the three ``B`` products of a low-rank q/k/v with and without the concatenation into
megatron's fused layout. Used to choose which maintained kernels to adopt before writing any.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def bench(fn, reps: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def line(name: str, base: float, cand: float) -> None:
    print(f"{name:58s} plain {base:8.3f} ms  candidate {cand:8.3f} ms  ({base / cand:4.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=40960)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=512)
    args = parser.parse_args()
    T, h, V, r = args.tokens, args.hidden, args.vocab, args.rank
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)

    # ---- output layer + cross-entropy
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy  # noqa: F401
    x = torch.randn(T, h, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(V, h, device=dev, dtype=dt) * 0.02).requires_grad_()
    target = torch.randint(0, V, (T,), device=dev)

    def ce_plain():
        logits = x @ w.t()
        loss = F.cross_entropy(logits.float(), target)  # megatron: fp32 logits, then the vocab-parallel CE
        loss.backward()

    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def ce_liger():
            loss = liger_fused_linear_cross_entropy(x, w, target)
            loss.backward()

        l1 = F.cross_entropy((x @ w.t()).float(), target)
        l2 = liger_fused_linear_cross_entropy(x, w, target)
        print(f"CE agreement: plain {l1.item():.6f} liger {l2.item():.6f}")
        torch.cuda.reset_peak_memory_stats()
        base = bench(ce_plain)
        m1 = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        cand = bench(ce_liger)
        m2 = torch.cuda.max_memory_allocated() / 2**30
        line(f"output layer + CE fwd+bwd (peak {m1:.1f} vs {m2:.1f} GiB)", base, cand)
    except ImportError as exc:
        print(f"liger not importable: {exc}")

    # ---- RMSNorm and residual + RMSNorm
    a = torch.randn(T, h, device=dev, dtype=dt, requires_grad=True)
    res = torch.randn(T, h, device=dev, dtype=dt, requires_grad=True)
    g = torch.ones(h, device=dev, dtype=dt, requires_grad=True)
    go = torch.randn(T, h, device=dev, dtype=dt)

    def norm_plain():
        F.rms_norm(a, (h,), g, 1e-5).backward(go)

    def add_norm_plain():
        s = a + res
        (F.rms_norm(s, (h,), g, 1e-5) + s).backward(go)

    try:
        from liger_kernel.transformers.functional import liger_fused_add_rms_norm, liger_rms_norm

        line("RMSNorm fwd+bwd (torch F.rms_norm vs liger)", bench(norm_plain),
             bench(lambda: liger_rms_norm(a, g, 1e-5, in_place=False).backward(go)))

        def add_norm_liger():
            y, s = liger_fused_add_rms_norm(a, res, g, 1e-5, in_place=False)
            (y + s).backward(go)

        line("residual add + RMSNorm fwd+bwd (torch vs liger)", bench(add_norm_plain), bench(add_norm_liger))
    except ImportError as exc:
        print(f"liger not importable: {exc}")
    compiled_norm = torch.compile(lambda t: F.rms_norm(t, (h,), g, 1e-5))
    line("RMSNorm fwd+bwd (torch vs torch.compile)", bench(norm_plain),
         bench(lambda: compiled_norm(a).backward(go)))

    # ---- low-rank silu(x A) B
    A = (torch.randn(h, r, device=dev, dtype=dt) * 0.02).requires_grad_()
    B = (torch.randn(r, h, device=dev, dtype=dt) * 0.02).requires_grad_()

    def lowrank(t):
        return F.silu(t @ A) @ B

    compiled_lowrank = torch.compile(lowrank)
    line("low-rank silu(xA)B fwd+bwd (eager vs torch.compile)", bench(lambda: lowrank(a).backward(go)),
         bench(lambda: compiled_lowrank(a).backward(go)))
    gemm_only = bench(lambda: (a @ A) @ B)
    line("low-rank fwd only: GEMMs alone vs with silu", gemm_only, bench(lambda: lowrank(a)))

    # ---- q/k/v B factors: three products + cat into the fused layout vs three products alone
    hs = torch.randn(T, 3 * r, device=dev, dtype=dt, requires_grad=True)
    Bs = [(torch.randn(r, h, device=dev, dtype=dt) * 0.02).requires_grad_() for _ in range(3)]
    heads, hd = 32, h // 32
    gqkv = torch.randn(T, 3 * h, device=dev, dtype=dt)

    def qkv_cat():
        outs = [hp @ bp for hp, bp in zip(hs.split(r, -1), Bs)]
        q, k, v = (o.view(T, heads, -1) for o in outs)
        torch.cat([q, k, v], -1).view(T, -1).backward(gqkv)

    def qkv_separate():
        outs = [hp @ bp for hp, bp in zip(hs.split(r, -1), Bs)]
        torch.autograd.backward(outs, list(gqkv.split(h, -1)))

    line("q/k/v B products fwd+bwd (with cat vs separate)", bench(qkv_cat), bench(qkv_separate))
    # ---- element-wise bandwidth reference
    big = torch.randn(T, 3 * h, device=dev, dtype=dt)
    ms = bench(lambda: big.clone())
    print(f"copy of [T, 3h] bf16: {ms:.3f} ms = {2 * big.numel() * 2 / ms / 1e9:.0f} GB/s")


if __name__ == "__main__":
    main()
