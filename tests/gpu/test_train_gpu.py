"""The integrated training path on a GPU: bf16, SDPA attention, the fused ELAS kernels, MFU/memory logging."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]
SMALL = ["model.hidden_size=256", "model.num_layers=4", "model.num_heads=4", "model.ffn_hidden_size=1024",
         "model.rank=64", "train.seq_len=128", "train.global_batch=32", "train.micro_batch=16", "train.eval_iters=2",
         "log.every=1", "checkpoint.save_final=false", "optim.warmup_steps=2", "model.dense_warmup_steps=2",
         f"data.tokenizer={REPO / 'data/demo/tokenizer.model'}",
         f"data.train_prefixes=[{REPO / 'data/demo/tokens/demo_text_document'}]"]


@pytest.mark.parametrize("variant", ["dense", "cola", "elas"])
def test_bf16_training_logs_mfu_and_memory(tmp_path, variant):
    from elas_megatron.cli.train import main

    assert main([str(REPO / "configs/demo.yaml"), *SMALL, f"model.variant={variant}", "train.steps=12",
                 f"train.run_dir={tmp_path}"]) == 0
    steps = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert len(steps) == 12 and all(r["loss"] == r["loss"] for r in steps)
    assert {"mfu", "mem_peak_gib", "tokens_per_s"} <= set(steps[-1])
    assert 0 < steps[-1]["mfu"] < 1 and steps[-1]["mem_peak_gib"] > 0
    assert sum(r["loss"] for r in steps[-3:]) < sum(r["loss"] for r in steps[:3])


def test_elas_mlp_fused_path_matches_reference_in_bf16(megatron_world):
    from elas_megatron.config import load_config
    from elas_megatron.models.gpt import build_model

    megatron_world()
    outs = {}
    for backend in ("reference", "auto"):
        cfg = load_config(REPO / "configs/demo.yaml", ["model.ffn_hidden_size=1024", "model.hidden_size=256",
                                                       "model.num_heads=4", "train.dtype=bf16"])
        torch.manual_seed(0)
        model = build_model(cfg, vocab_size=512).cuda().bfloat16()
        for module in model.modules():
            if hasattr(module, "kernel_backend"):
                module.kernel_backend = backend
        ids = torch.randint(0, 512, (4, 128), device="cuda")
        pos = torch.arange(128, device="cuda").expand(4, -1)
        loss = model(ids, pos, None, labels=ids).float().mean()
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        outs[backend] = (loss.detach(), grads)
    (l_ref, g_ref), (l_gpu, g_gpu) = outs["reference"], outs["auto"]
    torch.testing.assert_close(l_gpu, l_ref, rtol=1e-2, atol=1e-2)
    assert ((g_gpu - g_ref).norm() / g_ref.norm()).item() < 3e-2
