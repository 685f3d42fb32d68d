# SPDX-License-Identifier: Apache-2.0
"""``elas``: ELAS (arXiv 2605.03667), CoLA attention and a non-gated low-rank squared-ReLU FFN with 2:4 sparsity.

FFN: :class:`~elas_megatron.layers.mlp.ElasMLP`, ``sigma(sparse24(relu(sigma(x A_up) B_up) ** 2) A_down) B_down``,
whose sparse core runs on ``model.kernel_backend``. Only this variant has the 2:4 options (``model.sparse24``,
``sparse24_grad``, ``dense_warmup_steps``) and the trainer's density checks.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from elas_megatron.variants.cola import LowRankVariant

if TYPE_CHECKING:
    from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

    from elas_megatron.config.schema import ModelConfig
    from elas_megatron.layers.specs import SpecContext
    from elas_megatron.variants.base import ActivationTerms

__all__ = ["ElasVariant"]


class ElasVariant(LowRankVariant):
    name: ClassVar[str] = "elas"
    description: ClassVar[str] = "cola with the non-gated squared-ReLU FFN whose activations are 2:4 sparse (ELAS)"
    sparsity: ClassVar[bool] = True
    standalone_mlp: ClassVar[str | None] = "relu2"
    export_renames: ClassVar[dict[str, str]] = {"mlp.linear_fc1.A": "mlp.up_proj.A",   # fc1 is up (no gate)
                                                "mlp.linear_fc1.B": "mlp.up_proj.B"}

    def configure_layer(self, layer: TransformerLayerSubmodules, m: ModelConfig, ctx: SpecContext) -> None:
        from elas_megatron.layers.mlp import elas_mlp_spec
        from elas_megatron.layers.specs import replace_mlp

        super().configure_layer(layer, m, ctx)
        spec = elas_mlp_spec(rank=m.rank, activation=m.lowrank_activation, sparse24=m.sparse24,
                             sparse24_grad=m.sparse24_grad, kernel_backend=ctx.kernel_backend)
        sparsity = f"2:4 {m.sparse24_grad}-grad" if m.sparse24 else "computed dense (model.sparse24=false)"
        replace_mlp(layer, spec, ctx, self.name, f"rank {m.rank}, sigma={m.lowrank_activation}, {sparsity}")

    def gated(self, m: ModelConfig) -> bool:
        return False

    def activation(self, m: ModelConfig) -> Callable[..., Any]:
        from megatron.core.activations import squared_relu

        return squared_relu

    def ffn_multiple(self, m: ModelConfig) -> int:
        return 4

    def ffn_multiple_reason(self) -> str:
        return "2:4 groups"

    def ffn_matrix_parameters(self, m: ModelConfig, tp: int = 1) -> int:
        h, f, r = m.hidden_size, m.ffn_hidden_size, m.rank
        return h * r + r * f // tp + (f // tp) * r + r * h                  # up column, down row (no gate)

    def sparse_operand_parameters(self, m: ModelConfig, tp: int = 1) -> int:
        return (m.ffn_hidden_size // tp) * m.rank                           # A_down multiplies the 2:4 activation

    def ffn_activation_terms(self, m: ModelConfig, terms: ActivationTerms) -> None:
        f, tp, e = m.ffn_hidden_size, terms.tp, terms.e
        terms.lowrank_column("fc1", m.hidden_size, 1, m.rank, terms.ffn)
        if terms.sparse and m.sparse24 and m.sparse24_grad == "masked":
            # 2 kept values of every 4 + a 4-bit code per group of 4: f/2 * e + f/8 bytes (9/16 of dense bf16)
            terms.add("s_compressed", (f / tp) * (e / 2 + 1 / 8), terms.ffn,
                      "2:4-compressed sparse24(relu(y1)^2), input of A_down")
        else:
            terms.add("s_dense", e * f / tp, terms.ffn, "relu(y1) (dense phase / masked-dense grad)")
        terms.lowrank_row("fc2", m.rank, terms.ffn)

    def dense_phase(self, m: ModelConfig) -> bool:
        """The activation peak is the dense one: a dense warm-up, no 2:4 selection, or masked-dense gradients."""
        return m.dense_warmup_steps > 0 or not m.sparse24 or m.sparse24_grad != "masked"
