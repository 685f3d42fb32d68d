# SPDX-License-Identifier: Apache-2.0
"""RMSNorm for the local (non-Transformer-Engine) spec that also works under sequence parallelism.

megatron-core's local spec uses ``WrappedTorchNorm`` (``torch.nn.RMSNorm``), which refuses
``sequence_parallel=True``: under SP each TP rank normalises only its share of the sequence, so the gain's
gradient is a partial sum that must be summed over the TP group. This module computes exactly what
``torch.nn.RMSNorm`` computes (same function, same parameter name ``weight``) and marks the gain with
``weight.sequence_parallel = True``, the attribute megatron's ``finalize_model_grads`` uses to all-reduce it.
TE's ``TENorm`` does the same for the TE spec.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["RMSNorm"]


class RMSNorm(torch.nn.Module):
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last dimension (LLaMA's norm, no bias).

    Args:
        config: megatron ``TransformerConfig`` (only ``sequence_parallel`` and ``normalization`` are read).
        hidden_size: normalised width.
        eps: numerical floor (``model.norm_eps``).
        persist_layer_norm, zero_centered_gamma, normalization: accepted for megatron's norm-builder contract;
            only the plain RMSNorm is implemented.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                 normalization: str = "RMSNorm") -> None:
        super().__init__()
        if config.normalization != "RMSNorm" or zero_centered_gamma or config.layernorm_zero_centered_gamma:
            raise NotImplementedError(f"elas_megatron RMSNorm implements plain RMSNorm only (got normalization="
                                      f"{config.normalization!r}, zero_centered_gamma={zero_centered_gamma})")
        self.hidden_size = hidden_size
        self.eps = eps
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
