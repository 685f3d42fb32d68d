"""SDPAttention against megatron-core's local DotProductAttention (causal, grouped-query)."""
from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from elas_megatron.layers.attention import SDPAttention


@pytest.mark.parametrize("with_mask", [False, True])
def test_sdpa_matches_megatron_local_attention(tconfig, with_mask):
    cfg = tconfig()  # 4 query heads, 2 kv groups, head dim 8
    kwargs = dict(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    ours, ref = SDPAttention(**kwargs), DotProductAttention(**kwargs)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(7, 2, 4, 8, generator=gen, requires_grad=True)
    k = torch.randn(7, 2, 2, 8, generator=gen, requires_grad=True)
    v = torch.randn(7, 2, 2, 8, generator=gen, requires_grad=True)
    mask = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)[None, None] if with_mask else None
    out, expect = ours(q, k, v, mask), ref(q, k, v, mask)
    assert out.shape == (7, 2, 32)
    torch.testing.assert_close(out, expect)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expect_grads = torch.autograd.grad(expect.square().sum(), (q, k, v))
    for got, want in zip(grads, expect_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_sdpa_rejects_packed_sequences(tconfig):
    attn = SDPAttention(config=tconfig(), layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    q = torch.zeros(2, 1, 4, 8)
    with pytest.raises(NotImplementedError, match="packed"):
        attn(q, q[:, :, :2], q[:, :, :2], None, packed_seq_params=object())
