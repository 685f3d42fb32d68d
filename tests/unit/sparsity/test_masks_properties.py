"""Property tests of the 2:4 reference: invariants for any shape, dtype and value (NaN, Inf, ties, zeros)."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elas_megatron.sparsity import sparse24, sparse24_mask

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
special = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, float("inf"), float("-inf"), float("nan"), 1e-30, -65504.0])
values = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), special)


@st.composite
def tensors(draw):
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    groups = draw(st.integers(1, 4))
    n = math.prod(lead) * groups * 4
    data = draw(st.lists(values, min_size=n, max_size=n))
    dtype = draw(st.sampled_from(DTYPES))
    return torch.tensor(data, dtype=torch.float32).to(dtype).reshape(*lead, groups * 4)


def rank_key(v: float, i: int) -> tuple:
    m = abs(v)
    return (-(math.inf if math.isnan(m) else m), i)


@settings(max_examples=300, deadline=None)
@given(tensors())
def test_pattern_invariants(x):
    mask = sparse24_mask(x)
    assert mask.shape == x.shape
    groups = mask.reshape(-1, 4)
    assert torch.all(groups.sum(-1) == 2)                       # exactly 2 of every 4
    flat = x.float().reshape(-1, 4).tolist()
    for g, keep in zip(flat, groups.tolist()):
        order = sorted(range(4), key=lambda i: rank_key(g[i], i))
        assert sorted(order[:2]) == [i for i in range(4) if keep[i]]   # the 2 largest |x|, ties low index, NaN first
    y = sparse24(x)
    assert torch.equal(torch.isnan(y), torch.isnan(x) & mask)  # NaN survives only where kept (and always is kept)
    assert torch.all((y == 0) | mask | torch.isnan(y))


@settings(max_examples=100, deadline=None)
@given(tensors())
def test_idempotent_and_scale_invariant(x):
    x = torch.nan_to_num(x.double(), nan=0.0, posinf=1e300, neginf=-1e300)
    y = sparse24(x)
    assert torch.equal(sparse24(y), y)            # already 2:4: unchanged
    assert torch.equal(sparse24_mask(-3.0 * x), sparse24_mask(x))   # magnitude only, positive scaling keeps order
