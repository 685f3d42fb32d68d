"""ELAS and CoLA FFNs against plain-PyTorch formulas of the papers' equations, on the same weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import build_module

from elas_megatron.layers.mlp import ElasMLP, cola_mlp_spec, elas_mlp_spec
from elas_megatron.sparsity.masks import sparse24, sparse24_mask


def _elas_formula(x, mlp: ElasMLP, *, sparse: bool, grad_mode: str) -> torch.Tensor:
    """arXiv 2605.03667 eqs: y1 = s(x A_up) B_up, y2 = relu(y1)^2, s = sparse24(y2), out = s(s A_down) B_down."""
    up, down = mlp.linear_fc1, mlp.linear_fc2
    y1 = F.silu(x @ up.A) @ up.B
    y2 = torch.relu(y1) ** 2
    if not sparse:
        s = y2
    elif grad_mode == "masked":
        s = sparse24(y2)                              # gradient reaches the kept entries only
    else:
        s = y2 + (sparse24(y2) - y2).detach()         # straight-through: gradient of y2 passes everywhere
    return F.silu(s @ down.A) @ down.B


def _grads(out, tensors):
    return torch.autograd.grad(out.pow(2).sum(), tensors)


@pytest.mark.parametrize("grad_mode", ["masked", "dense"])
@pytest.mark.parametrize("sparse24", [True, False])
@pytest.mark.parametrize("warmup", [False, True])
def test_elas_mlp_matches_paper_equations(tconfig, grad_mode, sparse24, warmup):
    cfg = tconfig("elas")
    mlp = build_module(elas_mlp_spec(rank=8, sparse24=sparse24, sparse24_grad=grad_mode), config=cfg)
    mlp.sparse_active = not warmup           # the dense warm-up switch of SparsitySchedule
    x = torch.randn(6, 2, 32, requires_grad=True)
    out, bias = mlp(x, padding_mask=None)
    assert bias is None and out.shape == x.shape
    expect = _elas_formula(x, mlp, sparse=sparse24 and not warmup, grad_mode=grad_mode)
    torch.testing.assert_close(out, expect)
    params = [x, mlp.linear_fc1.A, mlp.linear_fc1.B, mlp.linear_fc2.A, mlp.linear_fc2.B]
    for got, want in zip(_grads(out, params), _grads(expect, params), strict=True):
        torch.testing.assert_close(got, want)


def test_sparse_and_dense_elas_differ_and_pattern_is_24(tconfig):
    cfg = tconfig("elas")
    mlp = build_module(elas_mlp_spec(rank=8), config=cfg)
    x = torch.randn(4, 2, 32)
    mlp.track_density = True
    sparse_out, _ = mlp(x)
    y1, _ = mlp.linear_fc1(x)
    s = torch.relu(y1) ** 2 * sparse24_mask(torch.relu(y1))
    assert (s.reshape(-1, 4) != 0).sum(-1).max() <= 2
    assert mlp.last_density == pytest.approx((s != 0).float().mean().item())
    assert mlp.last_density <= 0.5
    mlp.sparse_active = False
    dense_out, _ = mlp(x)
    assert not torch.allclose(sparse_out, dense_out)


def test_cola_mlp_is_megatron_swiglu_with_lowrank_linears(tconfig):
    cfg = tconfig("cola")
    from megatron.core import parallel_state

    # as TransformerLayer builds megatron's MLP: with the TP group and the FFN width
    mlp = build_module(cola_mlp_spec(rank=8), config=cfg, tp_group=parallel_state.get_tensor_model_parallel_group(),
                       ffn_hidden_size=cfg.ffn_hidden_size)
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    x = torch.randn(5, 2, 32)
    out, bias = mlp(x)
    gate = F.silu(x @ fc1.A_gate) @ fc1.B_gate
    up = F.silu(x @ fc1.A_up) @ fc1.B_up
    expect = F.silu(F.silu(gate) * up @ fc2.A) @ fc2.B   # down(silu(gate) * up), every linear sigma(x A) B
    assert bias is None
    torch.testing.assert_close(out, expect)


def test_elas_mlp_rejects_bad_shapes_and_modes(tconfig):
    with pytest.raises(ValueError, match="multiple of 4"):
        build_module(elas_mlp_spec(rank=8), config=tconfig("elas", ffn_hidden_size=50))
    with pytest.raises(ValueError, match="sparse24_grad"):
        build_module(elas_mlp_spec(rank=8, sparse24_grad="ste"), config=tconfig("elas"))


def test_a_layer_built_without_tp_group_takes_the_default_one_without_megatrons_warning(tconfig):
    import warnings

    from megatron.core import parallel_state

    cfg = tconfig("elas")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*tp_group is None")
        mlp = build_module(elas_mlp_spec(rank=8), config=cfg)  # as TransformerLayer builds it: no tp_group
    assert mlp.tp_group is parallel_state.get_tensor_model_parallel_group()
    assert mlp.linear_fc1.tp_group is mlp.tp_group and mlp.linear_fc2.tp_group is mlp.tp_group
