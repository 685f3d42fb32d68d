"""Run under torchrun with 2 processes: the same NaN gradient on rank 1 at step 3, skipped, with every data-parallel
optimizer backend; rank 0 writes ``{backend: per-step losses}`` as JSON to argv[1].

A skipped step must leave each backend's state clean -- megatron's grad buffers and distributed-optimizer shards,
DeepSpeed ZeRO-1's accumulated gradients and ZeRO-2's reduced partitions -- so all continue identically.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from faults import FaultInjector
from reliability_runs import RandomTokens

BACKENDS = {"megatron": [], "megatron-distopt": ["parallel.zero_stage=1"],
            "deepspeed-z1": ["parallel.optimizer=deepspeed", "parallel.zero_stage=1"],
            "deepspeed-z2": ["parallel.optimizer=deepspeed", "parallel.zero_stage=2"]}
BASE = ["model.variant=elas", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.ffn_hidden_size=64", "model.rank=8", "model.vocab_size=128", "train.seq_len=16", "train.global_batch=8",
        "train.micro_batch=2", "train.steps=5", "optim.lr=1e-2", "optim.warmup_steps=1", "train.max_skipped_steps=1",
        "checkpoint.save_final=false", "log.level=warning"]


def main() -> int:
    import torch.distributed as dist

    from elas_megatron.config.loader import load_config
    from elas_megatron.parallel.setup import destroy_parallel
    from elas_megatron.training.trainer import Trainer

    logging.basicConfig(level=logging.ERROR)
    out = Path(sys.argv[1])
    data = RandomTokens(4096, 16, 128)
    results = {}
    for name, overrides in BACKENDS.items():
        cfg = load_config(None, BASE + overrides + [f"train.run_dir={out.parent / name}"], world_size=2)
        trainer = Trainer(cfg, datasets=(data, data),
                          callbacks=[FaultInjector.parse("nan_grad@3:rank=1:decoder.layers.1.mlp")])
        results[name] = [trainer.train_step()[0] for _ in range(cfg.train.steps)]
        assert trainer.guard.skipped_steps == 1, (name, trainer.guard.skipped_steps)
        trainer.backend.close()
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
