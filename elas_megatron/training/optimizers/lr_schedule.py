"""The learning-rate schedule both optimizer backends share: linear warm-up, then cosine decay.

It runs through megatron's ``OptimizerParamScheduler`` over the backend's ``optimizer.param_groups`` (which also
sets each group's weight decay from its ``wd_mult``), so the two backends compute the same update up to
floating-point reduction order.
"""
from __future__ import annotations

from elas_megatron.config.schema import Config

__all__ = ["warmup_steps", "build_scheduler"]


def warmup_steps(cfg: Config) -> int:
    if cfg.optim.warmup_steps is not None:
        return min(cfg.optim.warmup_steps, cfg.train.steps)
    return int(cfg.optim.warmup_fraction * cfg.train.steps)


def build_scheduler(cfg: Config, optimizer):
    """Linear warm-up from 0 to ``optim.lr``, cosine decay to ``optim.lr * optim.min_lr_ratio`` at the last step.

    A warm-up as long as the run (``optim.warmup_steps >= train.steps``, ``optim.warmup_fraction=1``) is a
    warm-up without decay: megatron's scheduler asserts warm-up < decay steps, so the decay is put one step past
    the warm-up, which leaves every step's rate of the warm-up unchanged.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    warmup = warmup_steps(cfg)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.lr * o.min_lr_ratio,
        lr_warmup_steps=warmup, lr_decay_steps=max(cfg.train.steps, warmup + 1), lr_decay_style="cosine",
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=cfg.train.steps, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False,
    )
