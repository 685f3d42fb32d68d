# SPDX-License-Identifier: Apache-2.0
"""Build the model: megatron-core's ``GPTModel`` from our config and the variant's layer spec.

No model code lives here: the network is ``megatron.core.models.gpt.GPTModel`` (LLaMA settings: RMSNorm, RoPE,
no biases, untied embeddings) and the variant (:mod:`elas_megatron.variants`) only changes the transformer-layer
spec (:func:`elas_megatron.layers.specs.get_layer_spec`) and its FFN settings of ``TransformerConfig``.
:func:`model_transformer_config` is the one translation from our schema to megatron's ``TransformerConfig``;
:func:`build_gpt` builds one model chunk (one pipeline / virtual pipeline stage) from the ``model`` and
``parallel`` sections and initialises it layout-invariantly (:mod:`elas_megatron.models.init`).
:func:`transformer_config` and :func:`build_model` do the same from a whole run ``Config``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Iterator

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from elas_megatron.compat.upstream_warnings import ignore_row_parallel_forward_tp_group
from elas_megatron.config.schema import Config, ModelConfig, ParallelConfig
from elas_megatron.layers.specs import (
    get_final_norm,
    get_layer_spec,
    resolve_attention_backend,
    resolve_rope_backend,
    te_available,
)
from elas_megatron.models.init import WEIGHT_INITS, initialize_weights, initialize_weights_fast
from elas_megatron.models.loss import FusedLossGPTModel
from elas_megatron.variants.registry import get_variant

__all__ = ["build_gpt", "build_model", "model_device", "model_transformer_config", "resolve_dtype",
           "resolve_loss_backend", "transformer_config"]

LOSS_BACKENDS = ("auto", "megatron", "liger")

logger = logging.getLogger(__name__)


def model_device(cfg: Config) -> torch.device:
    """The device the model lives on: ``train.device`` (``auto``: the current CUDA device, else CPU)."""
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def resolve_dtype(cfg: Config) -> torch.dtype:
    """``train.dtype`` -> compute dtype (``auto``: bf16 on CUDA, fp32 on CPU)."""
    if cfg.train.dtype == "bf16":
        return torch.bfloat16
    if cfg.train.dtype == "fp32":
        return torch.float32
    return torch.bfloat16 if model_device(cfg).type == "cuda" else torch.float32


def resolve_loss_backend(requested: str, device: torch.device | str, tp: int = 1) -> str:
    """``model.loss_backend`` -> ``"megatron"`` or ``"liger"`` (auto: liger where it can run).

    Raises:
        ValueError: unknown name, or ``liger`` where it cannot run (no liger-kernel, no CUDA device, tp > 1).
    """
    from elas_megatron.kernels.cross_entropy import liger_unavailable_reason

    if requested not in LOSS_BACKENDS:
        raise ValueError(f"model.loss_backend={requested!r} is unknown; choose one of {LOSS_BACKENDS}")
    if requested == "megatron":
        return requested
    why_not = liger_unavailable_reason(device) or (f"parallel.tp={tp}: the fused op covers tp=1 only"
                                                     if tp > 1 else None)
    if requested == "auto":
        return "liger" if why_not is None and torch.device(device).type == "cuda" else "megatron"
    if why_not is not None:
        raise ValueError(f"model.loss_backend=liger cannot run: {why_not}; use model.loss_backend=auto or megatron")
    return requested


def _recompute_kwargs(recompute: str) -> dict:
    if recompute == "none":
        return {}
    if recompute == "full":  # every layer recomputed from its input, one layer per checkpoint
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if recompute == "selective":  # megatron's default selective: the core attention (s x s scores)
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    if recompute == "ffn":  # megatron-core >= 0.13 can checkpoint the dense MLP submodule on its own
        return dict(recompute_granularity="selective", recompute_modules=["mlp"])
    raise ValueError(f"parallel.recompute={recompute!r} is unknown; choose none, full, selective or ffn")


def transformer_config(cfg: Config) -> TransformerConfig:
    """megatron-core ``TransformerConfig`` of a run (:func:`model_transformer_config` with the run's precision
    and device: ``train.dtype``, ``train.device``)."""
    return model_transformer_config(cfg.model, cfg.parallel, bf16=resolve_dtype(cfg) == torch.bfloat16,
                                    on_cuda=model_device(cfg).type == "cuda")


def model_transformer_config(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, *, bf16: bool,
                             on_cuda: bool) -> TransformerConfig:
    """megatron-core ``TransformerConfig`` of a model and parallel layout.

    Shape, LLaMA choices (RMSNorm, no bias, dropout 0), the variant's FFN (gated or not, its activation:
    :meth:`~elas_megatron.variants.base.Variant.transformer_kwargs`), the parallel layout (tp/pp/vpp/SP, uneven
    first/last stages), activation recomputation, and precision flags: parameters stay fp32 (``params_dtype``);
    with bf16 compute ``bf16=True`` and ``pipeline_dtype=bf16`` so that the trainer's ``Float16Module`` and the
    p2p buffers match. Fusions that need Apex/TE or CUDA are off on CPU (``on_cuda=False``).
    """
    m, p = model_cfg, parallel_cfg
    with warnings.catch_warnings():
        if m.spec == "local":
            # megatron-core warns on recompute_modules=["core_attn"] (parallel.recompute=selective) that TE's fused
            # attention may not need recomputing: advice about the TE spec, untrue of the local one
            warnings.filterwarnings("ignore", message="If you are using transformer_engine as the transformer "
                                    "implementation", category=UserWarning)
        return TransformerConfig(
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            num_attention_heads=m.num_heads,
            num_query_groups=m.kv_heads,
            kv_channels=m.hidden_size // m.num_heads,
            ffn_hidden_size=m.ffn_hidden_size,
            normalization="RMSNorm",
            layernorm_epsilon=m.norm_eps,
            add_bias_linear=False,
            add_qkv_bias=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=m.init_std,
            tensor_model_parallel_size=p.tp,
            pipeline_model_parallel_size=p.pp,
            virtual_pipeline_model_parallel_size=p.vpp,
            sequence_parallel=p.sequence_parallel,
            num_layers_in_first_pipeline_stage=p.first_stage_layers,
            num_layers_in_last_pipeline_stage=p.last_stage_layers,
            **_recompute_kwargs(p.recompute),
            params_dtype=torch.float32,
            bf16=bf16,
            pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_cpu_initialization=True,
            # Fusions: the jit-scripted bias/activation/dropout fusions only pay off on CUDA; the softmax, RoPE
            # and grad-accumulation fusions need Apex/TE kernels. The variant sets gated_linear_unit,
            # activation_func and bias_activation_fusion.
            **get_variant(m.variant).transformer_kwargs(m, on_cuda=on_cuda),
            bias_dropout_fusion=on_cuda,
            masked_softmax_fusion=False,
            gradient_accumulation_fusion=False,
            apply_rope_fusion=on_cuda and te_available(),
            persist_layer_norm=False,
            **_quiet_defaults(),
        )


def _quiet_defaults() -> dict:
    """Settings that only restate megatron's defaults in their current spelling.

    megatron-core 0.16's default ``cuda_graph_scope="full"`` warns on every construction that "full" is
    deprecated for its equivalent ``[]`` (the whole layer); CUDA graphs are not used here either way.
    """
    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    return {"cuda_graph_scope": []} if "cuda_graph_scope" in names else {}


@contextlib.contextmanager
def _quiet_unknown_mlp_warning() -> Iterator[None]:
    """TransformerLayer warns "Unknown MLP type" once per layer for any MLP class other than its own.

    ElasMLP takes the default keyword arguments on purpose (it finds the TP group itself), so that warning is
    noise; it is filtered out while building, and nothing else is.
    """
    target = logging.getLogger("megatron.core.transformer.transformer_layer")

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unknown MLP type")

    target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)


def build_model(cfg: Config, *, vocab_size: int, pre_process: bool = True, post_process: bool = True,
                vp_stage: int | None = None, config: TransformerConfig | None = None,
                weight_init: str = "exact") -> GPTModel:
    """:func:`build_gpt` from a whole run config (``model``, ``parallel``, ``train.seq_len/seed/device/dtype``).

    ``config``: the ``TransformerConfig`` to build with (default: ``transformer_config(cfg)``). Pass the one the
    trainer hands to DDP/schedules so that hooks set on it reach every module.
    """
    return build_gpt(cfg.model, cfg.parallel, vocab_size=vocab_size, seq_len=cfg.train.seq_len,
                     seed=cfg.train.seed, device=model_device(cfg),
                     config=config if config is not None else transformer_config(cfg),
                     pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                     weight_init=weight_init)


def build_gpt(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, *, vocab_size: int, seq_len: int, seed: int,
              device: torch.device | str, config: TransformerConfig, pre_process: bool = True,
              post_process: bool = True, vp_stage: int | None = None, weight_init: str = "exact") -> GPTModel:
    """One model chunk: megatron ``GPTModel`` with the variant's layers, initialised, fp32, on ``device``.

    Args:
        model_cfg: the ``model`` section (shape, variant, backends).
        parallel_cfg: the ``parallel`` section (tp, sequence parallelism; the layout is in ``config`` too).
        vocab_size: padded vocabulary size (a multiple of ``parallel.tp``).
        seq_len: the training sequence length (RoPE's maximum length).
        seed: the initialisation seed (``train.seed``).
        device: where the model lives.
        config: the ``TransformerConfig`` (:func:`model_transformer_config`).
        pre_process: this chunk holds the embedding (first pipeline stage).
        post_process: this chunk holds the final norm and output layer (last pipeline stage).
        vp_stage: virtual pipeline stage of this chunk (None without interleaving).
        weight_init: ``exact`` -- the layout-invariant initialisation of :mod:`elas_megatron.models.init`
            (training); ``fast`` -- weights drawn on the device by
            :func:`~elas_megatron.models.init.initialize_weights_fast` (benchmarks, TP = 1 only); megatron's own
            CPU initialisation is then switched off in ``config`` (``perform_initialization=False``).
    Returns:
        The ``GPTModel`` (not wrapped: bf16 and DDP wrapping are the trainer's).
    """
    m, p = model_cfg, parallel_cfg
    if vocab_size % p.tp != 0:
        raise ValueError(f"vocab_size={vocab_size} must be divisible by parallel.tp={p.tp}; pad it "
                         f"(model.vocab_size) to a multiple of {p.tp}")
    if weight_init not in WEIGHT_INITS:
        raise ValueError(f"weight_init={weight_init!r} is unknown; choose one of {', '.join(WEIGHT_INITS)}")
    if weight_init == "fast" and p.tp != 1:
        raise ValueError("weight_init='fast' needs parallel.tp=1: megatron sets the tensor-parallel attributes of "
                         "its weights inside the initialisation it skips")
    if weight_init == "fast":
        config.perform_initialization = False  # megatron allocates the weights uninitialised; drawn below
    ignore_row_parallel_forward_tp_group()  # megatron-core's own forward warns; see its docstring
    device = torch.device(device)
    layer_spec = get_layer_spec(m, get_variant(m.variant), sequence_parallel=p.sequence_parallel,
                                attention_backend=resolve_attention_backend(m.attention_backend, device),
                                kernel_backend=m.kernel_backend,
                                rope_backend=resolve_rope_backend(m.rope_backend, device, spec=m.spec))
    block_spec = TransformerBlockSubmodules(
        layer_specs=[layer_spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=get_final_norm(m, sequence_parallel=p.sequence_parallel))
    model_class = FusedLossGPTModel if resolve_loss_backend(m.loss_backend, device, p.tp) == "liger" else GPTModel
    with _quiet_unknown_mlp_warning():
        model = model_class(
            config=config, transformer_layer_spec=block_spec, vocab_size=vocab_size,
            max_sequence_length=seq_len, pre_process=pre_process, post_process=post_process,
            parallel_output=True, share_embeddings_and_output_weights=False, position_embedding_type="rope",
            rotary_percent=1.0, rotary_base=int(m.rope_base), vp_stage=vp_stage)
    if weight_init == "fast":
        initialize_weights_fast(model, m, seed=seed, device=device)
    else:
        initialize_weights(model, m, seed=seed)
    return model.to(device)
