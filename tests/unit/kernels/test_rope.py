# SPDX-License-Identifier: Apache-2.0
"""Fused RoPE (elas_megatron.kernels.rope) against megatron's unfused RoPE, on CPU.

The Triton kernel runs under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess): values and gradients of
q/k views of a fused QKV tensor, then whole tiny models (dense and elas) trained a few steps with
model.rope_backend=triton and =megatron, which must give the same losses (fp32: the kernel computes in fp32, as
the reference, so only the order of two products differs). The GPU twin is tests/gpu/test_rope_gpu.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from elas_megatron.layers import specs

REPO = Path(__file__).resolve().parents[3]

SCRIPT = textwrap.dedent("""
    import json, sys, tempfile, torch
    from pathlib import Path
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from elas_megatron.kernels.rope import fused_rope, rope_reference
    torch.manual_seed(0)
    for s, b, heads, d in [(7, 3, 3, 8), (5, 2, 4, 12), (4, 1, 1, 6)]:
        mixed = torch.randn(s, b, heads, 3 * d)          # [s, b, heads, q|k|v] like megatron's split
        f = torch.outer(torch.arange(s + 2).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
        freqs = torch.cat((f, f), -1)[:, None, None, :]
        a, m = mixed.clone().requires_grad_(), mixed.clone().requires_grad_()
        y, want = fused_rope(a[..., d:2 * d], freqs), _apply_rotary_pos_emb_bshd(m[..., d:2 * d], freqs[:s])
        assert y.is_contiguous()
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y, rope_reference(mixed[..., d:2 * d], freqs[:s]), rtol=1e-6, atol=1e-6)
        g = torch.randn_like(y)
        ga, = torch.autograd.grad(y, a, g)
        gm, = torch.autograd.grad(want, m, g)
        torch.testing.assert_close(ga, gm, rtol=1e-6, atol=1e-6)
        assert ga[..., :d].abs().sum() == 0 and ga[..., 2 * d:].abs().sum() == 0
    from elas_megatron.cli.train import main
    from elas_megatron.layers import attention
    calls = []
    attention.fused_rope = lambda t, f, _k=attention.fused_rope: calls.append(1) or _k(t, f)
    repo = Path(sys.argv[1])
    tiny = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.ffn_hidden_size=64",
            "model.rank=8", "train.seq_len=16", "train.global_batch=4", "train.micro_batch=2", "train.eval_iters=1",
            "log.every=1", "checkpoint.save_final=false", "train.steps=3", "optim.warmup_steps=1",
            f"data.tokenizer={repo / 'data/demo/tokenizer.model'}",
            f"data.train_prefixes=[{repo / 'data/demo/tokens/demo_text_document'}]"]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("dense", "elas"):
            for rope in ("megatron", "triton"):
                calls.clear()
                run = Path(tmp) / f"{variant}_{rope}"
                assert main([str(repo / "configs/demo.yaml"), *tiny, f"model.variant={variant}",
                             f"model.rope_backend={rope}", f"train.run_dir={run}"]) == 0
                rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
                out[f"{variant}_{rope}"] = [r["loss"] for r in rows if "loss" in r]
                # 2 layers x (q, k) per forward; megatron's own path must not reach the kernel
                assert (len(calls) >= 12) == (rope == "triton"), (rope, len(calls))
    print("LOSSES", json.dumps(out))
""")


def test_fused_rope_matches_megatron_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    losses = json.loads(proc.stdout.split("LOSSES", 1)[1])
    for variant in ("dense", "elas"):
        ref, fused = losses[f"{variant}_megatron"], losses[f"{variant}_triton"]
        assert len(ref) == len(fused) == 3
        assert fused == pytest.approx(ref, rel=1e-5, abs=1e-5), variant


def test_rope_backend_resolution(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert specs.resolve_rope_backend("auto", "cpu") == "megatron"
    assert specs.resolve_rope_backend("megatron", "cuda") == "megatron"
    assert specs.resolve_rope_backend("auto", "cuda", spec="te") == "megatron"
    with pytest.raises(ValueError, match="rope_backend=triton cannot run: the model is not on a CUDA device"):
        specs.resolve_rope_backend("triton", "cpu")
    with pytest.raises(ValueError, match="rope_backend='fast' is unknown"):
        specs.resolve_rope_backend("fast", "cpu")


def test_layer_spec_asks_for_fused_rope_only_with_triton():
    from elas_megatron.config.schema import ModelConfig
    from elas_megatron.layers.attention import ElasSelfAttention
    from elas_megatron.variants import get_variant

    model = ModelConfig(variant="elas", lowrank_parts="fused")
    fused = specs.get_layer_spec(model, get_variant("elas"), attention_backend="local", rope_backend="triton")
    plain = specs.get_layer_spec(model, get_variant("elas"), attention_backend="local")
    assert fused.submodules.self_attention.module is ElasSelfAttention
    assert fused.submodules.self_attention.params["fused_rope"] is True
    assert plain.submodules.self_attention.module is not ElasSelfAttention
    assert repr(fused.submodules.self_attention.submodules) == repr(plain.submodules.self_attention.submodules)
