# SPDX-License-Identifier: Apache-2.0
"""Deterministic, layout-invariant weight initialisation.

Every parameter is drawn from its own generator seeded with ``(seed, global name)``, where the global name is
the parameter's name in the single-process model (``decoder.layers.<global layer index>....``: under pipeline
parallelism the local layer index is replaced by megatron's global ``layer_number - 1``). The full (TP=1)
tensor is generated on the CPU in fp32 and this rank's shard is cut out of it along the parameter's
``partition_dim`` (honouring megatron's ``partition_stride``, e.g. the per-rank ``[gate | up]`` blocks of the
fused SwiGLU ``linear_fc1``). Hence a TP=2 / PP=2 run starts from exactly the weights of the one-process run,
and CPU and GPU runs start from the same weights. The parallel-equivalence tests rely on this.

Distributions (``std = model.init_std``):

* embeddings, ``output_layer`` and full-rank input-side linears (``linear_qkv``, ``linear_fc1``): ``N(0, std)``;
* full-rank output projections (row-parallel: ``linear_proj``, ``linear_fc2``): ``N(0, std / sqrt(2 L))``,
  megatron's ``scaled_init_method_normal`` (GPT-2 style residual scaling, L = ``model.num_layers``);
* low-rank factors ``A``, ``B``: CoLA's ``N(0, 1) * r**-0.25 * (in + out)**-0.25`` with the layer's own
  ``in``/``out`` (:func:`elas_megatron.layers.low_rank.cola_init_std`), no depth scaling, as in the paper;
* norm gains: 1; biases (none in LLaMA): 0.
"""
from __future__ import annotations

import hashlib
import logging
import math
import re

import torch
from megatron.core import parallel_state

from elas_megatron.config.schema import ModelConfig
from elas_megatron.layers.low_rank import cola_init_std, is_low_rank_module

__all__ = ["WEIGHT_INITS", "global_parameter_names", "initialize_weights", "initialize_weights_fast", "parameter_seed"]

WEIGHT_INITS = ("exact", "fast")
"""``exact``: :func:`initialize_weights` (training); ``fast``: :func:`initialize_weights_fast` (benchmarks)."""

logger = logging.getLogger(__name__)

_NORM_TYPES = ("RMSNorm", "LayerNorm", "TENorm", "WrappedTorchNorm", "FusedLayerNorm")


