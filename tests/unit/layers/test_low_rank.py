"""CoLA low-rank layers (single process): the paper's formula, megatron's fused-qkv layout, contracts, checkpoints."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from elas_megatron.layers.low_rank import (
    LowRankColumnParallelLinear,
    LowRankQKVColumnParallelLinear,
    LowRankRowParallelLinear,
    cola_init_std,
)


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("activation", ["silu", "identity"])
def test_column_and_row_compute_sigma_xA_B(tconfig, activation):
    cfg = tconfig()
    sigma = F.silu if activation == "silu" else (lambda t: t)
    col = LowRankColumnParallelLinear(32, 48, config=cfg, init_method=None, rank=8, activation=activation)
    row = LowRankRowParallelLinear(48, 32, config=cfg, init_method=None, bias=False, input_is_parallel=True,
                                   skip_bias_add=True, rank=8, activation=activation)
    x = _x(5, 2, 32)
    y, bias = col(x)
    assert bias is None and y.shape == (5, 2, 48) and col.A.shape == (32, 8) and col.B.shape == (8, 48)
    torch.testing.assert_close(y, sigma(x @ col.A) @ col.B)
    out, bias = row(y)
    assert bias is None and row.A.shape == (48, 8) and row.B.shape == (8, 32)
    torch.testing.assert_close(out, sigma(y @ row.A) @ row.B)


def test_glu_column_has_separate_gate_and_up_factors(tconfig):
    cfg = tconfig("cola")
    fc1 = LowRankColumnParallelLinear(32, 96, config=cfg, init_method=None, stride=2, rank=8)
    assert {n for n, _ in fc1.named_parameters()} == {"A_gate", "B_gate", "A_up", "B_up"}
    x = _x(3, 2, 32)
    y, _ = fc1(x)
    gate, up = torch.chunk(y, 2, dim=-1)  # how megatron's MLP splits [gate | up]
    torch.testing.assert_close(gate, F.silu(x @ fc1.A_gate) @ fc1.B_gate)
    torch.testing.assert_close(up, F.silu(x @ fc1.A_up) @ fc1.B_up)


def test_qkv_output_follows_megatrons_per_group_layout(tconfig):
    cfg = tconfig()  # 4 heads, 2 query groups, head dim 8
    qkv = LowRankQKVColumnParallelLinear(32, 32 + 2 * 16, config=cfg, init_method=None, gather_output=False,
                                         bias=False, skip_bias_add=False, is_expert=False,
                                         tp_comm_buffer_name="qkv", rank=8)
    assert qkv.B_q.shape == (8, 32) and qkv.B_k.shape == (8, 16) and qkv.B_v.shape == (8, 16)
    x = _x(3, 2, 32)
    mixed, _ = qkv(x)
    # SelfAttention.get_query_key_value_tensors: [s, b, ng, (np/ng + 2) * hn] split into q | k | v per group.
    q, k, v = torch.split(mixed.view(3, 2, 2, 4 * 8), [2 * 8, 8, 8], dim=3)
    torch.testing.assert_close(q.reshape(3, 2, 32), F.silu(x @ qkv.A_q) @ qkv.B_q)
    torch.testing.assert_close(k.reshape(3, 2, 16), F.silu(x @ qkv.A_k) @ qkv.B_k)
    torch.testing.assert_close(v.reshape(3, 2, 16), F.silu(x @ qkv.A_v) @ qkv.B_v)


def test_tp_attributes_mark_sharded_and_replicated_factors(tconfig):
    cfg = tconfig()
    col = LowRankColumnParallelLinear(32, 48, config=cfg, init_method=None, rank=8)
    row = LowRankRowParallelLinear(48, 32, config=cfg, bias=False, input_is_parallel=True, skip_bias_add=True, rank=8)
    assert (col.B.tensor_model_parallel, col.B.partition_dim) == (True, 1)
    assert (row.A.tensor_model_parallel, row.A.partition_dim) == (True, 0)
    for replicated in (col.A, row.B):
        assert replicated.tensor_model_parallel is False and replicated.sequence_parallel is False
    assert col.lowrank_dims == {"A": (32, 48, 8), "B": (32, 48, 8)}


def test_constructor_init_is_colas(tconfig):
    cfg = tconfig()
    col = LowRankColumnParallelLinear(512, 1024, config=cfg, init_method=None, rank=64)
    expected = cola_init_std(512, 1024, 64)
    for factor in (col.A, col.B):
        assert abs(factor.std().item() / expected - 1) < 0.03 and abs(factor.mean().item()) < 3e-3 * expected * 10


def test_unsupported_options_fail_loudly(tconfig):
    cfg = tconfig()
    with pytest.raises(NotImplementedError, match="bias=True"):
        LowRankColumnParallelLinear(32, 48, config=cfg, init_method=None, bias=True, rank=8)
    with pytest.raises(NotImplementedError, match="gather_output=True"):
        LowRankColumnParallelLinear(32, 48, config=cfg, init_method=None, gather_output=True, rank=8)
    with pytest.raises(NotImplementedError, match="input_is_parallel"):
        LowRankRowParallelLinear(48, 32, config=cfg, bias=False, input_is_parallel=False, skip_bias_add=True, rank=8)
    with pytest.raises(ValueError, match="lowrank_activation"):
        LowRankColumnParallelLinear(32, 48, config=cfg, init_method=None, rank=8, activation="gelu")
    with pytest.raises(ValueError, match="part names"):
        LowRankColumnParallelLinear(32, 48, config=cfg, init_method=None, stride=2, rank=8, part_names=("a",))


def test_sharded_state_dict_shards_only_the_tp_factors(tconfig):
    cfg = tconfig()
    col = LowRankColumnParallelLinear(32, 48, config=cfg, init_method=None, stride=2, rank=8)
    row = LowRankRowParallelLinear(48, 32, config=cfg, bias=False, input_is_parallel=True, skip_bias_add=True, rank=8)
    col_sd = col.sharded_state_dict(prefix="fc1.")
    row_sd = row.sharded_state_dict(prefix="fc2.")
    assert set(col_sd) == {"fc1.A_gate", "fc1.B_gate", "fc1.A_up", "fc1.B_up", "fc1._extra_state"}
    # A TP-sharded ShardedTensor records the TP axis as a fragmented axis; a replicated one has none.
    assert col_sd["fc1.B_gate"].axis_fragmentations == (1, 1) and col_sd["fc1.B_gate"].global_shape == (8, 24)
    assert col_sd["fc1.A_gate"].global_shape == (32, 8)
    assert row_sd["fc2.A"].global_shape == (48, 8) and row_sd["fc2.B"].global_shape == (8, 32)
