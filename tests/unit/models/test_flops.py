"""Analytic parameter counts (checked against built models) and training FLOPs per token."""
from __future__ import annotations

import pytest
from conftest import VOCAB, tiny_config

from elas_megatron.config.schema import ModelConfig
from elas_megatron.models.flops import (
    PAPER_SHAPES,
    count_parameters,
    flops_per_token,
    layer_matrix_parameters,
    paper_model_config,
)
from elas_megatron.models.gpt import build_model


@pytest.mark.parametrize("variant,model", [("dense", {}), ("cola", {}), ("elas", {}),
                                           ("cola", {"attention_rank": 4, "num_kv_heads": 4}),
                                           ("elas", {"lowrank_attention": False})])
def test_counts_match_the_built_model(world, variant, model):
    cfg = tiny_config(variant, **model)
    built = build_model(cfg, vocab_size=VOCAB)
    counts = count_parameters(cfg.model, VOCAB)
    assert counts["total"] == sum(p.numel() for p in built.parameters())
    layer = built.decoder.layers[0]
    assert counts["attention_per_block"] == sum(p.numel() for p in layer.self_attention.parameters())
    assert counts["ffn_per_block"] == sum(p.numel() for p in layer.mlp.parameters())
    assert counts["embedding"] == built.embedding.word_embeddings.weight.numel()


def test_paper_60m_elas_builds_with_the_counted_parameters(world):
    cfg = tiny_config("elas")
    cfg.model = paper_model_config("60M", "elas")
    assert sum(p.numel() for p in build_model(cfg, vocab_size=32000).parameters()) == count_parameters(
        cfg.model, 32000)["total"]


def test_paper_sizes_reproduce_colas_reported_counts():
    # CoLA (arXiv 2502.10940) reports full-rank LLaMA vs CoLA: 58M/43M, 134M/94M, 368M/185M, 1339M/609M.
    reported = {"60M": (58, 43), "130M": (134, 94), "350M": (368, 185), "1B": (1339, 609)}
    for size, (dense, cola) in reported.items():
        totals = [count_parameters(paper_model_config(size, v), 32000)["total"] / 1e6 for v in ("dense", "cola")]
        assert abs(totals[0] - dense) / dense < 0.01 and abs(totals[1] - cola) / cola < 0.01, (size, totals)
    assert PAPER_SHAPES["1B"]["ffn_hidden_size"] % 32 == 0


def test_flops_formula():
    m = paper_model_config("60M", "dense")
    c = count_parameters(m, 32000)
    matmul = c["blocks"] - m.num_layers * c["norms_per_block"] + c["output_layer"]
    assert flops_per_token(m, 32000, 256) == 6 * matmul + 12 * m.num_layers * m.hidden_size * 256
    elas = paper_model_config("60M", "elas")
    saved = flops_per_token(elas, 32000, 256) - flops_per_token(elas, 32000, 256, sparse_as_dense=False)
    assert saved == 2 * elas.num_layers * elas.ffn_hidden_size * elas.rank
    assert flops_per_token(elas, 32000, 256) < flops_per_token(paper_model_config("60M", "cola"), 32000, 256)


def test_layer_matrix_parameters_per_tp_rank_by_hand():
    h, f, r, ra, tp = 512, 1376, 128, 64, 4
    q, kv = h, 2 * (h // 8)                                      # 8 heads, 2 key/value heads
    cola = ModelConfig(variant="cola", hidden_size=h, num_heads=8, num_kv_heads=2, ffn_hidden_size=f, rank=r,
                       attention_rank=ra)
    c = count_parameters(cola, 32000)
    assert layer_matrix_parameters(cola) == {"attention": c["attention_per_block"], "ffn": c["ffn_per_block"],
                                             "a_down": 0}
    # column q|k|v: A [h, ra] x3 whole, B [ra, out / tp]; row o: A [q / tp, ra], B [ra, h] whole
    attention = 3 * h * ra + ra * (q + 2 * kv) // tp + q // tp * ra + ra * h
    ffn = 2 * h * r + 2 * r * f // tp + f // tp * r + r * h      # gate, up: A whole, B sharded; down: A sharded
    assert layer_matrix_parameters(cola, tp) == {"attention": attention, "ffn": ffn, "a_down": 0}
    elas = ModelConfig(variant="elas", hidden_size=h, num_heads=8, ffn_hidden_size=f, rank=r, lowrank_attention=False)
    assert layer_matrix_parameters(elas, tp) == {"attention": 4 * h * h // tp, "ffn": h * r + 2 * r * f // tp + r * h,
                                                 "a_down": f // tp * r}