def parameter_seed(seed: int, global_name: str) -> int:
    """A 63-bit generator seed from the run seed and a parameter's global name (stable across processes)."""
    digest = hashlib.sha256(f"{seed}/{global_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def global_parameter_names(model: torch.nn.Module) -> dict[str, str]:
    """Local parameter name -> the name it has in the single-process (TP=PP=1) model.

    Wrapper prefixes (``module.`` of DDP / Float16Module) are dropped and ``decoder.layers.<i>.`` is renumbered
    with the layer's global ``layer_number - 1``.
    """
    layer_prefix: dict[str, str] = {}
    for name, module in model.named_modules():
        number = getattr(module, "layer_number", None)
        if re.search(r"(^|\.)layers\.\d+$", name) and isinstance(number, int):
            layer_prefix[name + "."] = re.sub(r"layers\.\d+$", f"layers.{number - 1}", name) + "."
    names = {}
    for name, _ in model.named_parameters():
        global_name = name
        for local, glob in layer_prefix.items():
            if name.startswith(local):
                global_name = glob + name[len(local):]
                break
        names[name] = re.sub(r"^(module\.)+", "", global_name)
    return names


def _full_shape_and_slicer(param: torch.Tensor, tp_size: int, tp_rank: int):
    shape = list(param.shape)
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return tuple(shape), lambda full: full
    dim = param.partition_dim
    stride = getattr(param, "partition_stride", 1)
    shape[dim] *= tp_size
    piece = param.shape[dim] // stride

    def slicer(full: torch.Tensor) -> torch.Tensor:
        # The full tensor is `stride` blocks along `dim`; this rank owns piece `tp_rank` of each block
        # (megatron's _initialize_affine_weight_cpu split: pieces[rank::world_size]).
        pieces = torch.split(full, piece, dim=dim)
        return torch.cat(pieces[tp_rank::tp_size], dim=dim)

    return tuple(shape), slicer


def _kind_and_std(module: torch.nn.Module, param_name: str, model_cfg: ModelConfig) -> tuple[str, float]:
    cls = type(module).__name__
    if is_low_rank_module(module):
        return "normal", cola_init_std(*module.lowrank_dims[param_name])
    if param_name.endswith("bias"):
        return "zeros", 0.0
    if cls in _NORM_TYPES or cls.endswith("Norm") or param_name.startswith("layer_norm"):
        return "ones", 1.0
    if "RowParallel" in cls:
        return "normal", model_cfg.init_std / math.sqrt(2.0 * model_cfg.num_layers)
    return "normal", model_cfg.init_std


@torch.no_grad()
def initialize_weights(model: torch.nn.Module, model_cfg: ModelConfig, *, seed: int) -> None:
    """(Re-)initialise every parameter of ``model`` (one chunk of a possibly TP/PP-sharded GPT) in place.

    Args:
        model: a megatron ``GPTModel`` or a sub-module of one (names are taken relative to it).
        model_cfg: the ``model`` section (``init_std``, ``num_layers``).
        seed: ``train.seed``.
    Raises:
        TypeError: a parameter of an unknown kind, so that nothing is silently left as megatron initialised it.
    """
    initialized = parallel_state.model_parallel_is_initialized()
    tp_size = parallel_state.get_tensor_model_parallel_world_size() if initialized else 1
    tp_rank = parallel_state.get_tensor_model_parallel_rank() if tp_size > 1 else 0
    global_names = global_parameter_names(model)
    owners = {f"{mname}.{pname}" if mname else pname: (module, pname)
              for mname, module in model.named_modules() for pname, _ in module.named_parameters(recurse=False)}
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        module, pname = owners[name]
        kind, std = _kind_and_std(module, pname, model_cfg)
        if kind == "ones":
            param.fill_(1.0)
        elif kind == "zeros":
            param.zero_()
        else:
            if param.dim() < 2:
                raise TypeError(f"initialize_weights: don't know how to initialise 1-D parameter {name!r} of "
                                f"{type(module).__name__}; add a rule in elas_megatron/models/init.py")
            full_shape, slicer = _full_shape_and_slicer(param, tp_size, tp_rank)
            gen = torch.Generator().manual_seed(parameter_seed(seed, global_names[name]))
            full = torch.randn(full_shape, generator=gen, dtype=torch.float32).mul_(std)
            param.copy_(slicer(full).to(param.dtype))
        counts[kind] = counts.get(kind, 0) + 1
    logger.debug("initialised %s parameters (seed %d, tp %d/%d)", counts, seed, tp_rank, tp_size)


@torch.no_grad()
def initialize_weights_fast(model: torch.nn.Module, model_cfg: ModelConfig, *, seed: int,
                            device: torch.device) -> None:
    """Draw every parameter of ``model`` on ``device`` from one generator: for benchmarks, where the layout-invariant
    CPU initialisation of :func:`initialize_weights` takes tens of seconds per process at 1B and the values do not
    change the speed.

    Moves ``model`` to ``device``; norm gains 1, biases 0, low-rank factors CoLA's std, other matrices
    ``model.init_std`` (no depth scaling, no per-parameter seeds: not layout-invariant). Only for TP = 1.
    """
    model.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.dim() < 2:
                param.fill_(0.0 if name.endswith("bias") else 1.0)
                continue
            std = cola_init_std(*module.lowrank_dims[name]) if is_low_rank_module(module) else model_cfg.init_std
            param.normal_(0.0, std, generator=gen)
