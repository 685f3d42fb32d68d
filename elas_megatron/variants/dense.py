# SPDX-License-Identifier: Apache-2.0
"""``dense``: full-rank LLaMA, megatron-core's stock local (or TE) layer spec unchanged, SwiGLU FFN."""
from __future__ import annotations

from typing import ClassVar

from elas_megatron.variants.base import Variant

__all__ = ["DenseVariant"]


class DenseVariant(Variant):
    """Everything is :class:`Variant`'s default: the stock layer, SwiGLU, a Hugging Face LLaMA on export."""
    name: ClassVar[str] = "dense"
    description: ClassVar[str] = "full-rank LLaMA (SwiGLU FFN)"
    hf_llama: ClassVar[bool] = True
