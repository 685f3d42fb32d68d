# SPDX-License-Identifier: Apache-2.0
"""The FFNs of the low-rank variants: CoLA's low-rank SwiGLU and ELAS's 2:4-sparse squared-ReLU FFN.

* ``cola`` (arXiv 2502.10940): LLaMA's SwiGLU ``down(silu(gate(x)) * up(x))`` with each of gate, up and down a
  low-rank layer ``sigma(x A) B``. This is megatron-core's own :class:`~megatron.core.transformer.mlp.MLP`
  (``gated_linear_unit=True``, ``activation_func=silu``) with only its two linear slots swapped for the
  low-rank modules; :func:`cola_mlp_spec` builds that spec, no MLP code is copied.
* ``elas`` (arXiv 2605.03667, Sec. 3): the non-gated squared-ReLU FFN whose hidden activation is 2:4 sparse::

      y1 = sigma(x A_up) B_up          # [tokens, d_ff]      (linear_fc1: A_up replicated, B_up column-parallel)
      y2 = relu(y1) ** 2
      s  = sparse24(y2)                # 2 largest |.| of every 4 consecutive features of each token
      out = sigma(s A_down) B_down     # (linear_fc2: A_down row-parallel over d_ff, B_down replicated)

  :class:`ElasMLP` computes ``z_i = s_i A_down_i`` for this rank's ``d_ff / tp`` features with the one
  dispatched op :func:`elas_megatron.kernels.dispatch.relu2_sparse24_matmul` (the reference on CPU, fused
  kernels on GPU; :func:`~elas_megatron.kernels.dispatch.lowrank_relu2_sparse24_matmul` takes ``h = sigma(x A_up)``
  and ``B_up`` so that on the GPU the input gradient ``grad_y1 @ B_up^T`` can use the 2:4 pattern as well), then
  ``linear_fc2.reduce_and_project`` sums ``z`` over TP (a ``[tokens, r]`` all-reduce,
  or reduce-scatter under sequence parallelism), applies ``sigma`` and ``B_down``. ``d_ff / tp`` is a
  multiple of 4, so 2:4 groups never straddle a TP shard and the sharded result equals the unsharded one.
"""
from __future__ import annotations

import logging

import torch
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from elas_megatron.kernels.dispatch import lowrank_relu2_sparse24_matmul, relu2_sparse24_matmul
from elas_megatron.kernels.swiglu import swiglu
from elas_megatron.layers.low_rank import LowRankColumnParallelLinear, LowRankRowParallelLinear, tp_group_or_default

__all__ = ["GRAD_MODES", "ColaMLP", "ElasMLP", "cola_mlp_spec", "elas_mlp_spec"]

logger = logging.getLogger(__name__)

GRAD_MODES = ("masked", "dense")


def cola_mlp_spec(*, rank: int, activation: str = "silu", separate_parts: bool = False) -> ModuleSpec:
    """megatron's SwiGLU ``MLP`` with low-rank gate/up (``linear_fc1``, two factor pairs) and down (``linear_fc2``);
    :class:`ColaMLP` with gate and up kept apart when ``separate_parts`` (``model.lowrank_parts=separate``)."""
    return ModuleSpec(
        module=ColaMLP if separate_parts else MLP,
        submodules=MLPSubmodules(
            linear_fc1=ModuleSpec(module=LowRankColumnParallelLinear,
                                  params={"rank": rank, "activation": activation, "part_names": ("gate", "up")}),
            linear_fc2=ModuleSpec(module=LowRankRowParallelLinear, params={"rank": rank, "activation": activation}),
        ),
    )


def elas_mlp_spec(*, rank: int, activation: str = "silu", sparse24: bool = True, sparse24_grad: str = "masked",
                  kernel_backend: str = "auto") -> ModuleSpec:
    """:class:`ElasMLP` with its low-rank ``linear_fc1`` (up) and ``linear_fc2`` (down)."""
    return ModuleSpec(
        module=ElasMLP,
        params={"sparse24": sparse24, "sparse24_grad": sparse24_grad, "kernel_backend": kernel_backend},
        submodules=MLPSubmodules(
            linear_fc1=ModuleSpec(module=LowRankColumnParallelLinear, params={"rank": rank, "activation": activation}),
            linear_fc2=ModuleSpec(module=LowRankRowParallelLinear, params={"rank": rank, "activation": activation}),
        ),
    )


