# SPDX-License-Identifier: Apache-2.0
"""Load a training checkpoint of any TP/PP/VPP layout into one TP=1/PP=1 model, in a single process.

Checkpoints are Megatron ``dist_checkpointing`` directories whose tensors are keyed by their global name and
shape (layers by their global index), so a model built with the stored config but ``parallel`` reset to the
single-process layout can ask for every tensor whole; ``dist_checkpointing.load`` assembles the TP shards and
the pipeline stages' layers. Only the model is read: optimizer state, the scheduler and the step counter stay on
disk. The run's resolved config comes from the checkpoint's ``elas_meta.json`` (written by the trainer).
Used by ``elas-export`` and ``elas-eval``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from elas_megatron.config.loader import config_from_dict
from elas_megatron.config.schema import Config, ParallelConfig
from elas_megatron.variants.registry import get_variant

__all__ = ["LoadedCheckpoint", "load_checkpoint", "resolve_checkpoint", "single_process_config"]

logger = logging.getLogger(__name__)

META = "elas_meta.json"  # NOTE: the name CheckpointManager writes (training/checkpoint.py)


def resolve_checkpoint(path: str | Path) -> Path:
    """A ``step_*`` directory from a step directory, a checkpoint directory (its ``latest``) or a run directory.

    Raises:
        FileNotFoundError: nothing checkpoint-like at ``path`` (the message says what was looked for).
        CheckpointError: a ``latest`` pointer names something other than a ``step_*`` directory next to it.
    """
    from elas_megatron.training.checkpoint_trust import resolve_latest

    p = Path(path)
    if (p / META).is_file():
        return p
    for directory in (p, p / "checkpoints"):
        pointer = directory / "latest"
        if pointer.is_file():
            step_dir = resolve_latest(directory)  # CheckpointError for a pointer out of the directory
            if (step_dir / META).is_file():
                return step_dir
            raise FileNotFoundError(f"{pointer} names {step_dir.name}, which is not a complete checkpoint (no {META})")
    raise FileNotFoundError(f"{path} is not a checkpoint: expected a step_* directory with {META}, a checkpoint "
                            "directory with a 'latest' file, or a run directory with checkpoints/latest")


def single_process_config(cfg: Config, *, device: str = "cpu") -> Config:
    """``cfg`` with the layout reset to one process (TP=PP=1, no SP/VPP, no recompute) on ``device``, fp32.

    The layer spec becomes megatron's local one: Transformer Engine checkpoints use the same tensor names
    (docs/model.md), so a TE-trained run exports and evaluates without Transformer Engine.
    """
    parallel = ParallelConfig(distributed_timeout_s=cfg.parallel.distributed_timeout_s,
                              io_timeout_s=cfg.parallel.io_timeout_s)
    train = dataclasses.replace(cfg.train, device=device, dtype="fp32")
    model = dataclasses.replace(cfg.model, spec="local")
    return dataclasses.replace(cfg, model=model, parallel=parallel, train=train)


@dataclass
class LoadedCheckpoint:
    """A checkpoint's model in one process."""
    path: Path
    config: Config
    """The run's config as stored (its original layout); the model was built with :func:`single_process_config`."""
    model: torch.nn.Module
    """megatron ``GPTModel`` (TP=1, PP=1), fp32, eval mode, on ``device``."""
    vocab_size: int
    step: int
    meta: dict

    @property
    def sparse_active(self) -> bool:
        """elas: whether the last trained step ran with 2:4 sparsity (False inside the dense warm-up)."""
        m = self.config.model
        variant = get_variant(m.variant)
        return variant.sparse_active(m) and max(self.step - 1, 0) >= variant.dense_warmup_steps(m)


def _ensure_single_process(device: str) -> None:
    import torch.distributed as dist

    from elas_megatron.parallel.setup import initialize_parallel

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("checkpoint export/evaluation runs in one process; start it without torchrun")
    if not dist.is_initialized():
        initialize_parallel(ParallelConfig(), seed=0, device=device)


def load_checkpoint(path: str | Path, *, device: str = "cpu") -> LoadedCheckpoint:
    """Build the stored run's model at TP=1/PP=1 and load the checkpoint's weights into it.

    Args:
        path: a step directory, a checkpoint directory or a run directory (:func:`resolve_checkpoint`).
        device: ``"cpu"`` or ``"cuda"``; a single-process gloo/NCCL world is initialised if none exists.
    """
    from elas_megatron.models.gpt import build_model
    from elas_megatron.sparsity.schedule import SparsitySchedule
    from elas_megatron.training.checkpoint import CheckpointManager

    step_dir = resolve_checkpoint(path)
    meta = CheckpointManager.read_meta(step_dir)
    cfg = config_from_dict(meta["config"])
    vocab_size = int(meta["vocab_size"])
    _ensure_single_process(device)
    model = build_model(single_process_config(cfg, device=device), vocab_size=vocab_size)
    # verified against its manifest and vetted (nothing pickled may run code) before megatron reads it
    loaded = CheckpointManager.load(step_dir, {"model": model.sharded_state_dict()})
    model.load_state_dict(loaded["model"])
    model.eval()
    step = int(meta.get("step", 0))
    ckpt = LoadedCheckpoint(path=step_dir, config=cfg, model=model, vocab_size=vocab_size, step=step, meta=meta)
    variant = get_variant(cfg.model.variant)
    if variant.sparsity:
        SparsitySchedule(variant.dense_warmup_steps(cfg.model)).apply([model], max(step - 1, 0))
    layout = meta.get("layout", {})
    logger.info("loaded %s (step %d, %s, saved at tp=%s pp=%s dp=%s) into one process", step_dir, step,
                cfg.model.variant, layout.get("tp"), layout.get("pp"), layout.get("dp"))
    return ckpt
