# SPDX-License-Identifier: Apache-2.0
"""The foreach multi-tensor ops against megatron-core's own Python fallbacks (elas_megatron.compat.multi_tensor)."""
from __future__ import annotations

import torch
from megatron.core import utils as mcore_utils
from megatron.core.optimizer import clip_grads, optimizer

from elas_megatron.compat.multi_tensor import foreach_l2_norm, foreach_scale, use_foreach_multi_tensor_ops


def _tensors(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (3,), (64, 33), (1,)]
    return [torch.randn(s, generator=gen) for s in shapes] + [torch.randn(9, generator=gen).bfloat16()]


def test_l2_norm_equals_megatrons_fallback(megatron_world):
    megatron_world()  # megatron's fallback allocates on "cuda": the CPU workarounds redirect it
    tensors = _tensors(0)
    got, per = foreach_l2_norm(0, None, [tensors], True)
    want, _ = mcore_utils.local_multi_tensor_l2_norm(0, None, [tensors], False)
    torch.testing.assert_close(got, want.to(got.device), rtol=1e-4, atol=0)  # megatron's: bf16 norms of bf16
    torch.testing.assert_close(per, torch.stack([t.float().norm() for t in tensors]))
    assert foreach_l2_norm(0, None, [[]], False)[0].item() == 0.0


def test_scale_and_copy_equal_megatrons_fallback():
    for scale in (1.0, 0.37):
        src = _tensors(1)
        got = [torch.zeros_like(t) for t in src]
        want = [torch.zeros_like(t) for t in src]
        foreach_scale(0, None, [src, got], scale)
        mcore_utils.local_multi_tensor_scale(0, None, [src, want], scale)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        in_place, reference = _tensors(2), _tensors(2)
        foreach_scale(0, None, [in_place, in_place], scale)       # megatron's clip: [grads, grads]
        for g, r in zip(in_place, reference):  # fp32 exactly; bf16 within its rounding (foreach: fp32 math)
            torch.testing.assert_close(g, r * scale, **({} if g.dtype == torch.bfloat16 else {"rtol": 0, "atol": 0}))


def test_swap_is_reversible_and_leaves_other_implementations_alone():
    try:
        assert use_foreach_multi_tensor_ops(True)
        assert optimizer.multi_tensor_scale_impl is foreach_scale and clip_grads.l2_norm_impl is foreach_l2_norm
        assert use_foreach_multi_tensor_ops(True)                 # idempotent
        assert not use_foreach_multi_tensor_ops(False)
        assert optimizer.multi_tensor_scale_impl is mcore_utils.local_multi_tensor_scale
        assert clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm
        assert clip_grads.multi_tensor_applier is mcore_utils.local_multi_tensor_applier
    finally:
        use_foreach_multi_tensor_ops(True)
