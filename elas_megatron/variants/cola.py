# SPDX-License-Identifier: Apache-2.0
"""``cola``: CoLA (arXiv 2502.10940), every linear ``sigma(x A) B``; megatron's SwiGLU MLP with low-rank linears.

Attention: the low-rank q|k|v and o projections of :mod:`elas_megatron.layers.low_rank` (unless
``model.lowrank_attention=false``). FFN: :class:`~elas_megatron.layers.mlp.ColaMLP` with gate and up kept apart
(``model.lowrank_parts=separate``) or megatron's own MLP on the concatenated ``[gate | up]`` (``fused``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from elas_megatron.variants.base import Variant

if TYPE_CHECKING:
    from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

    from elas_megatron.config.schema import ModelConfig
    from elas_megatron.layers.specs import SpecContext
    from elas_megatron.variants.base import ActivationTerms

__all__ = ["ColaVariant", "LowRankVariant"]


class LowRankVariant(Variant):
    """Shared by the CoLA-style variants: low-rank attention projections, low-rank FFN factors' export names."""
    lowrank: ClassVar[bool] = True
    hf_reason: ClassVar[str] = "has low-rank layers"

    def configure_layer(self, layer: TransformerLayerSubmodules, m: ModelConfig, ctx: SpecContext) -> None:
        from elas_megatron.layers.specs import lowrank_attention_slots

        lowrank_attention_slots(layer, m, ctx, self.name)


class ColaVariant(LowRankVariant):
    name: ClassVar[str] = "cola"
    description: ClassVar[str] = "every linear is sigma(x A) B, SwiGLU FFN (CoLA)"

    def configure_layer(self, layer: TransformerLayerSubmodules, m: ModelConfig, ctx: SpecContext) -> None:
        from elas_megatron.layers.mlp import cola_mlp_spec
        from elas_megatron.layers.specs import replace_mlp

        super().configure_layer(layer, m, ctx)
        separate = m.lowrank_parts == "separate"
        replace_mlp(layer, cola_mlp_spec(rank=m.rank, activation=m.lowrank_activation, separate_parts=separate),
                    ctx, self.name, f"MLP with low-rank gate/up/down, rank {m.rank}, sigma={m.lowrank_activation}"
                    f"{', gate and up apart (model.lowrank_parts=separate)' if separate else ''}")

    def ffn_matrix_parameters(self, m: ModelConfig, tp: int = 1) -> int:
        h, f, r = m.hidden_size, m.ffn_hidden_size, m.rank
        return 2 * h * r + 2 * r * f // tp + (f // tp) * r + r * h          # gate/up column pair, down row

    def ffn_activation_terms(self, m: ModelConfig, terms: ActivationTerms) -> None:
        terms.lowrank_column("fc1", m.hidden_size, 2, m.rank, terms.ffn)
        super().ffn_activation_terms(m, terms)
        terms.lowrank_row("fc2", m.rank, terms.ffn)
