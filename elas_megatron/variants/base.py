# SPDX-License-Identifier: Apache-2.0
"""What a model variant is: the one object that owns everything that differs between variants.

A :class:`Variant` says how the transformer layer differs from megatron-core's stock LLaMA layer (spec slot
swaps, ``TransformerConfig`` settings), which configs it accepts, its analytic parameter / FLOP / activation
memory terms, whether it has 2:4 activation sparsity, how its parameters are named in the exported formats and
which config fields identify its network in a checkpoint. Everything else in the code asks the variant of
``model.variant`` (:func:`elas_megatron.variants.get_variant`) instead of comparing names.

Subclasses override what differs from the defaults (the defaults describe ``dense``: the stock layer, a SwiGLU
FFN) and are registered with :func:`elas_megatron.variants.register`. This module imports nothing heavy, so
that the config schema can validate ``model.variant`` against the registry; layer classes are imported inside
the methods that need them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from elas_megatron.utils.errors import ConfigError

if TYPE_CHECKING:
    from elas_megatron.layers.specs import SpecContext
    from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

    from elas_megatron.config.schema import ModelConfig, ParallelConfig

__all__ = ["ActivationTerms", "ExportUnsupportedError", "Variant"]

IDENTITY_FIELDS = ("variant", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "rank",
                   "attention_rank", "lowrank_attention", "lowrank_activation")
"""``model`` fields that define the network of every built-in variant (a checkpoint must match them)."""


class ExportUnsupportedError(ValueError):
    """The variant's network cannot be written in the requested export format."""


class ActivationTerms(Protocol):
    """What :meth:`Variant.ffn_activation_terms` gets from :mod:`elas_megatron.training.memory`.

    ``e``: bytes per activation element; ``tp``; ``seq_div``: the divisor of tensors outside the TP region (tp
    under sequence parallelism, else 1); ``sparse``: the 2:4 phase (False: dense warm-up / dense-saving modes);
    ``ffn``: the recompute modes that drop FFN tensors (pass as ``dropped``).
    """
    e: int
    tp: int
    seq_div: int
    sparse: bool
    ffn: frozenset[str]

    def add(self, name: str, bytes_per_token: float, dropped: frozenset[str] = ..., note: str = "") -> None: ...

    def lowrank_column(self, name: str, in_features: int, parts: int, r: int,
                       dropped: frozenset[str] = ...) -> None: ...

    def lowrank_row(self, name: str, r: int, dropped: frozenset[str] = ...) -> None: ...


