# SPDX-License-Identifier: Apache-2.0
"""CoLA low-rank linear layers ``y = sigma(x A) B`` with a tensor-parallel layout of their own (arXiv 2502.10940).

CoLA replaces every linear map ``W: [in, out]`` by two factors ``A: [in, r]`` and ``B: [r, out]`` with a
non-linearity in between (Sec. 3 of the paper, ``sigma`` = SiLU by default, identity gives a plain low-rank
factorisation). The modules here honour the constructor contracts of megatron-core's
``ColumnParallelLinear`` / ``RowParallelLinear`` so that ``build_module`` can place them in the
``linear_qkv``, ``linear_proj``, ``linear_fc1`` and ``linear_fc2`` slots of a stock layer spec, and they return
``(output, None)`` like those layers with ``skip_bias_add`` (LLaMA has no biases).

Tensor parallelism (TP size ``t``). A dense Megatron layer all-reduces ``[tokens, hidden]`` activations; a
low-rank layer has a narrow waist of width ``r`` and communicates there instead:

* column style (q/k/v, FFN up/gate): ``A`` replicated, ``B`` sharded over ``out``. ``h = sigma(x A)`` is
  computed on every rank, then ``y_i = h B_i`` gives this rank's output columns. The backward all-reduces
  ``grad_h`` (``[tokens, r]``) through ``copy_to_tensor_model_parallel_region`` on ``h``; after that ``grad_A``
  and ``grad_x`` are complete and identical on every rank, so unlike ``ColumnParallelLinear`` no
  ``[tokens, in]`` all-reduce of ``grad_x`` is needed.
* row style (o, FFN down): ``A`` sharded over ``in``, ``B`` replicated. Each rank computes the partial
  ``x_i A_i``; the forward all-reduces that ``[tokens, r]`` sum, then ``sigma`` and ``B`` run on every rank.
  ``grad_B`` is identical on every rank (its inputs are), so no gradient all-reduce is needed either.

Sequence parallelism replaces the ``[tokens, r]`` all-reduces by an all-gather / reduce-scatter along the
sequence of the same ``[tokens, r]`` tensors. The replicated factors then see only this rank's share of the
sequence (``A`` of a column layer multiplies the sequence-sharded input, ``B`` of a row layer produces the
sequence-sharded output), so their gradients are partial sums: they carry ``param.sequence_parallel = True``
and megatron-core's ``finalize_model_grads`` (``_allreduce_non_tensor_model_parallel_grads``) sums them over
the TP group, exactly as it does for the norm weights. A side benefit: under SP the replicated factor's GEMM
runs on ``tokens / t`` rows, so no FLOPs are spent twice.

Several outputs concatenated per rank (megatron's fused ``q|k|v`` and ``gate|up``) each get their own factors,
because CoLA factorises every linear map separately; their ``A`` factors are multiplied as one GEMM and their
``h`` are communicated as one ``[tokens, parts * r]`` tensor.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import (
    set_defaults_if_not_set_tensor_model_parallel_attributes,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from megatron.core.utils import divide, get_pg_rank, get_pg_size, get_tensor_model_parallel_group_if_none

__all__ = [
    "ACTIVATIONS",
    "LowRankColumnParallelLinear",
    "LowRankQKVColumnParallelLinear",
    "LowRankRowParallelLinear",
    "cola_init_std",
    "is_low_rank_module",
    "tp_group_or_default",
]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "identity": _identity}
"""``sigma`` of ``sigma(x A) B`` by the name used in ``model.lowrank_activation``."""


def cola_init_std(in_features: int, out_features: int, rank: int) -> float:
    """Std of both factors under CoLA's init: ``N(0, 1) / r**0.25 * (in + out)**-0.25``.

    It makes ``Var(x A B) ~ Var(x) * in / sqrt(in + out)`` independent of ``r``, like a fan-in/fan-out scaled
    dense init, so changing the rank does not change the scale of the activations.
    """
    return float(rank) ** -0.25 * float(in_features + out_features) ** -0.25


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"model.lowrank_activation={name!r} is unknown; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _unsupported(layer: str, **flags: bool) -> None:
    for flag, value in flags.items():
        if value:
            raise NotImplementedError(
                f"{layer} does not support {flag}=True (LLaMA-style low-rank layers have no bias, never gather "
                "their output and are not MoE experts); use a full-rank megatron layer in this slot")


def _new_factor(shape: tuple[int, int], config: ModelParallelConfig) -> torch.nn.Parameter:
    device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
    return torch.nn.Parameter(torch.empty(*shape, dtype=config.params_dtype, device=device))


@torch.no_grad()
def _fill_shard(param: torch.Tensor, std: float, full_shape: tuple[int, int], dim: int | None, tp_rank: int) -> None:
    """Draw the full factor from the default generator and keep this rank's slice.

    Every TP rank draws the same full tensor (their default generators are seeded identically), so the
    replicated factors agree and the shards tile the TP=1 factor. :func:`elas_megatron.models.init.
    initialize_weights` re-initialises everything layout-invariantly; this only makes a stand-alone module usable.
    """
    full = torch.randn(full_shape, dtype=torch.float32) * std
    if dim is not None:
        size = param.shape[dim]
        full = full.narrow(dim, tp_rank * size, size)
    param.copy_(full.to(param.dtype))


def tp_group_or_default(tp_group: torch.distributed.ProcessGroup | None) -> torch.distributed.ProcessGroup | None:
    """``tp_group``, else megatron's default tensor-parallel group, taken explicitly.

    megatron-core's ``get_tensor_model_parallel_group_if_none`` does the same but warns "tp_group is None, using
    default tp group" (DeprecationWarning, 0.16): its ``TransformerLayer`` passes a group only to megatron's own MLP
    classes, so ``ElasMLP`` (and a layer built on its own) gets None, and the default group is the intended one.
    Without an initialised process group the result is megatron's (None, or ``tp_group`` as given).
    """
    if tp_group is None and torch.distributed.is_initialized() and parallel_state.is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return get_tensor_model_parallel_group_if_none(tp_group)


class _LowRankBase(MegatronModule):
    """Shared bookkeeping: activation, TP group, sequence parallelism and the factors' global layout."""

    def __init__(self, config: ModelParallelConfig, rank: int, activation: str,
                 tp_group: torch.distributed.ProcessGroup | None) -> None:
        super().__init__(config=config)
        if rank < 1:
            raise ValueError(f"low-rank width must be positive (model.rank / model.attention_rank), got {rank}")
        self.rank = rank
        self.activation_name = activation
        self.activation = _activation(activation)
        self.tp_group = tp_group_or_default(tp_group)
        self.tp_size = get_pg_size(self.tp_group)
        self.tp_rank = get_pg_rank(self.tp_group)
        self.sequence_parallel = bool(config.sequence_parallel) and self.tp_size > 1
        # param name -> (in_features, out_features, rank) of the *layer* it factorises (global sizes):
        # what CoLA's init needs (see models/init.py).
        self.lowrank_dims: dict[str, tuple[int, int, int]] = {}
        # Hook adding a default empty _extra_state, as megatron's own linear layers do (TE compatibility).
        self._register_load_state_dict_pre_hook(
            lambda state_dict, prefix, *args, **kwargs: state_dict.setdefault(f"{prefix}_extra_state"))

    def _replicated(self, name: str, shape: tuple[int, int], dims: tuple[int, int, int]) -> None:
        param = _new_factor(shape, self.config)
        set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        # Under SP this factor sees only this rank's share of the sequence: its grad is summed over TP by
        # finalize_model_grads (megatron-core >= 0.10 checks exactly this attribute).
        param.sequence_parallel = self.sequence_parallel
        param.allreduce = True
        self.register_parameter(name, param)
        self.lowrank_dims[name] = dims
        if self.config.perform_initialization:
            _fill_shard(param, cola_init_std(*dims), shape, None, self.tp_rank)

    def _sharded(self, name: str, local_shape: tuple[int, int], dim: int, dims: tuple[int, int, int]) -> None:
        param = _new_factor(local_shape, self.config)
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
        param.allreduce = True
        self.register_parameter(name, param)
        self.lowrank_dims[name] = dims
        if self.config.perform_initialization:
            full = list(local_shape)
            full[dim] *= self.tp_size
            _fill_shard(param, cola_init_std(*dims), tuple(full), dim, self.tp_rank)

    def _sharded_axes(self) -> dict[str, int]:
        return {name: p.partition_dim for name, p in self.named_parameters(recurse=False)
                if getattr(p, "tensor_model_parallel", False)}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Sharded factors along their TP axis, replicated factors as TP replicas: loads across TP sizes."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, self._sharded_axes(), sharded_offsets,
                                                   tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])

    def set_extra_state(self, state: object) -> None:
        """Extra state is ignored (kept for the same state-dict layout as megatron's linear layers)."""

    def get_extra_state(self) -> None:
        return None

    def backward_dw(self) -> None:
        """Delayed weight-gradient computation is not used by these layers."""


