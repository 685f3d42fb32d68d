"""Optimizer and learning-rate schedule, built from Megatron-Core's own pieces.

AdamW through ``get_megatron_optimizer`` (fp32 master weights under bf16, global grad-norm clipping over the
model-parallel group, and the distributed optimizer when ``parallel.zero_stage >= 1``) and a linear warm-up +
cosine decay through ``OptimizerParamScheduler``. Megatron's default parameter groups apply: no weight decay
on biases and 1-D parameters (the RMSNorm gains); low-rank factors decay like any matrix.
"""
from __future__ import annotations

import torch

from elas_megatron.config.schema import Config


def warmup_steps(cfg: Config) -> int:
    if cfg.optim.warmup_steps is not None:
        return min(cfg.optim.warmup_steps, cfg.train.steps)
    return int(cfg.optim.warmup_fraction * cfg.train.steps)


def build_optimizer(cfg: Config, model_chunks: list, *, bf16: bool):
    """AdamW over ``model_chunks`` (DDP-wrapped megatron modules) and its LR scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.lr * o.min_lr_ratio, weight_decay=o.weight_decay,
        adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.optimizer == "megatron" and cfg.parallel.zero_stage >= 1,
    )
    optimizer = get_megatron_optimizer(opt_cfg, model_chunks)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.lr * o.min_lr_ratio,
        lr_warmup_steps=warmup_steps(cfg), lr_decay_steps=cfg.train.steps, lr_decay_style="cosine",
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=cfg.train.steps, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False,
    )
    return optimizer, scheduler