class Variant:
    """Base class of model variants; the defaults are full-rank LLaMA with a SwiGLU FFN (``dense``).

    Class attributes (override in a subclass):
        name: the ``model.variant`` value.
        description: one line for docs and ``--help``-style listings.
        lowrank: the linear layers are CoLA's ``sigma(x A) B``: ``model.rank``, ``attention_rank``,
            ``lowrank_attention``, ``lowrank_activation`` and ``lowrank_parts`` apply.
        sparsity: the FFN has 2:4 activation sparsity (:class:`~elas_megatron.layers.mlp.ElasMLP`):
            ``model.sparse24``, ``sparse24_grad``, ``dense_warmup_steps``, the trainer's dense warm-up schedule
            and activation-density checks apply.
        hf_llama: the network is a Hugging Face ``LlamaForCausalLM`` (``elas-export --format hf``).
        standalone_mlp: the FFN as the standalone inference module ``modeling_elas.py`` knows it: ``"swiglu"``
            (``down(silu(gate(x)) * up(x))``) or ``"relu2"`` (``down(sparse24?(relu(up(x)) ** 2))``); None: the
            ``torch`` export format cannot represent it.
        export_renames: per-layer megatron parameter suffix -> exported (Hugging Face LLaMA style) suffix, taking
            precedence over the common mapping of :mod:`elas_megatron.export.hf`.
        identity_fields: ``model`` fields a checkpoint must share with the config to be resumed / loaded.
    """
    name: ClassVar[str]
    description: ClassVar[str] = ""
    lowrank: ClassVar[bool] = False
    sparsity: ClassVar[bool] = False
    hf_llama: ClassVar[bool] = False
    standalone_mlp: ClassVar[str | None] = "swiglu"
    export_renames: ClassVar[dict[str, str]] = {}
    identity_fields: ClassVar[tuple[str, ...]] = IDENTITY_FIELDS
    hf_reason: ClassVar[str] = "is not a LLaMA network"
    """Why ``LlamaForCausalLM`` cannot hold the network (when ``hf_llama`` is false), for the export error."""

    def __repr__(self) -> str:
        return f"<variant {getattr(self, 'name', None)!r} ({type(self).__name__})>"

    # ----------------------------------------------------------------------------------------- the network
    def configure_layer(self, layer: TransformerLayerSubmodules, m: ModelConfig, ctx: SpecContext) -> None:
        """Swap slots of a fresh stock layer spec in place (helpers: :mod:`elas_megatron.layers.specs`).

        The default keeps megatron's stock layer as it is.
        """

    def gated(self, m: ModelConfig) -> bool:
        """The FFN is a gated linear unit (megatron's ``gated_linear_unit``)."""
        return True

    def activation(self, m: ModelConfig) -> Callable[..., Any]:
        """The FFN activation (megatron's ``activation_func``)."""
        import torch.nn.functional as F

        return F.silu

    def transformer_kwargs(self, m: ModelConfig, *, on_cuda: bool) -> dict[str, Any]:
        """The variant's keyword arguments of megatron's ``TransformerConfig``."""
        gated = self.gated(m)
        return {"gated_linear_unit": gated, "activation_func": self.activation(m),
                # megatron's jit-fused bias + activation covers the gated SiLU (and GeLU) forms it knows
                "bias_activation_fusion": on_cuda and gated}

    def lowrank_attention(self, m: ModelConfig) -> bool:
        """q, k, v, o are low-rank."""
        return self.lowrank and m.lowrank_attention

    def sparse_active(self, m: ModelConfig) -> bool:
        """The 2:4 selection runs (after any dense warm-up)."""
        return self.sparsity and m.sparse24

    def dense_warmup_steps(self, m: ModelConfig) -> int:
        """First steps without the 2:4 selection (0 for a variant without sparsity)."""
        return m.dense_warmup_steps if self.sparsity else 0

    def dense_phase(self, m: ModelConfig) -> bool:
        """The activation-memory peak is a dense phase of a sparse FFN (dense warm-up, dense-saving modes)."""
        return False

    # -------------------------------------------------------------------------------------------- checking
    def ffn_multiple(self, m: ModelConfig) -> int:
        """``model.ffn_hidden_size / parallel.tp`` must be a multiple of this."""
        return 1

    def validate(self, m: ModelConfig, p: ParallelConfig) -> None:
        """Rules tying this variant's model to the parallel layout; raise ``ConfigError`` naming the key and fix."""
        multiple = self.ffn_multiple(m)
        if m.ffn_hidden_size % (multiple * p.tp) != 0:
            if multiple == 1:
                raise ConfigError(f"model.ffn_hidden_size={m.ffn_hidden_size!r} is invalid: expected divisible by "
                                  f"parallel.tp={p.tp}")
            step = multiple * p.tp
            lo = m.ffn_hidden_size - m.ffn_hidden_size % step
            raise ConfigError(
                f"model.ffn_hidden_size={m.ffn_hidden_size} is invalid for {self.name} with parallel.tp={p.tp}: "
                f"{self.ffn_multiple_reason()} need d_ff / tp to be a multiple of {multiple}; use {lo} or "
                f"{lo + step}")

    def ffn_multiple_reason(self) -> str:
        return "FFN groups"

    # ------------------------------------------------------------------------------------ counts and FLOPs
    def attention_matrix_parameters(self, m: ModelConfig, tp: int = 1) -> int:
        """Matrix parameters of q, k, v, o on one TP rank (see :func:`elas_megatron.models.flops`)."""
        h = m.hidden_size
        head_dim = h // m.num_heads
        q, kv = m.num_heads * head_dim, m.kv_heads * head_dim
        if self.lowrank_attention(m):
            ra = m.attn_rank
            # column q|k|v: A_q, A_k, A_v [h, ra], B [ra, out / tp]; row o: A [q / tp, ra], B [ra, h]
            return 3 * h * ra + ra * (q + 2 * kv) // tp + (q // tp) * ra + ra * h
        return (h * (q + 2 * kv) + q * h) // tp

    def ffn_matrix_parameters(self, m: ModelConfig, tp: int = 1) -> int:
        """Matrix parameters of the FFN on one TP rank. Default: full-rank SwiGLU gate, up, down."""
        return 3 * m.hidden_size * m.ffn_hidden_size // tp

    def sparse_operand_parameters(self, m: ModelConfig, tp: int = 1) -> int:
        """Parameters that multiply a 2:4-sparse operand (ELAS's ``A_down``); 0 without sparsity."""
        return 0

    # ------------------------------------------------------------------------------------ activation memory
    def ffn_activation_terms(self, m: ModelConfig, terms: ActivationTerms) -> None:
        """Add the tensors the FFN keeps for its backward after ``fc1_in`` (pre-MLP norm output).

        Default: the fused SwiGLU's input ``[gate | up]`` and its output (full-rank linears keep only inputs).
        """
        f = m.ffn_hidden_size
        terms.add("swiglu_in", terms.e * 2 * f / terms.tp, terms.ffn, "[gate | up], input of the fused SwiGLU")
        terms.add("fc2_in", terms.e * f / terms.tp, terms.ffn, "SwiGLU output, input of linear_fc2")

    # ------------------------------------------------------------------------------------------------ export
    def check_export(self, fmt: str) -> None:
        """Raise :class:`ExportUnsupportedError` (one line, with the alternative) if ``fmt`` cannot hold the model."""
        if fmt == "hf" and not self.hf_llama:
            alternative = ("export it with --format torch (state dict + standalone inference module)"
                           if self.standalone_mlp is not None else "no export format holds it")
            raise ExportUnsupportedError(f"model.variant={self.name!r} {self.hf_reason}, which LlamaForCausalLM "
                                         f"cannot hold; {alternative}")
        if fmt == "torch" and self.standalone_mlp is None:
            raise ExportUnsupportedError(f"model.variant={self.name!r} has an FFN that the standalone inference "
                                         "module (modeling_elas.py) cannot represent; it cannot be exported")

    def default_export_format(self) -> str:
        """``elas-export --format auto``: ``hf`` for a LLaMA network, else ``torch``."""
        return "hf" if self.hf_llama else "torch"
