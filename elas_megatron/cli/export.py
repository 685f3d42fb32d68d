# SPDX-License-Identifier: Apache-2.0
"""``elas-export CHECKPOINT OUT_DIR [--format auto|hf|torch] [--dtype fp32|bf16|fp16]``: export a trained model.

CHECKPOINT is a ``step_*`` directory, a checkpoint directory (its ``latest``) or a run directory, saved at any
TP/PP layout; it is loaded into one TP=1/PP=1 model in this process (no torchrun). ``--format auto`` writes a
LLaMA network (dense) as a Hugging Face ``LlamaForCausalLM`` directory and the others (cola, elas) as a plain
PyTorch state dict with the standalone inference module ``modeling_elas.py`` (``--format torch`` does that for
dense too); the variant says which formats can hold it.
Errors end with one line and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("elas_megatron")

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elas-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="step directory, checkpoint directory or run directory")
    parser.add_argument("out", help="output directory (created)")
    parser.add_argument("--format", choices=("auto", "hf", "torch"), default="auto",
                        help="auto: hf for a LLaMA network (dense), torch for the others (cola/elas)")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="fp32", help="dtype of the written weights")
    args = parser.parse_args(argv)

    import torch

    from elas_megatron.config import ConfigError
    from elas_megatron.export.checkpoint import load_checkpoint, resolve_checkpoint
    from elas_megatron.export.hf import export_hf, export_torch
    from elas_megatron.parallel.setup import destroy_parallel
    from elas_megatron.training.checkpoint import CheckpointError, CheckpointManager
    from elas_megatron.utils.logging import init_logging
    from elas_megatron.variants.registry import get_variant

    init_logging()
    try:
        variant = get_variant(
            CheckpointManager.read_meta(resolve_checkpoint(args.checkpoint))["config"]["model"]["variant"])
        fmt = args.format if args.format != "auto" else variant.default_export_format()
        variant.check_export(fmt)  # before anything is loaded
        ckpt = load_checkpoint(args.checkpoint)
        cfg = ckpt.config
        dtype = getattr(torch, _DTYPES[args.dtype])
        provenance = {"elas_export": {"checkpoint": str(ckpt.path.resolve()), "step": ckpt.step,
                                      "saved_layout": ckpt.meta.get("layout", {})}}
        state = ckpt.model.state_dict()
        if fmt == "hf":
            out = export_hf(state, cfg, ckpt.vocab_size, args.out, dtype=dtype, extra=provenance)
        else:
            out = export_torch(state, cfg, ckpt.vocab_size, args.out, sparse24=ckpt.sparse_active, dtype=dtype,
                               extra=provenance)
    except (ConfigError, CheckpointError, OSError, KeyError, ValueError, RuntimeError) as exc:
        print(f"elas-export: error: {exc}", file=sys.stderr)
        destroy_parallel()
        return 2
    destroy_parallel()
    print(f"exported {cfg.model.variant} step {ckpt.step} from {ckpt.path} as {fmt} ({args.dtype}) to {out}")
    return 0


if __name__ == "__main__":  # dist_checkpointing may spawn processes: keep the guard
    sys.exit(main())
