# SPDX-License-Identifier: Apache-2.0
"""optim.adam_impl: torch AdamW's foreach / fused kernels behind megatron's optimizer (CPU side of it).

The fused kernel needs CUDA; the GPU tests (tests/gpu/test_rope_gpu.py) train and resume with it. Here: the
choice on CPU, the refusal of ``fused`` on CPU parameters, and that flags and step counters follow the choice.
"""
from __future__ import annotations

import pytest
import torch

from elas_megatron.config import load_config
from elas_megatron.config.schema import ConfigError
from elas_megatron.training.optimizers.backend import use_adam_impl


def _adamw(steps: int = 1) -> torch.optim.AdamW:
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([w], lr=1e-2)
    for _ in range(steps):
        w.grad = torch.randn_like(w)
        opt.step()
    return opt


def test_auto_is_foreach_on_cpu_and_sets_every_group():
    opt = _adamw()
    assert use_adam_impl(opt, "auto") == "foreach"
    assert all(g["foreach"] and not g["fused"] for g in [*opt.param_groups, opt.defaults])
    before = opt.param_groups[0]["params"][0].detach().clone()
    opt.param_groups[0]["params"][0].grad = torch.ones(4, 3)
    opt.step()  # still a working optimizer
    assert not torch.equal(before, opt.param_groups[0]["params"][0])


def test_fused_on_cpu_parameters_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="optim.adam_impl=fused needs every parameter on a CUDA device"):
        use_adam_impl(_adamw(), "fused")


def test_other_optimizers_are_left_alone():
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert use_adam_impl(sgd, "fused") == "n/a"
    assert "fused" not in sgd.param_groups[0] or sgd.param_groups[0]["fused"] in (None, False)


def test_config_rejects_unknown_impl():
    with pytest.raises(ConfigError, match="optim.adam_impl"):
        load_config(None, ["optim.adam_impl=apex"])
