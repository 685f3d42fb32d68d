# SPDX-License-Identifier: Apache-2.0
"""The speed switches of the model against their plain twins, on CPU: same losses and gradients.

* ``model.lowrank_parts=separate`` (q, k, v from the low-rank ``linear_qkv`` and cola's gate, up without
  megatron's fused layouts) vs ``fused``: the same products, so fp32 results agree to rounding.
* ``model.loss_backend=liger`` (output layer + cross-entropy fused, Liger-Kernel under Triton's interpreter, in a
  subprocess) vs ``megatron``: per-token losses and every gradient, with a loss mask that drops tokens; the
  plain op against ``torch.nn.functional.cross_entropy`` for a sum, a mean and a masked token mean.
Liger's SwiGLU does not run under Triton's interpreter: its test against ``silu(gate) * up`` is a GPU test.
The GPU twins run in tests/gpu/test_fused_paths_gpu.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import SEQ, VOCAB, tiny_config

from elas_megatron.layers.attention import ElasSelfAttention
from elas_megatron.layers.mlp import ColaMLP
from elas_megatron.models.gpt import build_model, resolve_loss_backend

REPO = Path(__file__).resolve().parents[3]


def _step(model, mask: torch.Tensor | None = None):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=gen)
    position_ids = torch.arange(SEQ).expand(2, SEQ)
    mask = torch.ones(2, SEQ) if mask is None else mask
    losses = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:], loss_mask=mask)    # [b, s]
    ((losses * mask).sum() / mask.sum()).backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant,model", [("cola", {}), ("elas", {}), ("elas", {"num_kv_heads": 4}),
                                           ("cola", {"attention_rank": 4, "lowrank_activation": "identity"})])
def test_separate_qkv_equals_the_fused_layout(world, variant, model):
    separate = build_model(tiny_config(variant, lowrank_parts="separate", **model), vocab_size=VOCAB)
    fused = build_model(tiny_config(variant, lowrank_parts="fused", **model), vocab_size=VOCAB)
    attn = separate.decoder.layers[0].self_attention
    assert isinstance(attn, ElasSelfAttention) and attn.separate_qkv
    assert isinstance(separate.decoder.layers[0].mlp, ColaMLP) == (variant == "cola")
    assert not getattr(fused.decoder.layers[0].self_attention, "separate_qkv", False)
    assert separate.state_dict().keys() == fused.state_dict().keys()
    losses, grads = _step(separate)
    want_losses, want_grads = _step(fused)
    torch.testing.assert_close(losses, want_losses, rtol=1e-6, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_separate_qkv_is_not_used_by_full_rank_attention(world):
    for cfg in (tiny_config("dense"), tiny_config("elas", lowrank_attention=False)):
        attn = build_model(cfg, vocab_size=VOCAB).decoder.layers[0].self_attention
        assert not getattr(attn, "separate_qkv", False)


def test_loss_backend_resolution(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_loss_backend("auto", "cpu") == "megatron"
    assert resolve_loss_backend("megatron", "cuda") == "megatron"
    with pytest.raises(ValueError, match="loss_backend=liger cannot run"):
        resolve_loss_backend("liger", "cpu")
    with pytest.raises(ValueError, match="loss_backend='fast' is unknown"):
        resolve_loss_backend("fast", "cpu")


LIGER_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    import torch.nn.functional as F
    from elas_megatron.kernels.cross_entropy import fused_linear_cross_entropy
    from elas_megatron.models.loss import FusedLossGPTModel
    from elas_megatron.models.gpt import build_model
    from elas_megatron.parallel.setup import destroy_parallel, initialize_parallel
    from elas_megatron.config.schema import ParallelConfig
    from conftest import SEQ, VOCAB, tiny_config
    from test_fused_paths import _step

    torch.manual_seed(0)
    # the op alone: a sum, a mean, a masked token mean
    N, h, V = 37, 16, 50
    x, w = torch.randn(N, h), torch.randn(V, h)
    t = torch.randint(0, V, (N,))
    keep = torch.rand(N) > 0.3
    for name, reduce in (("sum", lambda l, k: l.sum()), ("mean", lambda l, k: l.mean()),
                         ("masked mean", lambda l, k: (l * k).sum() / k.sum())):
        k = keep if name == "masked mean" else None
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        got = fused_linear_cross_entropy(a, b, t, k)
        reduce(got, keep).backward()
        c, d = x.clone().requires_grad_(), w.clone().requires_grad_()
        want = F.cross_entropy(c @ d.t(), t, reduction="none") * (keep if k is not None else 1)
        reduce(want, keep).backward()
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.grad, d.grad, rtol=1e-5, atol=1e-6)
    # whole tiny models: liger vs megatron, with a loss mask that drops tokens
    initialize_parallel(ParallelConfig(), seed=1234)
    mask = (torch.rand(2, SEQ, generator=torch.Generator().manual_seed(1)) > 0.25).float()
    for variant in ("dense", "cola", "elas"):
        fused = build_model(tiny_config(variant, loss_backend="liger"), vocab_size=VOCAB)
        plain = build_model(tiny_config(variant, loss_backend="megatron"), vocab_size=VOCAB)
        assert isinstance(fused, FusedLossGPTModel) and not isinstance(plain, FusedLossGPTModel)
        losses, grads = _step(fused, mask)
        want_losses, want_grads = _step(plain, mask)
        torch.testing.assert_close(losses * mask, want_losses * mask, rtol=1e-5, atol=1e-5)
        assert grads.keys() == want_grads.keys()
        for n, g in grads.items():
            torch.testing.assert_close(g, want_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    destroy_parallel()
    print("OK")
""")


def test_fused_loss_equals_megatrons_under_the_triton_interpreter():
    pytest.importorskip("triton")
    pytest.importorskip("liger_kernel")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    proc = subprocess.run([sys.executable, "-c", LIGER_SCRIPT, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-2000:] + proc.stderr[-4000:]
