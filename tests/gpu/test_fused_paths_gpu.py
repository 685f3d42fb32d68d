# SPDX-License-Identifier: Apache-2.0
"""The speed switches on a GPU in bf16, each against its plain twin (CPU twins: tests/unit/models/test_fused_paths.py
and tests/unit/compat/test_multi_tensor.py): fused linear cross-entropy (Liger), separate q/k/v, foreach
multi-tensor optimizer ops; and the defaults a CUDA run resolves to."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]
SHAPE = ["model.hidden_size=256", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
         "model.ffn_hidden_size=1024", "model.rank=64", "train.seq_len=128", "train.dtype=bf16"]
VOCAB = 1000


def _model(megatron_world, *overrides):
    from elas_megatron.config import load_config
    from elas_megatron.models.gpt import build_model

    cfg = load_config(REPO / "configs/demo.yaml", [*SHAPE, *overrides])
    return build_model(cfg, vocab_size=VOCAB).cuda().bfloat16()


def _step(model, mask):
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, VOCAB, (4, 129), device="cuda", generator=gen)
    pos = torch.arange(128, device="cuda").expand(4, -1)
    losses = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:], loss_mask=mask)
    ((losses.float() * mask).sum() / mask.sum()).backward()
    return losses.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("variant", ["dense", "elas"])
def test_liger_loss_matches_megatrons_in_bf16(megatron_world, variant):
    from elas_megatron.models.loss import FusedLossGPTModel

    megatron_world()
    mask = (torch.rand(4, 128, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)) > 0.2).float()
    torch.manual_seed(0)
    fused = _model(megatron_world, f"model.variant={variant}", "model.loss_backend=liger")
    torch.manual_seed(0)
    plain = _model(megatron_world, f"model.variant={variant}", "model.loss_backend=megatron")
    assert isinstance(fused, FusedLossGPTModel) and not isinstance(plain, FusedLossGPTModel)
    plain.load_state_dict(fused.state_dict())
    losses, grads = _step(fused, mask)
    want, want_grads = _step(plain, mask)
    assert _rel(losses * mask, want * mask) < 1e-2
    for name, grad in grads.items():
        assert _rel(grad, want_grads[name]) < 3e-2, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_swiglu_matches_the_plain_expression(dtype):
    from elas_megatron.kernels.swiglu import swiglu, swiglu_reference

    g, u = (torch.randn(3, 1000, 1368, device="cuda", dtype=dtype) for _ in range(2))
    dy = torch.randn_like(g)
    a, b, c, d = (t.clone().requires_grad_() for t in (g, u, g, u))
    y, want = swiglu(a, b), swiglu_reference(c, d)
    y.backward(dy)
    want.backward(dy)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for got, ref in ((y, want), (a.grad, c.grad), (b.grad, d.grad)):
        assert _rel(got.float(), ref.float()) < tol


@pytest.mark.parametrize("variant", ["cola", "elas"])
def test_separate_parts_match_the_fused_layout_in_bf16(megatron_world, variant):
    megatron_world()
    mask = torch.ones(4, 128, device="cuda")
    separate = _model(megatron_world, f"model.variant={variant}", "model.lowrank_parts=separate")
    fused = _model(megatron_world, f"model.variant={variant}", "model.lowrank_parts=fused")
    fused.load_state_dict(separate.state_dict())
    assert separate.decoder.layers[0].self_attention.separate_qkv
    losses, grads = _step(separate, mask)
    want, want_grads = _step(fused, mask)
    assert _rel(losses, want) < 1e-2
    for name, grad in grads.items():
        assert _rel(grad, want_grads[name]) < 3e-2, name


def test_a_cuda_run_uses_the_fast_defaults_and_foreach_matches_megatron(tmp_path):
    from elas_megatron.cli.train import main

    small = [*SHAPE, "train.global_batch=16", "train.micro_batch=8", "train.eval_iters=1", "log.every=1",
             "checkpoint.save_final=false", "optim.warmup_steps=2", "train.steps=6",
             f"data.tokenizer={REPO / 'data/demo/tokenizer.model'}",
             f"data.train_prefixes=[{REPO / 'data/demo/tokens/demo_text_document'}]"]
    losses = {}
    for impl in ("foreach", "megatron"):
        run = tmp_path / impl
        assert main([str(REPO / "configs/demo.yaml"), *small, f"optim.multi_tensor_impl={impl}",
                     f"train.run_dir={run}"]) == 0
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[impl] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["foreach"]) == 6
    for a, b in zip(losses["foreach"], losses["megatron"]):
        assert abs(a - b) <= 2e-3 * abs(b)