class ColaMLP(MLP):
    """megatron's SwiGLU ``MLP`` whose gate and up stay two tensors (``model.lowrank_parts=separate``).

    megatron's ``MLP.forward`` takes ``linear_fc1``'s fused ``[gate | up]`` output and splits it inside its SwiGLU;
    with a low-rank ``linear_fc1`` gate and up come from two ``B`` products, so this forward takes them as they are
    (:meth:`~elas_megatron.layers.low_rank.LowRankColumnParallelLinear.parts`) into
    :func:`~elas_megatron.kernels.swiglu.swiglu`. Same parameters, checkpoint keys and values as ``MLP``; calls it
    does not cover (MoE token scales, clamped or offset GLUs, another activation) take ``MLP.forward``.
    """

    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules, is_expert: bool = False,
                 input_size: int | None = None, ffn_hidden_size: int | None = None,
                 tp_group: torch.distributed.ProcessGroup | None = None) -> None:
        # TransformerLayer passes tp_group to megatron's MLP class only, not to a subclass
        super().__init__(config, submodules, is_expert=is_expert, input_size=input_size,
                         ffn_hidden_size=ffn_hidden_size, tp_group=tp_group_or_default(tp_group))

    def forward(self, hidden_states: torch.Tensor, per_token_scale: torch.Tensor | None = None, **kwargs):
        cfg = self.config
        if (per_token_scale is not None or not hasattr(self.linear_fc1, "parts") or not cfg.gated_linear_unit
                or self.activation_func is not torch.nn.functional.silu or cfg.activation_func_clamp_value is not None
                or cfg.glu_linear_offset != 0.0):
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        gate, up = self.linear_fc1.parts(hidden_states)                              # [s, b, d_ff / tp] x2
        return self.linear_fc2(swiglu(gate, up))


