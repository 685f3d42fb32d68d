# SPDX-License-Identifier: Apache-2.0
"""Optimizer backends x activation checkpointing on one GPU: loss agreement, tokens/s and peak memory.

Runs dense / cola / elas at the 350M size with ``parallel.optimizer=megatron`` and ``deepspeed`` (ZeRO-1), each
with and without activation recomputation, for ``--steps`` steps of the same synthetic global batches from the
same initial weights, and prints a Markdown table. Every configuration runs in its own subprocess, so peak
memory is that configuration's alone. The reference row of each variant is megatron without recomputation;
``max |dloss|`` is the largest per-step loss difference to it (bf16 on GPU: expect ~1e-2 between backends,
which accumulate gradients in different precisions and orders; recomputation alone should stay ~1e-3).

    python benchmarks/parallel_backends.py                        # 350M, bf16, on the current GPU
    python benchmarks/parallel_backends.py --tiny                 # seconds on a CPU: checks that it runs
    python benchmarks/parallel_backends.py --variants elas --recompute none,full,ffn --steps 30

``--tiny`` is a 2-layer model in fp32 on CPU (megatron's CPU path, gloo); its numbers mean nothing beyond
"every configuration trains and the backends agree".
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time

from elas_megatron.data.synthetic import SyntheticTokens

SIZES = {
    # LLaMA-350M as in the CoLA paper (arXiv 2502.10940, Table 1): d=1024, 24 layers, 16 heads, r=256.
    "350m": ["model.hidden_size=1024", "model.num_layers=24", "model.num_heads=16", "model.ffn_hidden_size=2736",
             "model.rank=256", "model.vocab_size=32000", "train.seq_len=1024", "train.global_batch=32",
             "train.micro_batch=8"],
    "tiny": ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.ffn_hidden_size=128",
             "model.rank=16", "model.vocab_size=256", "train.seq_len=32", "train.global_batch=8",
             "train.micro_batch=2", "train.device=cpu", "train.dtype=fp32"],
}
BACKENDS = {"megatron": ["parallel.optimizer=megatron"], "deepspeed": ["parallel.optimizer=deepspeed"]}


def _value(overrides: list[str], key: str) -> int:
    return int([o for o in overrides if o.startswith(key + "=")][-1].split("=", 1)[1])


def run_worker(spec: dict) -> dict:
    """Train one configuration in this process and return its measurements."""
    import torch

    from elas_megatron.config.loader import load_config
    from elas_megatron.parallel.setup import destroy_parallel
    from elas_megatron.training.trainer import Trainer

    overrides = spec["overrides"]
    cfg = load_config(None, overrides, world_size=1)
    t = cfg.train
    data = SyntheticTokens(num_samples=t.steps * t.global_batch + 64, seq_len=t.seq_len,
                           vocab_size=cfg.model.vocab_size)
    trainer = Trainer(cfg, datasets=(data, data))
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for _ in range(t.steps):
        start = time.perf_counter()
        loss, _ = trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss)
    timed = times[spec["warmup_steps"]:] or times
    result = {"losses": losses, "tokens_per_s": t.global_batch * t.seq_len / statistics.median(timed),
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "bf16": trainer.bf16}
    trainer.backend.close()
    destroy_parallel()
    return result


def _launch(spec: dict, timeout_s: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT "):])


def _table(rows: list[dict]) -> str:
    out = ["| variant | backend | recompute | final loss | max \\|dloss\\| vs megatron/none | tokens/s | "
           "peak mem (GiB) |", "|---|---|---|---:|---:|---:|---:|"]
    refs = {r["variant"]: r for r in rows if r["backend"] == "megatron" and r["recompute"] == "none"
            and "error" not in r}
    for r in rows:
        head = f"| {r['variant']} | {r['backend']} | {r['recompute']} |"
        if "error" in r:
            out.append(f"{head} failed: {r['error'][:200]} | | | |")
            continue
        ref = refs.get(r["variant"])
        # without its megatron/none row in the same run there is nothing to compare with
        delta = (f"{max(abs(a - b) for a, b in zip(r['losses'], ref['losses'])):.2e}" if ref
                 else "n/a (no megatron/none row in this run)")
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "n/a"
        out.append(f"{head} {r['losses'][-1]:.4f} | {delta} | {r['tokens_per_s']:,.0f} | {mem} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer fp32 model on CPU (smoke test)")
    parser.add_argument("--variants", default="dense,cola,elas")
    parser.add_argument("--backends", default="megatron,deepspeed")
    parser.add_argument("--recompute", default="none,full", help="comma list of parallel.recompute values")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 20; --tiny: 4)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="steps left out of tokens/s (default 5)")
    parser.add_argument("--zero-stage", type=int, default=1, choices=[1, 2], help="DeepSpeed ZeRO stage")
    parser.add_argument("--timeout-s", type=int, default=1800, help="per configuration")
    parser.add_argument("--json", help="also write all measurements to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        logging.basicConfig(level=logging.WARNING)
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("parallel_backends")
    steps = args.steps or (4 if args.tiny else 20)
    warmup = args.warmup_steps if args.warmup_steps is not None else (1 if args.tiny else 5)
    size = SIZES["tiny" if args.tiny else "350m"]
    common = size + [f"train.steps={steps}", "optim.lr=1e-3", "optim.warmup_steps=2", "train.seed=1234",
                     "checkpoint.save_final=false", "log.level=warning"]
    rows = []
    for variant in args.variants.split(","):
        for backend in args.backends.split(","):
            for recompute in args.recompute.split(","):
                run_dir = f"runs/bench_parallel_backends/{variant}_{backend}_{recompute}"
                zero = [f"parallel.zero_stage={args.zero_stage}"] if backend == "deepspeed" else []
                spec = {"overrides": common + BACKENDS[backend] + zero + [f"model.variant={variant}",
                                                                   f"parallel.recompute={recompute}",
                                                                   f"train.run_dir={run_dir}"],
                        "warmup_steps": warmup}
                start = time.perf_counter()
                row = {"variant": variant, "backend": backend, "recompute": recompute, **_launch(spec, args.timeout_s)}
                log.info("%s/%s/%s: %s (%.0f s)", variant, backend, recompute,
                         row.get("error") or f"final loss {row['losses'][-1]:.4f}, {row['tokens_per_s']:,.0f} tok/s",
                         time.perf_counter() - start)
                rows.append(row)
    device = next((r["device"] for r in rows if "device" in r), "?")
    tokens = _value(size, "train.global_batch") * _value(size, "train.seq_len")
    print(f"\n{'tiny' if args.tiny else '350M'} on {device}, {steps} steps of {tokens} tokens "
          f"(tokens/s: median step after {warmup} warm-up steps)\n")
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