class LowRankColumnParallelLinear(_LowRankBase):
    """``y = sigma(x A_p) B_p`` for each output part ``p``, output columns sharded over TP.

    Drop-in for ``ColumnParallelLinear`` (same positional/keyword arguments; extra keywords come from the
    ``ModuleSpec.params``). ``stride`` keeps megatron's meaning, the number of independently sharded blocks
    concatenated in each rank's output: megatron's SwiGLU MLP passes ``stride=2`` for ``[gate | up]``, and each
    block gets its own factors ``A_<part>`` ``[in, r]`` (replicated) and ``B_<part>`` ``[r, out_part / tp]``.
    With one part the factors are plain ``A`` and ``B``.

    Args:
        input_size: ``in``.
        output_size: total ``out`` over all parts and TP ranks.
        config: megatron's ``ModelParallelConfig`` / ``TransformerConfig``.
        init_method: ignored (CoLA's init is used; see :func:`cola_init_std`).
        rank: low-rank width ``r`` (``model.rank`` or ``model.attention_rank``).
        activation: ``"silu"`` or ``"identity"`` (``model.lowrank_activation``).
        part_names: names of the ``stride`` parts (default ``("gate", "up")`` for 2, ``("",)`` for 1).
        The remaining arguments are those of ``ColumnParallelLinear``; bias, output gathering, external
        weights and MoE experts are not supported and raise ``NotImplementedError``.
    """

    def __init__(self, input_size: int, output_size: int, *, config: ModelParallelConfig,
                 init_method: Callable | None = None, bias: bool = False, gather_output: bool = False,
                 stride: int = 1, keep_master_weight_for_test: bool = False, skip_bias_add: bool = False,
                 skip_weight_param_allocation: bool = False, embedding_activation_buffer: list | None = None,
                 grad_output_buffer: list | None = None, is_expert: bool = False,
                 tp_comm_buffer_name: str | None = None, disable_grad_reduce: bool = False,
                 tp_group: torch.distributed.ProcessGroup | None = None, rank: int, activation: str = "silu",
                 part_names: Sequence[str] | None = None) -> None:
        super().__init__(config, rank, activation, tp_group)
        _unsupported(type(self).__name__, bias=bias, gather_output=gather_output, is_expert=is_expert,
                     skip_weight_param_allocation=skip_weight_param_allocation,
                     disable_grad_reduce=disable_grad_reduce)
        if part_names is None:
            part_names = {1: ("",), 2: ("gate", "up")}.get(stride) or tuple(f"p{i}" for i in range(stride))
        if len(part_names) != stride:
            raise ValueError(f"{type(self).__name__}: {len(part_names)} part names {tuple(part_names)} for "
                             f"stride={stride}; give one name per concatenated output block")
        self.input_size = input_size
        self.output_size = output_size
        self._define_parts(part_names, [divide(output_size, stride)] * stride)

    def _define_parts(self, names: Sequence[str], out_sizes: Sequence[int]) -> None:
        self.part_names = tuple(names)
        self.part_out_sizes = tuple(out_sizes)
        self.part_out_sizes_local = tuple(divide(o, self.tp_size) for o in out_sizes)
        self.output_size_per_partition = sum(self.part_out_sizes_local)
        for name, out_size, out_local in zip(self.part_names, out_sizes, self.part_out_sizes_local, strict=True):
            suffix = f"_{name}" if name else ""
            dims = (self.input_size, out_size, self.rank)
            self._replicated(f"A{suffix}", (self.input_size, self.rank), dims)
            self._sharded(f"B{suffix}", (self.rank, out_local), 1, dims)

    def _factors(self, letter: str) -> list[torch.Tensor]:
        return [getattr(self, f"{letter}_{n}" if n else letter) for n in self.part_names]

    def _assemble(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """This rank's output from the per-part outputs (megatron's per-rank ``[part_0 | part_1 | ...]``)."""
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None) -> tuple[torch.Tensor, None]:
        """``[s(/tp), b, in]`` -> ``([s, b, out / tp], None)``; the sequence is gathered under SP."""
        if weight is not None or runtime_gather_output:
            raise NotImplementedError(f"{type(self).__name__} owns its factors and never gathers its output")
        return self._assemble(self.parts(input_)), None

    def parts(self, input_: torch.Tensor) -> list[torch.Tensor]:
        """Each part's output ``[s, b, out_p / tp]`` as its own tensor (``model.lowrank_parts=separate``: the
        caller reads the parts directly instead of :meth:`forward`'s concatenation of them)."""
        h = self.hidden(input_)
        hs = h.split(self.rank, dim=-1) if len(self.part_names) > 1 else (h,)                 # views
        return [torch.matmul(h_p, b_p) for h_p, b_p in zip(hs, self._factors("B"), strict=True)]

    def hidden(self, input_: torch.Tensor) -> torch.Tensor:
        """The first half, ``sigma(x A)`` for all parts ``[s, b, parts * r]``, on every TP rank (the sequence
        gathered under SP); :class:`elas_megatron.layers.mlp.ElasMLP` multiplies it by ``B`` inside its fused op."""
        a_factors = self._factors("A")
        a = a_factors[0] if len(a_factors) == 1 else torch.cat(a_factors, dim=1)   # [in, parts * r]
        h = self.activation(torch.matmul(input_, a))                                # [s(/tp), b, parts * r]
        if self.sequence_parallel:
            return gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=self.tp_group)
        return copy_to_tensor_model_parallel_region(h, group=self.tp_group)         # bwd: all-reduce [s, b, parts*r]

    def extra_repr(self) -> str:
        parts = f", parts=({','.join(self.part_names)})" if len(self.part_names) > 1 else ""
        return (f"in={self.input_size}, out={self.output_size}, rank={self.rank}{parts}, "
                f"sigma={self.activation_name}, tp={self.tp_size}, sp={self.sequence_parallel}")


