"""The per-GPU memory estimate against hand calculations of the formulas in docs/launch.md."""
from __future__ import annotations

import pytest

from elas_megatron.config.schema import Config, ModelConfig, ParallelConfig, TrainConfig
from elas_megatron.models.flops import count_parameters
from elas_megatron.training.memory import (
    estimate_memory,
    in_flight_chunks,
    layer_activation_terms,
    parameters_per_gpu,
    stage_layers,
    state_bytes_per_param,
)

H, F, R, HEADS, L, V, SEQ, MICRO = 512, 1376, 128, 8, 8, 32000, 256, 4   # the paper's 60M shape
TOKENS = MICRO * SEQ


def cfg60m(variant: str, **parallel) -> Config:
    return Config(model=ModelConfig(variant=variant, hidden_size=H, num_layers=L, num_heads=HEADS,
                                    ffn_hidden_size=F, rank=R),
                  parallel=ParallelConfig(**parallel),
                  train=TrainConfig(seq_len=SEQ, micro_batch=MICRO, global_batch=8 * MICRO, dtype="bf16"))


# Bytes per token of one layer, written out term by term (bf16: 2 bytes; SDPA attention; fused SwiGLU):
DENSE_LAYER = (2 * H + 4 + 2 * H          # input-norm input, its fp32 1/rms, its output (linear_qkv input)
               + 2 * 3 * H + 2 * 2 * H    # fused q|k|v output, q and k after RoPE
               + 4 * HEADS + 2 * H        # fp32 log-sum-exp per head, SDPA output = linear_proj input
               + 2 * H + 4 + 2 * H        # pre-MLP norm input, 1/rms, output
               + 2 * 2 * F + 2 * F)       # SwiGLU input [gate|up], its output (linear_fc2 input)
A_CAT = 2 * H * 3 * R / TOKENS            # [A_q|A_k|A_v] concatenated: saved once per micro-batch
LOWRANK_ATTENTION = A_CAT + 2 * (3 * R + 3 * R) + 2 * (R + R)   # qkv: x A (SiLU input), sigma(x A); o: z, sigma(z)
COLA_LAYER = (DENSE_LAYER + LOWRANK_ATTENTION
              + 2 * H * 2 * R / TOKENS + 2 * (2 * R + 2 * R)   # gate/up: [A_gate|A_up], x A, sigma(x A)
              + 2 * (R + R))                                   # down: z, sigma(z)
ELAS_LAYER = (DENSE_LAYER - (2 * 2 * F + 2 * F) + LOWRANK_ATTENTION
              + 2 * (R + R)                # up: x A_up, sigma(x A_up)
              + F * (2 / 2 + 1 / 8)        # compressed s: F/2 bf16 values + a 4-bit code per group of 4
              + 2 * (R + R))               # down: z, sigma(z)
LOGITS = 2 * 2 * H + 4 * V + 2 * V         # final-norm input and output, fp32 logits, their bf16 gradient


@pytest.mark.parametrize("variant, expected", [("dense", DENSE_LAYER), ("cola", COLA_LAYER), ("elas", ELAS_LAYER)])
def test_layer_activation_bytes_per_token_match_the_hand_formula(variant, expected):
    assert sum(t.bytes_per_token for t in layer_activation_terms(cfg60m(variant))) == pytest.approx(expected)


def test_dense_layer_is_2_bytes_times_10h_plus_3f_plus_lse_and_norm_stats():
    assert DENSE_LAYER == 2 * (10 * H + 3 * F) + 4 * HEADS + 8


def test_elas_dense_warmup_saves_relu_y1_dense():
    terms = {t.name: t.bytes_per_token for t in layer_activation_terms(cfg60m("elas"), sparse=False)}
    assert terms["s_dense"] == 2 * F and "s_compressed" not in terms


def test_tensor_and_sequence_parallel_shard_the_right_terms():
    full = {t.name: t.bytes_per_token for t in layer_activation_terms(cfg60m("elas"))}
    tp = {t.name: t.bytes_per_token for t in layer_activation_terms(cfg60m("elas"), tp=2, sequence_parallel=False)}
    sp = {t.name: t.bytes_per_token for t in layer_activation_terms(cfg60m("elas"), tp=2, sequence_parallel=True)}
    for name in ("qkv_out", "attn_lse", "proj_in", "s_compressed"):       # inside the TP region: always / tp
        assert tp[name] == sp[name] == full[name] / 2
    for name in ("attn_norm_in", "fc1_in", "qkv_sigma_in", "proj_b_in", "fc2_sigma_in"):  # / tp only with SP
        assert tp[name] == full[name] and sp[name] == full[name] / 2
    for name in ("qkv_b_in", "fc1_b_in", "qkv_a_cat"):   # gathered input of a column layer's B, replicated A
        assert tp[name] == sp[name] == full[name]


def test_whole_gpu_activations_under_each_recompute_option():
    est = estimate_memory(cfg60m("dense"), world_size=1, vocab_size=V)
    by_mode = est.stages[0].activations_by_recompute
    attn_internal = 4 * HEADS                           # what selective (core-attention) recompute drops
    ffn_internal = 2 * 2 * F + 2 * F                    # what FFN recompute drops
    assert by_mode["none"] == pytest.approx((L * DENSE_LAYER + LOGITS) * TOKENS)
    assert by_mode["selective"] == pytest.approx((L * (DENSE_LAYER - attn_internal) + attn_internal + LOGITS) * TOKENS)
    assert by_mode["ffn"] == pytest.approx((L * (DENSE_LAYER - ffn_internal) + ffn_internal + LOGITS) * TOKENS)
    # full: every layer's input, plus one layer's internals re-created during its backward
    assert by_mode["full"] == pytest.approx((L * 2 * H + (DENSE_LAYER - 2 * H) + LOGITS) * TOKENS)