class ElasMLP(MegatronModule):
    """ELAS FFN: low-rank up, squared ReLU, 2:4 activation sparsity, low-rank down (see module docstring).

    Keeps megatron's ``MLP`` contract: built by ``build_module(spec, config=...)`` in the
    ``TransformerLayerSubmodules.mlp`` slot, ``forward(hidden_states)`` takes ``[s, b, h]`` (``[s / tp, b, h]``
    under sequence parallelism) and returns ``(output, None)``.

    Args:
        config: megatron ``TransformerConfig`` (hidden size, d_ff, TP/SP settings).
        submodules: ``linear_fc1`` must build a column-style low-rank layer producing ``d_ff`` features,
            ``linear_fc2`` a :class:`LowRankRowParallelLinear` (its ``A`` is ``A_down``).
        is_expert: must be False (no MoE).
        input_size: FFN input width (default ``config.hidden_size``).
        ffn_hidden_size: ``d_ff`` (default ``config.ffn_hidden_size``).
        tp_group: tensor-parallel group (default: megatron's).
        sparse24: ``model.sparse24``; False computes the same network dense, always.
        sparse24_grad: ``model.sparse24_grad``, ``"masked"`` (straight-through to the kept entries) or ``"dense"``.
        kernel_backend: passed to :func:`relu2_sparse24_matmul` (``"auto"`` picks the fastest available).

    Implements :class:`elas_megatron.sparsity.schedule.SwitchableSparsity`.

    Attributes:
        sparse_active: runtime switch of the dense warm-up, set by
            :class:`elas_megatron.sparsity.schedule.SparsitySchedule`; sparsity applies when
            ``sparse24 and sparse_active``.
        track_density: when True, each forward records ``last_density``, the fraction of non-zeros of ``s`` on
            this rank's shard (one extra elementwise pass; off by default).
    """

    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules, is_expert: bool = False,
                 input_size: int | None = None, ffn_hidden_size: int | None = None,
                 tp_group: torch.distributed.ProcessGroup | None = None, *, sparse24: bool = True,
                 sparse24_grad: str = "masked", kernel_backend: str = "auto") -> None:
        super().__init__(config=config)
        if is_expert:
            raise NotImplementedError("ElasMLP is a dense-layer FFN; MoE experts are not supported")
        if sparse24_grad not in GRAD_MODES:
            raise ValueError(f"model.sparse24_grad={sparse24_grad!r} is unknown; choose one of {GRAD_MODES}")
        self.input_size = input_size or config.hidden_size
        self.ffn_hidden_size = ffn_hidden_size or config.ffn_hidden_size
        self.tp_group = tp_group_or_default(tp_group)
        tp_size = self.tp_group.size()
        if self.ffn_hidden_size % (4 * tp_size) != 0:
            raise ValueError(f"model.ffn_hidden_size={self.ffn_hidden_size} must be a multiple of 4 * tp = "
                             f"{4 * tp_size} so that 2:4 groups never straddle a tensor-parallel shard")
        self.sparse24 = sparse24
        self.sparse24_grad = sparse24_grad
        self.kernel_backend = kernel_backend
        self.sparse_active = True
        self.track_density = False
        self.last_density: float | None = None

        self.linear_fc1 = build_module(
            submodules.linear_fc1, self.input_size, self.ffn_hidden_size, config=config,
            init_method=config.init_method, gather_output=False, bias=config.add_bias_linear, skip_bias_add=True,
            is_expert=False, tp_comm_buffer_name="fc1", tp_group=self.tp_group)
        self.linear_fc2 = build_module(
            submodules.linear_fc2, self.ffn_hidden_size, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="fc2", tp_group=self.tp_group)
        if not isinstance(self.linear_fc2, LowRankRowParallelLinear):
            raise TypeError(f"ElasMLP needs linear_fc2 to be a LowRankRowParallelLinear (its A is A_down, consumed by "
                            f"the fused 2:4 kernel), got {type(self.linear_fc2).__name__}")

    @property
    def is_sparse(self) -> bool:
        """Whether the next forward applies the 2:4 selection."""
        return self.sparse24 and self.sparse_active

    def forward(self, hidden_states: torch.Tensor, per_token_scale: torch.Tensor | None = None,
                **kwargs: object) -> tuple[torch.Tensor, None]:
        """``[s(/tp), b, h]`` -> ``([s(/tp), b, h], None)``. Extra keywords (``padding_mask``) are ignored."""
        if per_token_scale is not None:
            raise NotImplementedError("ElasMLP does not support per_token_scale (MoE only)")
        sparse = self.is_sparse
        fc1 = self.linear_fc1
        if isinstance(fc1, LowRankColumnParallelLinear) and len(fc1.part_names) == 1:
            # B_up inside the op: on the GPU its input gradient can use the 2:4 pattern too.
            h = fc1.hidden(hidden_states)                                        # [s, b, r]
            if self.track_density:
                with torch.no_grad():
                    self.last_density = _density(torch.matmul(h, fc1.B), sparse)
            z = lowrank_relu2_sparse24_matmul(h, fc1.B, self.linear_fc2.A, sparse=sparse,
                                              grad_mode=self.sparse24_grad, backend=self.kernel_backend)
        else:
            y1, _ = fc1(hidden_states)                                           # [s, b, d_ff / tp]
            if self.track_density:
                self.last_density = _density(y1, sparse)
            z = relu2_sparse24_matmul(y1, self.linear_fc2.A, sparse=sparse, grad_mode=self.sparse24_grad,
                                      backend=self.kernel_backend)              # [s, b, r] partial over TP
        return self.linear_fc2.reduce_and_project(z)                            # [s(/tp), b, h]

    def backward_dw(self) -> None:
        """Delayed weight-gradient computation is not used."""

    def extra_repr(self) -> str:
        return (f"sparse24={self.sparse24}, active={self.sparse_active}, grad={self.sparse24_grad}, "
                f"backend={self.kernel_backend}")


@torch.no_grad()
def _density(y1: torch.Tensor, sparse: bool) -> float:
    """Non-zero fraction of ``s``: ``relu(y1) > 0`` entries, at most 2 per group of 4 when sparse."""
    nonzero = (y1 > 0).reshape(*y1.shape[:-1], -1, 4).sum(-1)                 # [..., d_ff / 4]
    if sparse:
        nonzero = nonzero.clamp(max=2)
    return float(nonzero.sum()) / y1.numel()
