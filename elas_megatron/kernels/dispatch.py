"""The one place that picks how the ELAS sparse core runs: plain-PyTorch reference or a fused GPU path.

``backend="auto"`` uses the fastest available path for the device and logs the choice once; naming a backend
explicitly fails loudly when it is unavailable.
"""
from __future__ import annotations

import torch

from elas_megatron.kernels.reference import relu2_sparse24_matmul_reference

BACKENDS = ("auto", "reference")


def relu2_sparse24_matmul(y1: torch.Tensor, weight: torch.Tensor, *, sparse: bool = True, grad_mode: str = "masked",
                          backend: str = "auto") -> torch.Tensor:
    """``sparse24(relu(y1)**2) @ weight`` through the chosen backend (see :mod:`elas_megatron.kernels.reference`)."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} is unknown; choose one of {BACKENDS}")
    return relu2_sparse24_matmul_reference(y1, weight, sparse=sparse, grad_mode=grad_mode)
