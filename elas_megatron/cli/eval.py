# SPDX-License-Identifier: Apache-2.0
"""``elas-eval CHECKPOINT [--data PREFIX ...] [--iters N]``: perplexity of a checkpoint on held-out data.

The model and its config come from the checkpoint (any TP/PP layout; loaded into one process, no torchrun).
Without ``--data`` it evaluates the run's own validation set (``data.valid_prefixes``, or the valid part of
``data.split``); by default the same ``train.eval_iters x dp`` micro-batches the trainer's validation used, so
the number matches the last ``val_loss`` logged at that step. ``--data`` takes Megatron indexed-dataset
prefixes (``elas-prep`` output) of a held-out set; ``--iters 0`` evaluates every sample of it once.
Prints one line (loss, perplexity, tokens); ``--json PATH`` also writes them. An evaluation longer than 10 s shows
its progress (a bar on a terminal, else a line every tenth: ``eval 120/862 batches (13%), elapsed 0:01:20, ETA
0:08:15``). Errors: one line, exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
from pathlib import Path


def evaluate(model, batches, num_microbatches: int) -> tuple[float, int]:
    """Token-weighted mean loss of ``model`` over ``num_microbatches`` of ``batches.eval_iterator``; shows progress
    when it takes long (:class:`~elas_megatron.utils.progress.ProgressMeter`)."""
    import torch

    from elas_megatron.utils.progress import ProgressMeter

    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    with torch.no_grad(), ProgressMeter(num_microbatches, "eval", "batches") as progress:
        for batch in batches.eval_iterator(num_microbatches):
            losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])   # [b, s]
            mask = batch["loss_mask"]
            loss_sum += (losses.float() * mask).sum().double().cpu()
            tokens += mask.sum().double().cpu()
            progress.update()
    return (loss_sum / tokens).item(), int(tokens.item())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elas-eval", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="step directory, checkpoint directory or run directory")
    parser.add_argument("--data", nargs="+", metavar="PREFIX", default=None,
                        help="held-out indexed-dataset prefixes (default: the run's validation set)")
    parser.add_argument("--iters", type=int, default=None,
                        help="micro-batches to evaluate (default: train.eval_iters x the run's dp; 0 = all samples)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="sequences per forward (default train.micro_batch)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this JSON file")
    parser.add_argument("--cache-dir", default=None,
                        help="dataset index cache (default: data.cache_dir of the run, else a temporary directory)")
    args = parser.parse_args(argv)
    if args.iters is not None and args.iters < 0:
        parser.error("--iters must be >= 0")

    import dataclasses

    import torch

    from elas_megatron.config import ConfigError
    from elas_megatron.data.datasets import build_datasets
    from elas_megatron.data.loader import StepBatches
    from elas_megatron.export.checkpoint import load_checkpoint
    from elas_megatron.parallel.setup import destroy_parallel
    from elas_megatron.training.checkpoint import CheckpointError
    from elas_megatron.utils.logging import init_logging

    init_logging()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        with contextlib.ExitStack() as stack:  # the temporary cache, if any, lives until the end
            ckpt = load_checkpoint(args.checkpoint, device=device)
            cfg, t = ckpt.config, ckpt.config.train
            micro = args.micro_batch or t.micro_batch
            saved_dp = int(ckpt.meta.get("layout", {}).get("dp", 1))
            iters = args.iters if args.iters is not None else t.eval_iters * saved_dp
            data_cfg = cfg.data
            if args.data:
                data_cfg = dataclasses.replace(cfg.data, train_prefixes=list(args.data),
                                               valid_prefixes=list(args.data), train_weights=None)
            # NOTE: not the shared default cache: its keys do not cover the data's content, so a re-tokenized
            # prefix of the same size would be read through a stale index.
            cache_dir = args.cache_dir or cfg.data.cache_dir or stack.enter_context(tempfile.TemporaryDirectory())
            _, valid = build_datasets(data_cfg, seq_len=t.seq_len, seed=t.seed, train_samples=1,
                                      valid_samples=max(1, iters * micro), vocab_size=ckpt.vocab_size,
                                      cache_dir=cache_dir)
            if iters == 0:
                iters = math.ceil(len(valid) / micro)
            batches = StepBatches(valid, global_batch=micro, micro_batch=micro, dp_rank=0, dp_size=1,
                                  device=torch.device(device))
            loss, tokens = evaluate(ckpt.model, batches, iters)
    except (ConfigError, CheckpointError, OSError, KeyError, ValueError, RuntimeError) as exc:
        print(f"elas-eval: error: {exc}", file=sys.stderr)
        destroy_parallel()
        return 2
    destroy_parallel()
    result = {"checkpoint": str(ckpt.path), "step": ckpt.step, "variant": cfg.model.variant,
              "data": list(args.data) if args.data else "validation set of the run", "micro_batches": iters,
              "micro_batch": micro, "seq_len": t.seq_len, "tokens": tokens, "loss": loss,
              "perplexity": math.exp(min(loss, 50.0))}
    print(f"elas-eval: {ckpt.path} (step {ckpt.step}, {cfg.model.variant}): loss {loss:.4f}, perplexity "
          f"{result['perplexity']:.2f} over {tokens:,} tokens ({iters} x {micro} sequences of {t.seq_len})")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":  # dist_checkpointing may spawn processes: keep the guard
    sys.exit(main())
