# SPDX-License-Identifier: Apache-2.0
"""Attention pieces for the layer specs: SDPA core attention and a self-attention with fused RoPE and q/k/v.

:class:`SDPAttention` -- core attention through ``torch.nn.functional.scaled_dot_product_attention`` for the
``core_attention`` slot.

megatron-core's local ``DotProductAttention`` materialises the ``[b, heads, s, s]`` score matrix (``baddbmm`` +
softmax + ``bmm``); without Transformer Engine that is the only core attention of the local spec. SDPA picks
the flash / memory-efficient / cuDNN kernels on CUDA and a fused math path on CPU, with the same result. Used
when ``model.attention_backend`` resolves to ``sdpa``. It is a pure function of q/k/v: no parameters.

:class:`ElasSelfAttention` -- megatron's ``SelfAttention`` with q and k rotated by one Triton pass each
(:mod:`elas_megatron.kernels.rope`) instead of megatron's unfused RoPE (``model.rope_backend=triton``), and with
q, k and v taken from a low-rank ``linear_qkv`` without the fused-layout copies (``model.lowrank_parts=separate``).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from elas_megatron.kernels.rope import fused_rope, fused_rope_unavailable_reason

__all__ = ["ElasSelfAttention", "SDPAttention"]


class SDPAttention(MegatronModule):
    """Causal softmax attention ``[s, b, heads, dim]`` x3 -> ``[s, b, heads * dim]``, via torch SDPA.

    Same constructor and forward contract as megatron's ``DotProductAttention``. Grouped-query attention is
    handled by SDPA's ``enable_gqa`` (no repeated k/v in memory). Masking follows ``DotProductAttention``: an
    explicit ``attention_mask`` (bool, True = masked out, broadcastable to ``[b, heads, sq, sk]``) is used when
    given; otherwise the layer's ``attn_mask_type`` decides (causal -> ``is_causal=True``, the fast path).
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: ProcessGroupCollection | None = None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("SDPAttention does not implement context parallelism; use the TE spec")
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise NotImplementedError("SDPAttention supports vanilla softmax without sliding windows only")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.head_dim = config.kv_channels
        self.heads_local = divide(config.num_attention_heads, tp_size)
        # NOTE: apply_query_key_layer_scaling only moves a factor layer_number between the score GEMM and an fp32
        # softmax in DotProductAttention; the factors cancel, so SDPA uses the plain scale.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> torch.Tensor:
        """q ``[sq, b, np, hn]``, k/v ``[sk, b, ng, hn]`` -> ``[sq, b, np * hn]``."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention does not support packed sequences or attention bias")
        mask_type = attn_mask_type or self.attn_mask_type
        sq, b = query.shape[:2]
        q = query.permute(1, 2, 0, 3)                     # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)                       # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        mask = None if attention_mask is None else ~attention_mask
        is_causal = mask is None and mask_type == AttnMaskType.causal and sq > 1
        dropout_p = self.dropout_p if self.training else 0.0
        # Heads differ per TP rank, so dropout draws from the model-parallel RNG stream (as DotProductAttention).
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p > 0 and not self.config.sequence_parallel
               else contextlib.nullcontext())
        with rng:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.softmax_scale,
                enable_gqa=q.shape[1] != k.shape[1])      # [b, np, sq, hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)            # [sq, b, np * hn]


class ElasSelfAttention(SelfAttention):
    """megatron's ``SelfAttention`` with two optional shortcuts; same parameters and checkpoint keys.

    * ``fused_rope``: q and k are rotated by :func:`~elas_megatron.kernels.rope.fused_rope` (one Triton pass
      each, ``model.rope_backend=triton``) instead of megatron's unfused RoPE. megatron applies RoPE deep inside
      its long ``forward``; rather than copy that method, this class takes the rotary angles out of the call
      (megatron then skips its own RoPE) and rotates q and k at the end of ``get_query_key_value_tensors``, the
      step right before, where megatron would have.
    * ``separate_qkv``: with a low-rank ``linear_qkv`` (:class:`~elas_megatron.layers.low_rank.
      LowRankQKVColumnParallelLinear`), q, k and v come from its three ``B`` products directly
      (``model.lowrank_parts=separate``) instead of being concatenated into megatron's fused ``q|k|v`` layout and
      split again: the same values without a ``[tokens, q + 2 kv]`` copy in the forward and the backward.

    Calls the shortcuts do not cover (inference KV caches, packed sequences, per-layer ``no_rope``, interleaved
    RoPE, output gates, q/k norms, fewer query groups than TP ranks) go through megatron's path unchanged; tensors
    the RoPE kernel refuses (CPU, odd shapes) get megatron's unfused RoPE at the same place.
    """

    _rope_freqs: tuple[torch.Tensor, torch.Tensor] | None = None

    def __init__(self, *args, fused_rope: bool = False, separate_qkv: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fused_rope = fused_rope
        self.separate_qkv = (separate_qkv and hasattr(self.linear_qkv, "query_key_value")
                             and self.config.num_query_groups >= self.world_size
                             and all(norm is None or isinstance(norm, IdentityOp)
                                     for norm in (self.q_layernorm, self.k_layernorm)))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                key_value_states: torch.Tensor | None = None, inference_context=None, rotary_pos_emb=None,
                *args, **kwargs):
        freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb, rotary_pos_emb)
        if (not self.fused_rope or rotary_pos_emb is None or freqs[0] is None or freqs[1] is None
                or inference_context is not None or kwargs.get("inference_params") is not None
                or kwargs.get("packed_seq_params") is not None or self.config.no_rope_freq
                or self.config.rotary_interleaved or self.config.attention_output_gate):
            return super().forward(hidden_states, attention_mask, key_value_states, inference_context,
                                   rotary_pos_emb, *args, **kwargs)
        self._rope_freqs = freqs
        try:
            return super().forward(hidden_states, attention_mask, key_value_states, inference_context, None,
                                   *args, **kwargs)
        finally:
            self._rope_freqs = None

    def get_query_key_value_tensors(self, hidden_states: torch.Tensor, key_value_states: torch.Tensor | None = None,
                                    output_gate: bool = False, split_qkv: bool = True):
        if self.separate_qkv and split_qkv and not output_gate and key_value_states is None:
            query, key, value = self.linear_qkv.query_key_value(hidden_states)   # [s, b, np|ng, hn]
            if self.config.test_mode:
                self.run_realtime_tests()
            out = (query, key, value)
        else:
            out = super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate=output_gate,
                                                      split_qkv=split_qkv)
        if self._rope_freqs is None:
            return out
        query, key, *rest = out
        q_freqs, k_freqs = self._rope_freqs
        return (self._rotate(query, q_freqs), self._rotate(key, k_freqs), *rest)

    def _rotate(self, t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        if fused_rope_unavailable_reason(t, freqs) is None:
            return fused_rope(t, freqs)
        return apply_rotary_pos_emb(t, freqs, config=self.config)
