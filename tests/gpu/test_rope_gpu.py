# SPDX-License-Identifier: Apache-2.0
"""GPU: the fused RoPE kernel against megatron's unfused RoPE, and fused vs foreach AdamW, in whole training runs.

Tolerances: the kernel rotates in fp32 and rounds once, megatron's unfused bf16 ops round after each op, so bf16
outputs differ by about one bf16 ulp (2**-8 relative); fp32 agrees to 1e-6. Whole runs compare per-step losses
(bf16: relative 2e-3 over 6 steps; a wrong rotation, e.g. the backward's sign, moves them by far more).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]
SMALL = ["model.hidden_size=256", "model.num_layers=4", "model.num_heads=4", "model.ffn_hidden_size=1024",
         "model.rank=64", "train.seq_len=128", "train.global_batch=32", "train.micro_batch=16", "train.eval_iters=1",
         "log.every=1", "checkpoint.save_final=false", "optim.warmup_steps=2", "model.dense_warmup_steps=0",
         "train.steps=6", f"data.tokenizer={REPO / 'data/demo/tokenizer.model'}",
         f"data.train_prefixes=[{REPO / 'data/demo/tokens/demo_text_document'}]"]


def _freqs(s: int, d: int) -> torch.Tensor:
    f = torch.outer(torch.arange(s, device="cuda").float(),
                    1.0 / 10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    return torch.cat((f, f), -1)[:, None, None, :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s,b,heads,d", [(128, 4, 8, 64), (37, 3, 5, 128), (16, 2, 32, 96), (1024, 2, 16, 64)])
def test_fused_rope_matches_megatron(dtype, s, b, heads, d):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from elas_megatron.kernels.rope import fused_rope, rope_reference

    torch.manual_seed(0)
    mixed = torch.randn(s, b, heads, 3 * d, device="cuda", dtype=dtype)   # q|k|v per head, as megatron splits
    freqs = _freqs(s, d)
    a, m = mixed.clone().requires_grad_(), mixed.clone().requires_grad_()
    got, want = fused_rope(a[..., :d], freqs), _apply_rotary_pos_emb_bshd(m[..., :d], freqs)
    ref = rope_reference(mixed[..., :d], freqs)  # fp32 math, one rounding: what the kernel should match
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(got, want, rtol=2 * tol, atol=2 * tol)
    g = torch.randn_like(got)
    (ga,) = torch.autograd.grad(got, a, g)
    (gm,) = torch.autograd.grad(want, m, g)
    torch.testing.assert_close(ga, gm, rtol=2 * tol, atol=2 * tol)
    assert ga[..., d:].abs().sum() == 0


def _train(tmp_path: Path, name: str, *overrides: str, resume: bool = False) -> list[float]:
    from elas_megatron.cli.train import main

    run = tmp_path / name
    argv = [str(REPO / "configs/demo.yaml"), *SMALL, f"train.run_dir={run}", *overrides]
    assert main(argv + (["--resume"] if resume else [])) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("variant", ["dense", "elas"])
def test_training_with_fused_rope_matches_megatron_rope(tmp_path, variant):
    ref = _train(tmp_path, "megatron", f"model.variant={variant}", "model.rope_backend=megatron")
    fused = _train(tmp_path, "triton", f"model.variant={variant}", "model.rope_backend=triton")
    assert len(ref) == len(fused) == 6
    assert fused == pytest.approx(ref, rel=2e-3)


@pytest.mark.parametrize("backend", ["megatron", "deepspeed"])
def test_fused_adamw_matches_foreach_and_resumes(tmp_path, backend):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    layout = [f"parallel.optimizer={backend}", "parallel.zero_stage=1", "model.variant=elas"]
    foreach = _train(tmp_path, "foreach", *layout, "optim.adam_impl=foreach")
    fused = _train(tmp_path, "fused", *layout, "optim.adam_impl=fused")
    assert fused == pytest.approx(foreach, rel=2e-3)
    # interrupted at step 3 and resumed (the step counters must come back onto the device)
    part = [*layout, "optim.adam_impl=fused", "checkpoint.every=3", "train.steps=6"]
    _train(tmp_path, "part", *part)
    (tmp_path / "part" / "metrics.jsonl").unlink()
    import shutil

    ckpts = tmp_path / "part" / "checkpoints"
    for step_dir in ckpts.glob("step_*"):
        if step_dir.name != "step_00000003":
            shutil.rmtree(step_dir)
    (ckpts / "latest").write_text("step_00000003\n")
    resumed = _train(tmp_path, "part", *part, resume=True)
    assert len(resumed) == 3
    assert resumed == pytest.approx(fused[3:], rel=1e-4)
