# SPDX-License-Identifier: Apache-2.0
"""Kernel-level profile of one training step per variant: where the GPU time goes, by kernel family and by op.

    python benchmarks/profile_step.py configs/model/1b.yaml --variants dense,cola,elas --micro-batch 40 [k=v ...]

Builds each variant like ``elas-bench throughput`` does (random tokens, weights drawn on the device), runs warm-up
steps, then ``torch.profiler`` over ``--steps`` steps, and prints per variant: the step's wall time, the summed
kernel time (their ratio is how busy the GPU was: well under 1 means the host launches too slowly), the kernel
time by family (GEMM, sparse GEMM, attention, Triton, element-wise, reductions, copies, optimizer, NCCL, other),
the top kernels and the top aten ops by device time. ``--json`` writes all of it.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

FAMILIES = (
    ("sparse_gemm", re.compile(r"cusparselt|sm90_xmma_sparse|_sp_|sparse_gemm", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|sm90_|ampere_|cublas|splitk", re.I)),
    ("triton", re.compile(r"^triton|_kernel$|_kernel_", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|cat|transpose|index|gather|scatter", re.I)),
    ("reduce", re.compile(r"reduce|norm|softmax|cross_entropy|nll|logsumexp", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|pointwise|silu|mul|add", re.I)),
    ("nccl", re.compile(r"nccl", re.I)),
)


def family(name: str) -> str:
    for fam, pattern in FAMILIES:
        if pattern.search(name):
            return fam
    return "other"


def profile_variant(configs: list[str], overrides: list[str], variant: str, micro_batch: int, seq_len: int,
                    warmup: int, steps: int) -> dict:
    from elas_megatron.bench.throughput import RandomTokens, WorkerSpec, _load_config
    from elas_megatron.parallel.setup import destroy_parallel, resolve_device
    from elas_megatron.training.trainer import Trainer

    spec = WorkerSpec(configs=configs, overrides=overrides, variant=variant, mode="train", seq_len=seq_len,
                      micro_batches=[micro_batch], run_dir=f"runs/profile/{variant}")
    cfg = _load_config(spec, micro_batch)
    device = resolve_device(cfg.train.device)
    data = RandomTokens(seq_len=seq_len, vocab_size=cfg.model.vocab_size, seed=0)
    trainer = Trainer(cfg, datasets=(data, data), weight_init="fast")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        for _ in range(warmup):
            trainer.train_step()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        sync()
        wall_ms = (time.perf_counter() - start) / steps * 1e3
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(steps):
                trainer.train_step()
            sync()
        kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                k = kernels[evt.name]
                k[0] += evt.device_time / 1e3 / steps  # ms per step
                k[1] += 1 / steps
        ops = []
        for avg in prof.key_averages():
            if avg.self_device_time_total > 0 and avg.key.startswith("aten::"):
                ops.append((avg.key, avg.self_device_time_total / 1e3 / steps, avg.count / steps))
        ops.sort(key=lambda x: -x[1])
        fam: dict[str, float] = defaultdict(float)
        for name, (ms, _) in kernels.items():
            fam[family(name)] += ms
        busy = sum(fam.values())
        top = sorted(((n, ms, c) for n, (ms, c) in kernels.items()), key=lambda x: -x[1])[:40]
        tokens = micro_batch * seq_len
        return {"variant": variant, "micro_batch": micro_batch, "wall_ms": wall_ms, "busy_ms": busy,
                "tokens_per_s": tokens / wall_ms * 1e3, "families_ms": dict(sorted(fam.items(), key=lambda x: -x[1])),
                "top_kernels": [{"name": n[:160], "ms": ms, "calls": c} for n, ms, c in top],
                "top_ops": [{"op": n, "ms": ms, "calls": c} for n, ms, c in ops[:30]]}
    finally:
        trainer.backend.close()
        del trainer
        destroy_parallel()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def print_report(r: dict) -> None:
    print(f"\n=== {r['variant']} mb {r['micro_batch']}: step {r['wall_ms']:.1f} ms, kernels {r['busy_ms']:.1f} ms "
          f"(GPU busy {r['busy_ms'] / r['wall_ms']:.0%}), {r['tokens_per_s']:,.0f} tok/s")
    print("  by family: " + ", ".join(f"{k} {v:.1f}" for k, v in r["families_ms"].items()))
    print("  top kernels (ms/step, calls/step):")
    for k in r["top_kernels"][:25]:
        print(f"    {k['ms']:7.2f} {k['calls']:6.0f}  [{family(k['name'])}] {k['name'][:110]}")
    print("  top aten ops by self device time:")
    for o in r["top_ops"][:20]:
        print(f"    {o['ms']:7.2f} {o['calls']:6.0f}  {o['op']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("args", nargs="*", metavar="CONFIG.yaml | section.key=value")
    parser.add_argument("--variants", default="dense,cola,elas")
    parser.add_argument("--micro-batch", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    configs = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    results = []
    for variant in args.variants.split(","):
        r = profile_variant(configs, overrides, variant, args.micro_batch, args.seq_len, args.warmup, args.steps)
        print_report(r)
        results.append(r)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
