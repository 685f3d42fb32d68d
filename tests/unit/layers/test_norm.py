"""The sequence-parallel-capable RMSNorm computes exactly torch's RMSNorm."""
from __future__ import annotations

import dataclasses

import torch

from elas_megatron.layers.norm import RMSNorm


def test_rmsnorm_equals_torch_and_marks_sp_grads(tconfig):
    cfg = tconfig()
    ours, ref = RMSNorm(cfg, 32, eps=1e-5), torch.nn.RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.weight)
    x = torch.randn(5, 2, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    assert ours.weight.sequence_parallel is False
    sp_cfg = dataclasses.replace(cfg, tensor_model_parallel_size=2, sequence_parallel=True)
    assert RMSNorm(sp_cfg, 32).weight.sequence_parallel is True
