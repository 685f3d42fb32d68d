"""Analytic parameter counts (checked against built models) and training FLOPs per token."""
from __future__ import annotations

import pytest
from conftest import VOCAB, tiny_config

from elas_megatron.models.flops import PAPER_SHAPES, count_parameters, flops_per_token, paper_model_config
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
