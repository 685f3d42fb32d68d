"""The 2:4 reference: exactly 2 of every 4 kept, the largest by magnitude, ties to the lower index."""
from __future__ import annotations

import itertools

import pytest
import torch

from elas_megatron.sparsity import sparse24, sparse24_mask


def topk_mask(x: torch.Tensor) -> torch.Tensor:
    """Independent oracle: stable sort by (-|x|, index) inside each group."""
    g = x.abs().reshape(-1, 4)
    keep = torch.zeros_like(g, dtype=torch.bool)
    for row in range(g.shape[0]):
        order = sorted(range(4), key=lambda i: (-g[row, i].item(), i))
        keep[row, order[:2]] = True
    return keep.reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4,), (3, 8), (2, 5, 12), (7, 1, 4)])
def test_pattern_matches_oracle(dtype, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    mask = sparse24_mask(x)
    assert mask.shape == x.shape and mask.dtype == torch.bool
    assert torch.equal(mask.reshape(-1, 4).sum(-1), torch.full((x.numel() // 4,), 2))
    assert torch.equal(mask, topk_mask(x))
    assert torch.equal(sparse24(x), x * mask)


def test_every_tie_configuration_breaks_toward_lower_index():
    # All 4^4 magnitude patterns over {0,1,2,3} with signs: covers every tie structure.
    for values in itertools.product([0.0, 1.0, 2.0, 3.0], repeat=4):
        for signs in ((1, 1, 1, 1), (-1, 1, -1, 1)):
            x = torch.tensor([v * s for v, s in zip(values, signs)])
            assert torch.equal(sparse24_mask(x), topk_mask(x)), values


def test_nan_is_kept_and_exactly_two_survive():
    x = torch.tensor([1.0, float("nan"), 3.0, 2.0, float("inf"), float("nan"), 0.0, -1.0])
    mask = sparse24_mask(x)
    assert mask.tolist() == [False, True, True, False, True, True, False, False]


def test_gradient_flows_to_kept_entries_only():
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    sparse24(x).sum().backward()
    assert torch.equal(x.grad, sparse24_mask(x).double())


@pytest.mark.parametrize("bad", [torch.zeros(6), torch.zeros(2, 3), torch.zeros(4, dtype=torch.int32), torch.tensor(1.0)])
def test_bad_input_is_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        sparse24_mask(bad)
