"""Cost of the checkpoint manifest (sha256 of every file) on a checkpoint of a 1B model's size.

Writes a checkpoint with the trainer's writer (``CheckpointManager.save``: megatron dist_checkpointing, fsync,
rename, ``latest``) holding what a bf16 run of ``configs/model/1b.yaml`` with the chosen variant saves per
parameter -- bf16 weights (2 bytes), fp32 master weights and Adam ``m``, ``v`` (12) -- as synthetic random tensors
of the same total size (``--params``: default from the memory estimate's parameter count), split like the model's
layers. Then times, each ``--repeat`` times: the save with the manifest, the save without it (``write_manifest``
stubbed out), ``write_manifest`` alone, and ``CheckpointManager.verify`` (one process hashing every file; the ranks
of a job share it). Prints one JSON line per measurement and a summary; deletes its files at the end.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/checkpoint_hashing.py --dir /tmp/ckpt_bench [--variant elas]

The page cache is not dropped: ``verify`` right after a save reads files the kernel still holds when RAM allows
(a first load after a reboot or on another node reads the disk, and is bound by its read bandwidth too).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

GIB = 1024 ** 3


def param_count(variant: str) -> int:
    from elas_megatron.config.loader import load_config
    from elas_megatron.training.memory import parameters_per_gpu

    cfg = load_config(["configs/model/1b.yaml"], [f"model.variant={variant}"], world_size=1)
    return sum(parameters_per_gpu(cfg, 32000))  # the T5 vocabulary of the C4 recipe


def synthetic_state(params: int, layers: int = 24, per_layer: int = 8) -> dict:
    """ShardedTensors of ``params`` parameters: bf16 weights + fp32 master, exp_avg, exp_avg_sq, split into
    ``layers * per_layer`` tensors per state (plus the remainder)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    n = layers * per_layer
    sizes = [params // n] * n
    sizes[-1] += params - sum(sizes)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, dtype in (("model", torch.bfloat16), ("master", torch.float32), ("exp_avg", torch.float32),
                        ("exp_avg_sq", torch.float32)):
        for i, size in enumerate(sizes):
            # random bits (incompressible); int views keep the fill cheap
            t = torch.empty(size, dtype=dtype)
            t.view(torch.int16 if dtype == torch.bfloat16 else torch.int32).random_(generator=gen)
            key = f"{name}.layers.{i // per_layer}.p{i % per_layer}"
            state[key] = ShardedTensor.from_rank_offsets(key, t, replica_id=0)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--variant", default="elas", choices=["dense", "cola", "elas"])
    parser.add_argument("--params", type=int, default=None, help="parameter count (default: the 1B config's)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from elas_megatron.training import checkpoint as ckpt_module
    from elas_megatron.training.checkpoint import CheckpointManager
    from elas_megatron.training.checkpoint_trust import write_manifest

    from elas_megatron.config.schema import ParallelConfig
    from elas_megatron.parallel.setup import destroy_parallel, initialize_parallel

    initialize_parallel(ParallelConfig(), seed=0, device="cpu")  # one process, gloo, megatron's CPU workarounds
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_hashing_"))
    params = args.params or param_count(args.variant)
    t0 = time.perf_counter()
    state = synthetic_state(params)
    nbytes = sum(v.data.numel() * v.data.element_size() for v in state.values())
    print(json.dumps({"variant": args.variant, "params": params, "checkpoint_gib": round(nbytes / GIB, 3),
                      "tensors": len(state), "fill_s": round(time.perf_counter() - t0, 1)}), flush=True)
    results: dict[str, list[float]] = {"save_with_manifest": [], "save_without_manifest": [],
                                       "write_manifest": [], "verify": []}
    real_write_manifest = ckpt_module.write_manifest
    try:
        manager = CheckpointManager(root, keep_last=1, global_rank=0)
        warm = dict(list(state.items())[:4])  # not timed: the first save sets up megatron's save strategy
        manager.save(10**6, warm, {"config": {}})
        for r in range(args.repeat):
            for with_manifest in (True, False):
                ckpt_module.write_manifest = real_write_manifest if with_manifest else (lambda step_dir: None)
                start = time.perf_counter()
                path = manager.save(2 * r + (0 if with_manifest else 1), dict(state), {"config": {}})
                key = "save_with_manifest" if with_manifest else "save_without_manifest"
                results[key].append(time.perf_counter() - start)
                if with_manifest:
                    start = time.perf_counter()
                    assert CheckpointManager.verify(path)
                    results["verify"].append(time.perf_counter() - start)
                else:
                    start = time.perf_counter()
                    write_manifest(path)
                    results["write_manifest"].append(time.perf_counter() - start)
                print(json.dumps({"repeat": r, "with_manifest": with_manifest,
                                  **{k: round(v[-1], 2) for k, v in results.items() if len(v) > r}}), flush=True)
    finally:
        ckpt_module.write_manifest = real_write_manifest
        shutil.rmtree(root, ignore_errors=True)
        destroy_parallel()
    summary = {k: round(min(v), 2) for k, v in results.items()}
    summary["hash_gib_per_s"] = round(nbytes / GIB / summary["verify"], 3)
    summary["manifest_share_of_save"] = round(summary["write_manifest"] / summary["save_with_manifest"], 3)
    print(json.dumps({"summary_min_of_repeats_s": summary, "checkpoint_gib": round(nbytes / GIB, 3)}), flush=True)


if __name__ == "__main__":
    main()
