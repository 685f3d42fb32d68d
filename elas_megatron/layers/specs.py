# SPDX-License-Identifier: Apache-2.0
"""Layer specs of the variants: megatron-core's stock GPT layer spec with only some slots swapped.

The variant of ``model.variant`` (:mod:`elas_megatron.variants`) swaps its slots in a fresh stock spec
(:meth:`~elas_megatron.variants.base.Variant.configure_layer`, with the helpers :func:`swap_slot`,
:func:`lowrank_attention_slots` and :func:`replace_mlp` of this module). Built in: ``dense`` is megatron's
``get_gpt_layer_local_spec(normalization="RMSNorm")`` (or the Transformer Engine spec with ``model.spec=te``)
unchanged. ``cola`` swaps the attention projections (``linear_qkv``, ``linear_proj``) for the
low-rank modules of :mod:`elas_megatron.layers.low_rank` (unless ``model.lowrank_attention=false``) and the MLP
for megatron's own SwiGLU MLP with low-rank linears. ``elas`` is ``cola`` with :class:`ElasMLP` in the MLP slot.
Independently of the variant, ``core_attention`` becomes :class:`SDPAttention` when the attention backend is
``sdpa``, and the norms become :class:`elas_megatron.layers.norm.RMSNorm` under sequence parallelism with the
local spec (megatron's torch norm refuses SP).

Every swap is logged once, on rank 0.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from elas_megatron.layers.attention import ElasSelfAttention, SDPAttention
from elas_megatron.layers.low_rank import LowRankQKVColumnParallelLinear, LowRankRowParallelLinear
from elas_megatron.layers.norm import RMSNorm

if TYPE_CHECKING:  # the variant and config layers sit above this module
    from elas_megatron.config.schema import ModelConfig
    from elas_megatron.variants.base import Variant

__all__ = [
    "ATTENTION_BACKENDS",
    "SpecContext",
    "ROPE_BACKENDS",
    "get_final_norm",
    "get_layer_spec",
    "lowrank_attention_slots",
    "replace_mlp",
    "resolve_attention_backend",
    "resolve_rope_backend",
    "swap_slot",
    "te_available",
    "te_norm",
]

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "local", "sdpa")
ROPE_BACKENDS = ("auto", "megatron", "triton")
_logged: set[str] = set()  # swap messages already logged by this process (log each once)


@dataclass(frozen=True)
class SpecContext:
    """What a variant's slot swaps may depend on besides the model config."""
    te: bool
    """The Transformer Engine spec (``model.spec=te``): replaced fused TE linears carried a norm."""
    kernel_backend: str
    """``model.kernel_backend``: backend of the ELAS sparse core (:mod:`elas_megatron.kernels.dispatch`)."""


def te_available() -> bool:
    """True if Transformer Engine and megatron's TE spec import."""
    try:
        import transformer_engine  # noqa: F401  # pylint: disable=unused-import
        from megatron.core.extensions.transformer_engine import TENorm  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention_backend(requested: str, device: torch.device | str | None = None) -> str:
    """``model.attention_backend`` -> ``"local"`` or ``"sdpa"`` (``auto``: sdpa on CUDA, local on CPU)."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend={requested!r} is unknown; choose one of {ATTENTION_BACKENDS}")
    if requested != "auto":
        return requested
    if device is None:
        on_cuda = torch.cuda.is_available()
    else:
        on_cuda = torch.device(device).type == "cuda"
    return "sdpa" if on_cuda else "local"


def resolve_rope_backend(requested: str, device: torch.device | str | None = None, *, spec: str = "local") -> str:
    """``model.rope_backend`` -> ``"megatron"`` or ``"triton"`` (``auto``: triton on CUDA with the local spec).

    Raises:
        ValueError: unknown name, or ``triton`` where it cannot run (no CUDA device, no Triton, the TE spec).
    """
    if requested not in ROPE_BACKENDS:
        raise ValueError(f"model.rope_backend={requested!r} is unknown; choose one of {ROPE_BACKENDS}")
    from elas_megatron.kernels.rope import HAS_TRITON, interpreted

    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    why_not = ("the TE spec applies TE's own fused RoPE" if spec == "te" else
               "the model is not on a CUDA device" if not on_cuda and not interpreted() else
               "the `triton` package is not installed" if not HAS_TRITON else None)
    if requested == "auto":  # never the interpreter: it is for tests
        return "triton" if why_not is None and on_cuda else "megatron"
    if requested == "triton" and why_not is not None:
        raise ValueError(f"model.rope_backend=triton cannot run: {why_not}; use model.rope_backend=auto or megatron")
    return requested


def _name(slot: object) -> str:
    module = slot.module if isinstance(slot, ModuleSpec) else slot
    return getattr(module, "__name__", type(module).__name__)


def _log_swap(message: str) -> None:
    if message in _logged:
        return
    _logged.add(message)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        logger.info("layer spec: %s", message)


def _swap(owner: object, slot: str, new: object, where: str, note: str = "") -> None:
    old = getattr(owner, slot)
    setattr(owner, slot, new)
    _log_swap(f"{where}.{slot}: {_name(old)} -> {_name(new)}{f' ({note})' if note else ''}")


def te_norm() -> type:
    """Transformer Engine's ``TENorm`` (for a norm that a replaced fused TE linear carried)."""
    from megatron.core.extensions.transformer_engine import TENorm

    return TENorm


