# SPDX-License-Identifier: Apache-2.0
"""megatron's ``GPTModel`` with the output layer and the cross-entropy fused (``model.loss_backend=liger``).

Only :meth:`GPTModel._postprocess` changes, and only for the training/evaluation call that has labels: the
final hidden states go to :func:`elas_megatron.kernels.cross_entropy.fused_linear_cross_entropy` together with
the output layer's weight, instead of through the output layer and megatron's vocab-parallel cross-entropy. The
result has megatron's contract (``[b, s]`` fp32 per-token losses). Calls the fused op does not cover (no labels,
inference, multi-token prediction, tied embeddings, tensor parallelism) take megatron's path unchanged. Same
parameters and checkpoint keys as ``GPTModel``.
"""
from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.utils import get_pg_size

from elas_megatron.kernels.cross_entropy import fused_linear_cross_entropy

__all__ = ["FusedLossGPTModel", "FusedOutputLoss"]


class FusedOutputLoss(torch.nn.Module):
    """The fused op as a module of its own (no parameters: it reads the output layer's weight), so that hooks by
    module name -- the benchmarks' time split -- see the output layer + loss where the logits GEMM would be."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                keep: torch.Tensor | None) -> torch.Tensor:
        return fused_linear_cross_entropy(hidden, weight, target, keep)


class FusedLossGPTModel(GPTModel):
    """``GPTModel`` whose loss is computed by the fused linear cross-entropy (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.output_loss = FusedOutputLoss()

    def _fused_loss_applies(self, labels, kwargs: dict) -> bool:
        return (labels is not None and self.post_process and not kwargs.get("mtp_in_postprocess")
                and self.config.mtp_num_layers is None and kwargs.get("inference_context") is None
                and not self.share_embeddings_and_output_weights and get_pg_size(self.output_layer.tp_group) == 1
                and not self.output_layer.sequence_parallel)

    def _postprocess(self, hidden_states, labels=None, loss_mask=None, **kwargs):
        if not self._fused_loss_applies(labels, kwargs):
            return super()._postprocess(hidden_states=hidden_states, labels=labels, loss_mask=loss_mask, **kwargs)
        s, b, h = hidden_states.shape
        target = labels.transpose(0, 1).reshape(-1)                                 # [s * b]
        keep = None if loss_mask is None else loss_mask.transpose(0, 1).reshape(-1) != 0
        loss = self.output_loss(hidden_states.reshape(s * b, h), self.output_layer.weight, target, keep)
        return loss.view(s, b).transpose(0, 1).contiguous()                          # [b, s], as megatron's
