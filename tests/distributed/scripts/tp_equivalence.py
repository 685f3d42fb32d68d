"""torchrun worker of tests/distributed/test_tp_layers.py: TP=2 (with and without SP) must equal TP=1.

Run with ``python -m torch.distributed.run --nproc-per-node 2 tp_equivalence.py --out DIR``. In one launch
(process start-up dominates on small CPUs) it:

1. builds every variant with TP=1 (the two processes are data-parallel replicas) and records logits, loss and
   gradients under the layer-invariant parameter names;
2. rebuilds with TP=2, and TP=2 + sequence parallelism, wrapped in megatron DDP with gradients finalised by
   megatron's ``finalize_model_grads`` (the trainer's path: it sums the ``sequence_parallel`` factors' grads
   over TP), gathers logits and gradient shards back to full tensors and records the largest deviations;
3. checks the layout-invariant init under PP=2 (each stage's weights are the TP=1 model's global layers);
4. saves an ELAS model with megatron ``dist_checkpointing`` at TP=2 and loads it at TP=1.

Rank 0 writes ``results.json``; the pytest side asserts on it.

The heavy imports happen only under ``__main__``: megatron's checkpoint writer starts a ``spawn`` helper process,
which re-imports this file, and importing torch + megatron there would double the cost of the save.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

if __name__ == "__main__":
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from elas_megatron.config.schema import Config, ModelConfig, ParallelConfig, TrainConfig
    from elas_megatron.models.gpt import build_model
    from elas_megatron.models.init import global_parameter_names, initialize_weights
    from elas_megatron.parallel.setup import initialize_parallel

VOCAB, SEQ, BATCH = 64, 16, 2
SHAPE = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48, rank=8)
VARIANTS = ("dense", "cola", "elas")


def config(variant: str, *, tp: int = 1, pp: int = 1, sp: bool = False, seed: int = 1234) -> Config:
    return Config(model=ModelConfig(variant=variant, **SHAPE),
                  parallel=ParallelConfig(tp=tp, pp=pp, sequence_parallel=sp),
                  train=TrainConfig(seq_len=SEQ, seed=seed, device="cpu"))


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], torch.arange(SEQ).expand(BATCH, SEQ), tokens[:, 1:]


def gather_full(tensor: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """The TP=1 tensor from this rank's shard (inverse of models.init's strided slicing)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor.detach().clone()
    shards = [torch.empty_like(tensor) for _ in range(tp)]
    dist.all_gather(shards, tensor.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    blocks = [shard.chunk(stride, dim=dim) for shard in shards]             # [rank][block]
    return torch.cat([blocks[r][b] for b in range(stride) for r in range(tp)], dim=dim)


def gathered_logits(model: torch.nn.Module, tokens, position_ids) -> torch.Tensor:
    with torch.no_grad():
        logits = model(tokens, position_ids, None)                          # [b, s, V / tp]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def reference(variant: str) -> dict:
    initialize_parallel(ParallelConfig(), seed=1234)
    model = build_model(config(variant), vocab_size=VOCAB)
    tokens, position_ids, labels = batch()
    logits = gathered_logits(model, tokens, position_ids)
    loss = model(tokens, position_ids, None, labels=labels).mean()
    loss.backward()
    names = global_parameter_names(model)
    return {"logits": logits, "loss": loss.item(),
            "grads": {names[n]: p.grad.clone() for n, p in model.named_parameters()},
            "weights": {names[n]: p.detach().clone() for n, p in model.named_parameters()}}


def tensor_parallel_run(variant: str, sp: bool, ref: dict) -> dict:
    cfg = config(variant, tp=2, sp=sp)
    initialize_parallel(cfg.parallel, seed=1234)
    model = build_model(cfg, vocab_size=VOCAB)
    ddp = DistributedDataParallel(config=model.config, module=model,
                                  ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                                           overlap_grad_reduce=False))
    tokens, position_ids, labels = batch()
    logits = gathered_logits(ddp, tokens, position_ids)
    loss = ddp(tokens, position_ids, None, labels=labels).mean()
    loss.backward()
    finalize_model_grads([ddp])
    names = global_parameter_names(model)
    worst = {"param": None, "err": 0.0}
    for name, param in model.named_parameters():
        full = gather_full(param.main_grad, param)
        want = ref["grads"][names[name]]
        err = ((full - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        if err > worst["err"]:
            worst = {"param": names[name], "err": err}
    sp_params = sorted(names[n] for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False))
    return {"logits_err": (logits - ref["logits"]).abs().max().item(), "sp_params": sp_params,
            "logits_scale": ref["logits"].abs().max().item(),
            "loss_err": abs(loss.item() - ref["loss"]), "grad_rel_err": worst,
            "params": sorted(names[n] for n, _ in model.named_parameters()) == sorted(ref["grads"])}


def pipeline_init_run(variant: str, ref: dict) -> dict:
    """PP=2: each stage's freshly initialised weights equal the TP=1 model's weights of the same global layers."""
    cfg = config(variant, pp=2)
    info = initialize_parallel(cfg.parallel, seed=1234)
    model = build_model(cfg, vocab_size=VOCAB, pre_process=info.is_first_stage, post_process=info.is_last_stage)
    names = global_parameter_names(model)
    mismatched = [names[n] for n, p in model.named_parameters() if not torch.equal(p, ref["weights"][names[n]])]
    return {"stage": info.pp_rank, "params": sorted(names.values()), "mismatched": mismatched}


def checkpoint_across_tp(ckpt_dir: Path) -> dict:
    """Save ELAS at TP=2 (weights of seed 999), load into a TP=1 model (seed 1234): must become seed 999's."""
    cfg = config("elas", tp=2)
    initialize_parallel(cfg.parallel, seed=1234)
    model = build_model(cfg, vocab_size=VOCAB)
    initialize_weights(model, cfg.model, seed=999)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt_dir))
    dist.barrier()
    initialize_parallel(ParallelConfig(), seed=1234)
    loaded = build_model(config("elas"), vocab_size=VOCAB)
    state = dist_checkpointing.load(loaded.sharded_state_dict(), str(ckpt_dir))
    loaded.load_state_dict(state)
    expected = build_model(config("elas", seed=999), vocab_size=VOCAB)
    exp = dict(expected.named_parameters())
    return {"mismatched": [n for n, p in loaded.named_parameters() if not torch.equal(p, exp[n])]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results: dict = {"tp": {}, "pp": {}}
    refs = {variant: reference(variant) for variant in VARIANTS}
    for variant in VARIANTS:
        for sp in (False, True):
            results["tp"][f"{variant}{'+sp' if sp else ''}"] = tensor_parallel_run(variant, sp, refs[variant])
    for variant in VARIANTS:
        stages = [None, None]
        dist.all_gather_object(stages, pipeline_init_run(variant, refs[variant]))
        results["pp"][variant] = stages
    results["checkpoint"] = checkpoint_across_tp(args.out / "ckpt")
    if dist.get_rank() == 0:
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