def swap_slot(owner: object, slot: str, new: object, where: str, note: str = "") -> None:
    """Set ``owner.slot = new`` and log ``where.slot: Old -> New (note)`` once (rank 0)."""
    _swap(owner, slot, new, where, note)


def lowrank_attention_slots(layer: TransformerLayerSubmodules, m: ModelConfig, ctx: SpecContext, where: str) -> None:
    """CoLA attention: low-rank q|k|v and o projections (rank ``model.attn_rank``) unless
    ``model.lowrank_attention=false``; with the TE spec the input norm becomes a separate ``TENorm``."""
    if not m.lowrank_attention:
        _log_swap(f"{where}: attention kept full-rank (model.lowrank_attention=false)")
        return
    attn = layer.self_attention.submodules
    params = {"rank": m.attn_rank, "activation": m.lowrank_activation}
    note = f"rank {m.attn_rank}, sigma={m.lowrank_activation}"
    _swap(attn, "linear_qkv", ModuleSpec(module=LowRankQKVColumnParallelLinear, params=params),
          f"{where} self_attention", note)
    _swap(attn, "linear_proj", ModuleSpec(module=LowRankRowParallelLinear, params=params),
          f"{where} self_attention", note)
    if ctx.te:  # TE's fused LayerNorm+Linear in linear_qkv carried the input norm
        _swap(layer, "input_layernorm", te_norm(), where, "the replaced TE linear_qkv carried the norm")


def replace_mlp(layer: TransformerLayerSubmodules, new_mlp: ModuleSpec, ctx: SpecContext, where: str,
                note: str) -> None:
    """Put ``new_mlp`` in the MLP slot; with the TE spec the pre-MLP norm becomes a separate ``TENorm``."""
    _swap(layer, "mlp", new_mlp, where, note)
    if ctx.te:  # TE's fused LayerNorm+Linear in linear_fc1 carried the pre-MLP norm
        _swap(layer, "pre_mlp_layernorm", te_norm(), where, "the replaced TE linear_fc1 carried the norm")


def _stock_spec(model_cfg: ModelConfig) -> ModuleSpec:
    if model_cfg.spec == "local":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return get_gpt_layer_local_spec(normalization="RMSNorm")
    if model_cfg.spec == "te":
        if not te_available():
            raise ImportError("model.spec=te needs Transformer Engine (pip install 'elas-megatron[te]' on a CUDA "
                              "machine); use model.spec=local for the pure-PyTorch layers")
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    raise ValueError(f"model.spec={model_cfg.spec!r} is unknown; choose 'local' or 'te'")


