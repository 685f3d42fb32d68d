"""The shared learning-rate schedule: linear warm-up, cosine decay, and a warm-up as long as the run."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from elas_megatron.config import load_config
from elas_megatron.training.optimizers.lr_schedule import build_scheduler

DEMO = Path(__file__).resolve().parents[4] / "configs" / "demo.yaml"


def _rates(steps: int, **optim) -> list[float]:
    """The learning rate of steps 1..steps (megatron's scheduler is stepped once per training step)."""
    overrides = [f"train.steps={steps}", *(f"optim.{k}={v}" for k, v in optim.items())]
    cfg = load_config([DEMO], overrides)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=cfg.optim.lr)
    for group in opt.param_groups:
        group.update(lr_mult=1.0, wd_mult=1.0)
    scheduler = build_scheduler(cfg, opt)
    rates = []
    for _ in range(steps):
        scheduler.step(1)
        rates.append(opt.param_groups[0]["lr"])
    return rates


def test_warmup_then_cosine_decay_to_the_minimum_at_the_last_step():
    cfg = load_config([DEMO], [])
    lr, floor = cfg.optim.lr, cfg.optim.lr * cfg.optim.min_lr_ratio
    rates = _rates(10, warmup_steps=4)
    assert rates[:4] == pytest.approx([lr * s / 4 for s in range(1, 5)])
    assert rates[-1] == pytest.approx(floor)
    mid = floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * 3 / 6))  # step 7: 3 of 6 decay steps
    assert rates[6] == pytest.approx(mid)


@pytest.mark.parametrize("steps,warmup", [(1, 1), (5, 5), (5, 50)])
def test_a_warmup_as_long_as_the_run_warms_up_without_decay(steps, warmup):
    # megatron's scheduler asserts warm-up < decay steps: `train.steps=1 optim.warmup_steps=1` stopped with a bare
    # AssertionError at start-up
    lr = load_config([DEMO], []).optim.lr
    ramp = min(warmup, steps)
    assert _rates(steps, warmup_steps=warmup) == pytest.approx([lr * s / ramp for s in range(1, steps + 1)])