class LowRankQKVColumnParallelLinear(LowRankColumnParallelLinear):
    """Low-rank ``linear_qkv``: separate factors for q, k and v, output in megatron's fused-qkv layout.

    ``SelfAttention`` splits this rank's output per query group as ``[q heads of the group | k | v]``
    (``[s, b, ng_local * (np / ng + 2) * hn]``). ``B_q``/``B_k``/``B_v`` are sharded over heads (query groups)
    with contiguous head ranges, which is the same head-to-rank assignment as megatron's fused ``linear_qkv``.
    """

    def _define_parts(self, names: Sequence[str], out_sizes: Sequence[int]) -> None:
        cfg = self.config
        head_dim = cfg.kv_channels
        groups = cfg.num_query_groups or cfg.num_attention_heads
        q_size, kv_size = head_dim * cfg.num_attention_heads, head_dim * groups
        if q_size + 2 * kv_size != self.output_size:
            raise ValueError(f"{type(self).__name__}: output_size={self.output_size} is not q + 2 kv = "
                             f"{q_size} + 2 * {kv_size}; attention_output_gate is not supported")
        if groups % self.tp_size != 0:
            raise ValueError(f"{type(self).__name__}: {groups} query groups (model.num_kv_heads) are not divisible "
                             f"by tensor-parallel size {self.tp_size}")
        self.groups_local = groups // self.tp_size
        self.head_dim = head_dim
        super()._define_parts(("q", "k", "v"), (q_size, kv_size, kv_size))

    def query_key_value(self, input_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[s, b, np / tp, hn]``, k and v ``[s, b, ng / tp, hn]``, each from its own ``B`` product.

        What megatron's ``SelfAttention`` gets by splitting :meth:`forward`'s fused output, without building it:
        each product writes its own contiguous tensor, so neither the concatenation in the forward nor the copies
        of the split gradients in the backward happen (``model.lowrank_parts=separate``).
        """
        q, k, v = self.parts(input_)                                  # [s, b, np_l * hn], [s, b, ng_l * hn] x2
        lead = q.shape[:-1]
        return (q.view(*lead, -1, self.head_dim), k.view(*lead, self.groups_local, self.head_dim),
                v.view(*lead, self.groups_local, self.head_dim))

    def _assemble(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = outputs                                              # [s, b, ng_l*(np/ng)*hn], [s, b, ng_l*hn] x2
        lead = q.shape[:-1]
        q = q.reshape(*lead, self.groups_local, -1)                    # [s, b, ng_l, np/ng * hn]
        k = k.reshape(*lead, self.groups_local, self.head_dim)         # [s, b, ng_l, hn]
        v = v.reshape(*lead, self.groups_local, self.head_dim)
        return torch.cat([q, k, v], dim=-1).reshape(*lead, -1)        # [s, b, ng_l * (np/ng + 2) * hn]


class LowRankRowParallelLinear(_LowRankBase):
    """``y = sigma(x A) B`` with ``A`` ``[in / tp, r]`` sharded over ``in`` and ``B`` ``[r, out]`` replicated.

    Drop-in for ``RowParallelLinear``; the input must already be split over TP (``input_is_parallel=True``,
    as megatron's attention and MLP pass it). :meth:`reduce_and_project` is the second half on its own, so that
    :class:`elas_megatron.layers.mlp.ElasMLP` can compute the partial ``x_i A_i`` with the fused 2:4 kernel.

    Args:
        input_size, output_size, config, bias, input_is_parallel, skip_bias_add, stride, is_expert,
        tp_comm_buffer_name, tp_group: as in ``RowParallelLinear`` (bias, experts and ``stride != 1`` raise).
        init_method: ignored (CoLA's init).
        rank: low-rank width ``r``.
        activation: ``"silu"`` or ``"identity"``.
    """

    def __init__(self, input_size: int, output_size: int, *, config: ModelParallelConfig,
                 init_method: Callable | None = None, bias: bool = False, input_is_parallel: bool = True,
                 skip_bias_add: bool = True, stride: int = 1, keep_master_weight_for_test: bool = False,
                 is_expert: bool = False, tp_comm_buffer_name: str | None = None,
                 tp_group: torch.distributed.ProcessGroup | None = None, rank: int, activation: str = "silu") -> None:
        super().__init__(config, rank, activation, tp_group)
        _unsupported(type(self).__name__, bias=bias, is_expert=is_expert)
        if not input_is_parallel:
            raise NotImplementedError(f"{type(self).__name__} needs input_is_parallel=True (its input is the "
                                      "TP-sharded output of a column-parallel layer)")
        if stride != 1:
            raise NotImplementedError(f"{type(self).__name__} does not support stride={stride}")
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = divide(input_size, self.tp_size)
        dims = (input_size, output_size, rank)
        self._sharded("A", (self.input_size_per_partition, rank), 0, dims)
        self._replicated("B", (rank, output_size), dims)

    def reduce_and_project(self, partial: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``sigma(sum_i x_i A_i) B`` from this rank's partial ``x_i A_i`` ``[s, b, r]``.

        Returns ``[s, b, out]`` (``[s / tp, b, out]`` under SP: the sum is reduce-scattered along the sequence).
        """
        if self.sequence_parallel:
            z = reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group)   # [s/tp, b, r]
        else:
            z = reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)     # [s, b, r]
        return torch.matmul(self.activation(z), self.B), None

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``[s, b, in / tp]`` -> ``([s(/tp), b, out], None)``."""
        return self.reduce_and_project(torch.matmul(input_, self.A))

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, rank={self.rank}, sigma={self.activation_name}, "
                f"tp={self.tp_size}, sp={self.sequence_parallel}")


def is_low_rank_module(module: torch.nn.Module) -> bool:
    """True for the modules of this file (they carry ``lowrank_dims`` for the initialiser)."""
    return isinstance(module, _LowRankBase)
