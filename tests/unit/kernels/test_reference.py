"""The ELAS core reference op against autograd of the paper's masked formula and finite differences."""
from __future__ import annotations

import pytest
import torch

from elas_megatron.kernels.reference import relu2_sparse24_matmul_reference as op
from elas_megatron.sparsity import sparse24_mask


def formula(y1, w, sparse, grad_mode):
    y2 = torch.relu(y1) ** 2
    if not sparse:
        return y2 @ w
    mask = sparse24_mask(y2)
    if grad_mode == "masked":
        return (y2 * mask) @ w
    return (y2 + (y2 * mask - y2).detach()) @ w  # forward masked, gradient dense (straight-through)


@pytest.mark.parametrize("sparse, grad_mode", [(True, "masked"), (True, "dense"), (False, "masked")])
def test_matches_autograd_of_the_formula(sparse, grad_mode):
    g = torch.Generator().manual_seed(1)
    y1 = torch.randn(3, 5, 24, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(24, 6, dtype=torch.float64, generator=g, requires_grad=True)
    z = op(y1, w, sparse=sparse, grad_mode=grad_mode)
    gz = torch.randn_like(z)
    z.backward(gz)
    y1b, wb = y1.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    zb = formula(y1b, wb, sparse, grad_mode)
    zb.backward(gz)
    torch.testing.assert_close(z, zb, rtol=0, atol=1e-12)
    torch.testing.assert_close(y1.grad, y1b.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, wb.grad, rtol=1e-12, atol=1e-12)


def test_finite_differences():
    g = torch.Generator().manual_seed(2)
    y1 = torch.randn(4, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(16, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: op(a, b), (y1, w))
    assert torch.autograd.gradcheck(lambda a, b: op(a, b, sparse=False), (y1, w))


def test_masked_mode_saves_only_the_sparse_activation():
    y1 = torch.randn(8, 32, requires_grad=True)
    w = torch.randn(32, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        op(y1, w)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == [(8, 32), (32, 4)]  # s and the weight, not y1/y2/mask
    s = next(t for t in saved if t.shape == (8, 32))
    assert (s != 0).reshape(-1, 4).sum(-1).max() <= 2


def test_unknown_grad_mode_is_refused():
    with pytest.raises(ValueError, match="grad_mode='exact'"):
        op(torch.randn(2, 4), torch.randn(4, 2), grad_mode="exact")