def get_layer_spec(model_cfg: ModelConfig, variant: Variant, *, sequence_parallel: bool = False, attention_backend: str,
                   kernel_backend: str | None = None, rope_backend: str = "megatron") -> ModuleSpec:
    """The transformer-layer ``ModuleSpec`` of ``model_cfg.variant``.

    Args:
        model_cfg: the ``model`` section (ranks, sparsity options, ``spec``).
        variant: the variant of ``model_cfg.variant`` (:func:`elas_megatron.variants.get_variant`), which swaps
            its slots.
        sequence_parallel: ``parallel.sequence_parallel``; with the local spec the norms become SP-aware.
        attention_backend: ``"local"``, ``"sdpa"`` or ``"auto"`` (see :func:`resolve_attention_backend`).
        kernel_backend: backend of the ELAS sparse core (:mod:`elas_megatron.kernels.dispatch`); None =
            ``model_cfg.kernel_backend``.
        rope_backend: ``"megatron"`` or ``"triton"`` (resolved by :func:`resolve_rope_backend`).
    Returns:
        A ``ModuleSpec`` for ``TransformerLayer``, usable as ``GPTModel(transformer_layer_spec=...)``.
    Raises:
        ValueError: unknown variant / attention backend; ImportError: ``spec=te`` without Transformer Engine.
    """
    backend = resolve_attention_backend(attention_backend)
    spec = _stock_spec(model_cfg)
    layer: TransformerLayerSubmodules = spec.submodules
    ctx = SpecContext(te=model_cfg.spec == "te",
                      kernel_backend=model_cfg.kernel_backend if kernel_backend is None else kernel_backend)
    variant.configure_layer(layer, model_cfg, ctx)
    if backend == "sdpa":
        _swap(layer.self_attention.submodules, "core_attention", SDPAttention, "self_attention",
              "model.attention_backend=sdpa")
    if rope_backend not in ("megatron", "triton"):
        raise ValueError(f"rope_backend={rope_backend!r}: resolve it first (resolve_rope_backend)")
    separate_qkv = model_cfg.lowrank_parts == "separate" and variant.lowrank_attention(model_cfg)
    if rope_backend == "triton" or separate_qkv:
        attn = layer.self_attention
        attn.module = ElasSelfAttention
        attn.params = {**attn.params, "fused_rope": rope_backend == "triton", "separate_qkv": separate_qkv}
        notes = [n for n, on in (("model.rope_backend=triton", rope_backend == "triton"),
                                 ("model.lowrank_parts=separate", separate_qkv)) if on]
        _log_swap(f"self_attention: SelfAttention -> {ElasSelfAttention.__name__} ({', '.join(notes)})")
    if sequence_parallel and not ctx.te:
        _swap(layer, "input_layernorm", RMSNorm, "layer", "sequence-parallel RMSNorm")
        _swap(layer, "pre_mlp_layernorm", RMSNorm, "layer", "sequence-parallel RMSNorm")
    mlp = layer.mlp
    if isinstance(mlp, ModuleSpec) and isinstance(mlp.module, type) and issubclass(mlp.module, MLP) \
            and model_cfg.ffn_hidden_size is not None:
        # megatron-core 0.16's TransformerLayer gives an MLP no ffn_hidden_size, and MLP warns (DeprecationWarning)
        # before taking config.ffn_hidden_size: the same width, passed explicitly
        mlp.params = {**mlp.params, "ffn_hidden_size": model_cfg.ffn_hidden_size}
    if ctx.te:
        # Where the variant replaced a fused TE LayerNorm+Linear, keep the dist-checkpoint keys of the separate
        # norm identical to the local spec's (which maps them to TE's fused names), so local and TE runs can
        # load each other's checkpoints. The stock TE layer (dense) keeps its fused linears: nothing to map.
        keys = layer.sharded_state_dict_keys_map
        if not _is_fused(layer.self_attention.submodules.linear_qkv):
            keys.setdefault("input_layernorm.", "self_attention.linear_qkv.layer_norm_")
        if not _is_fused(getattr(getattr(layer.mlp, "submodules", None), "linear_fc1", None)):
            keys.setdefault("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")
    return spec


def _is_fused(slot: object) -> bool:
    return slot is not None and "LayerNorm" in _name(slot)


def get_final_norm(model_cfg: ModelConfig, *, sequence_parallel: bool = False) -> type:
    """The block's final norm class: megatron's choice, or :class:`RMSNorm` for local spec + SP."""
    if model_cfg.spec == "te":
        return te_norm()
    if sequence_parallel:
        return RMSNorm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return WrappedTorchNorm