def test_parameters_per_gpu_equal_the_model_counts_at_tp1():
    for variant in ("dense", "cola", "elas"):
        m = cfg60m(variant).model
        assert parameters_per_gpu(cfg60m(variant), V) == [count_parameters(m, V)["total"]]


def test_parameters_per_gpu_under_tp2_by_hand():
    dense_tp2 = (2 * V * H + L * (4 * H * H + 3 * H * F)) // 2 + L * 2 * H + H
    assert parameters_per_gpu(cfg60m("dense", tp=2), V) == [dense_tp2]
    attn = 3 * H * R + R * 3 * H // 2 + (H // 2) * R + R * H    # A_qkv replicated, B_qkv and A_o sharded, B_o whole
    ffn = H * R + R * F // 2 + (F // 2) * R + R * H              # A_up whole, B_up and A_down sharded, B_down whole
    elas_tp2 = V * H // 2 * 2 + L * (attn + ffn + 2 * H) + H
    assert parameters_per_gpu(cfg60m("elas", tp=2), V) == [elas_tp2]


def test_pipeline_stages_hold_their_layers_and_the_embeddings():
    cfg = cfg60m("dense", pp=2)
    layer = (4 * H * H + 3 * H * F) + 2 * H
    assert parameters_per_gpu(cfg, V) == [4 * layer + V * H, 4 * layer + V * H + H]
    uneven = Config(model=ModelConfig(variant="dense", num_layers=10),
                    parallel=ParallelConfig(pp=4, first_stage_layers=1, last_stage_layers=3))
    assert stage_layers(uneven) == [1, 3, 3, 3]


@pytest.mark.parametrize("optimizer, zero, dp, expected", [
    ("megatron", 0, 8, (2, 4, 12)),          # 18 bytes/param replicated
    ("megatron", 1, 8, (2, 4, 12 / 8)),      # distributed optimizer: 6 + 12/dp
    ("deepspeed", 1, 4, (2, 4, 3)),
    ("deepspeed", 2, 4, (2, 1, 3)),
    ("deepspeed", 3, 4, (0.5, 1, 3)),
])
def test_model_state_bytes_per_param(optimizer, zero, dp, expected):
    got = state_bytes_per_param(cfg60m("dense", optimizer=optimizer, zero_stage=zero), dp)
    assert (got["weights"], got["grads"], got["optimizer"]) == pytest.approx(expected)


def test_fp32_runs_keep_no_master_copy():
    cfg = Config(train=TrainConfig(dtype="fp32"))
    assert state_bytes_per_param(cfg, 1) == {"weights": 4, "grads": 4, "optimizer": 8}


def test_in_flight_micro_batches_of_the_pipeline_schedules():
    assert in_flight_chunks(1, None, 0, 16) == 1
    assert [in_flight_chunks(4, None, s, 16) for s in range(4)] == [4, 3, 2, 1]
    assert in_flight_chunks(4, None, 0, 2) == 2
    # interleaved, 2 chunks per stage: stage 0 holds 2(pp-1) + (vpp-1) pp + 1 = 11 chunk passes of L/8 layers,
    # i.e. L (1 + (pp-1)/(pp vpp)) layers' worth (Korthikanti et al. 2022)
    assert in_flight_chunks(4, 2, 0, 16) == 11
    assert in_flight_chunks(4, 2, 0, 3) == 6


def test_peak_stage_and_distributed_optimizer_in_the_estimate():
    cfg = cfg60m("elas", pp=2, zero_stage=1)
    est = estimate_memory(cfg, world_size=8, vocab_size=V)
    assert est.dp == 4 and est.num_microbatches == 2
    params0 = parameters_per_gpu(cfg, V)[0]
    assert est.stages[0].optimizer == pytest.approx(params0 * 12 / 4)
    assert est.stages[0].weights + est.stages[0].grads == pytest.approx(params0 * 6)
    assert est.peak.total == max(st.total for st in est.stages)


# Activation bytes per token and layer measured on one H100 (torch 2.11, megatron-core 0.16.1, bf16, SDPA, fused
# ELAS kernels): (memory_allocated after the forward of a 4-layer minus a 2-layer 350M-shaped model) / 2 layers /
# (8 x 256 tokens). docs/launch.md, "Memory estimate", has the table.
MEASURED_H100_350M = {
    ("dense", "none"): 36496, ("dense", "selective"): 36744, ("dense", "ffn"): 20408,
    ("cola", "none"): 46322, ("cola", "selective"): 46258, ("cola", "ffn"): 25362, ("cola", "full"): 2048,
    ("elas", "none"): 30752, ("elas", "selective"): 30688, ("elas", "ffn"): 25522, ("elas", "full"): 2048,
}


@pytest.mark.parametrize("variant, recompute", sorted(MEASURED_H100_350M))
def test_estimate_is_within_3_percent_of_the_h100_measurement(variant, recompute):
    from elas_megatron.training.memory import layer_activation_bytes_per_token

    cfg = Config(model=ModelConfig(variant=variant, hidden_size=1024, num_layers=24, num_heads=16,
                                   ffn_hidden_size=2736, rank=256),
                 parallel=ParallelConfig(recompute=recompute), train=TrainConfig(seq_len=256, micro_batch=8))
    estimate = layer_activation_bytes_per_token(layer_activation_terms(cfg), recompute)
    assert estimate == pytest.approx(MEASURED_H100_350M[variant, recompute], rel=0.03)
