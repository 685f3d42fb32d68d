"""Layout-invariant initialisation: CoLA statistics, megatron's scaled output init, seeds, TP slicing."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import VOCAB, tiny_config
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

from elas_megatron.layers.low_rank import cola_init_std
from elas_megatron.models.gpt import build_model
from elas_megatron.models.init import _full_shape_and_slicer, global_parameter_names


def test_cola_factors_norms_and_full_rank_statistics(world):
    cfg = tiny_config("elas", hidden_size=256, num_heads=4, num_kv_heads=4, ffn_hidden_size=512, rank=64,
                      num_layers=2, init_std=0.02)
    params = dict(build_model(cfg, vocab_size=1024).named_parameters())
    checks = {
        "decoder.layers.0.mlp.linear_fc1.A": cola_init_std(256, 512, 64),      # A_up, B_up: in=h, out=d_ff
        "decoder.layers.0.mlp.linear_fc1.B": cola_init_std(256, 512, 64),
        "decoder.layers.1.mlp.linear_fc2.A": cola_init_std(512, 256, 64),      # A_down, B_down: in=d_ff, out=h
        "decoder.layers.1.self_attention.linear_qkv.A_k": cola_init_std(256, 256, 64),
        "decoder.layers.1.self_attention.linear_proj.B": cola_init_std(256, 256, 64),
        "embedding.word_embeddings.weight": 0.02,
        "output_layer.weight": 0.02,
    }
    for name, std in checks.items():
        p = params[name]
        assert abs(p.std().item() / std - 1) < 0.05, name
        assert abs(p.mean().item()) < 0.05 * std, name
    assert all((p == 1).all() for n, p in params.items() if "layernorm" in n)


def test_dense_output_projections_use_megatrons_depth_scaling(world):
    cfg = tiny_config("dense", hidden_size=256, num_heads=4, num_kv_heads=4, ffn_hidden_size=512, num_layers=8)
    params = dict(build_model(cfg, vocab_size=VOCAB).named_parameters())
    scaled = 0.02 / math.sqrt(2 * 8)
    for name in ("decoder.layers.3.self_attention.linear_proj.weight", "decoder.layers.3.mlp.linear_fc2.weight"):
        assert abs(params[name].std().item() / scaled - 1) < 0.05
    assert abs(params["decoder.layers.3.mlp.linear_fc1.weight"].std().item() / 0.02 - 1) < 0.05


def test_same_seed_same_weights_other_seed_other_weights(world):
    a = build_model(tiny_config("cola"), vocab_size=VOCAB).state_dict()
    b = build_model(tiny_config("cola"), vocab_size=VOCAB).state_dict()
    c = build_model(tiny_config("cola", seed=7), vocab_size=VOCAB).state_dict()
    weights = [k for k, v in a.items() if torch.is_tensor(v) and v.dim() == 2]
    assert all(torch.equal(a[k], b[k]) for k in weights)
    assert not any(torch.equal(a[k], c[k]) for k in weights)
    # every factor is its own draw: no two parameters share values
    assert len({a[k].flatten()[0].item() for k in weights}) == len(weights)


def test_global_names_follow_megatrons_layer_number(world):
    model = build_model(tiny_config("elas"), vocab_size=VOCAB)
    for layer in model.decoder.layers:   # pretend this chunk is the second stage of a 2-stage pipeline
        layer.layer_number += 2
    names = global_parameter_names(model)
    assert names["decoder.layers.0.mlp.linear_fc1.A"] == "decoder.layers.2.mlp.linear_fc1.A"
    assert names["decoder.layers.1.input_layernorm.weight"] == "decoder.layers.3.input_layernorm.weight"
    assert names["embedding.word_embeddings.weight"] == "embedding.word_embeddings.weight"


def test_tp_slicing_matches_megatrons_strided_split():
    full = torch.randn(16, 6)                       # e.g. SwiGLU fc1 [gate; up] over 2 ranks: stride 2
    for rank in range(2):
        expect = torch.empty(8, 6)
        _initialize_affine_weight_cpu(expect, 16, 6, 8, 0, lambda w: w.copy_(full), stride=2, rank=rank,
                                      world_size=2, skip_set_tensor_parallel_attributes=True)
        local = torch.empty(8, 6)
        local.tensor_model_parallel, local.partition_dim, local.partition_stride = True, 0, 2
        shape, slicer = _full_shape_and_slicer(local, 2, rank)
        assert shape == (16, 6)
        torch.testing.assert_close(slicer(full), expect, rtol=0, atol=0)


def test_fast_init_draws_the_weights_on_the_device_without_megatrons_initialisation(world):
    from elas_megatron.models.gpt import transformer_config

    cfg = tiny_config("cola", hidden_size=64, num_heads=4, num_kv_heads=4, ffn_hidden_size=128, rank=16,
                      num_layers=2)
    tconfig = transformer_config(cfg)
    model = build_model(cfg, vocab_size=VOCAB, config=tconfig, weight_init="fast")
    assert tconfig.perform_initialization is False
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if p.dim() == 1:
            assert torch.all(p == 1), name
        else:
            assert 0 < p.std() < 1, name
    exact = dict(build_model(cfg, vocab_size=VOCAB).named_parameters())
    assert not torch.equal(exact["output_layer.weight"], dict(model.named_parameters())["output_layer.weight"])
    with pytest.raises(ValueError, match="weight_init='slow' is unknown"):
        build_model(cfg, vocab_size=VOCAB, weight_init="slow")
