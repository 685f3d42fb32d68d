# SPDX-License-Identifier: Apache-2.0
"""When the ELAS FFN's 2:4 activation sparsity is on: a dense warm-up, then sparse (arXiv 2605.03667, Sec. 3).

Early in training the activations change fast and a 2:4 pattern chosen from random weights discards signal;
``model.dense_warmup_steps`` trains the same network computed dense for the first N steps (step indices
``0 .. N-1``), after which every :class:`SwitchableSparsity` module (the ELAS FFN,
:class:`~elas_megatron.layers.mlp.ElasMLP`) applies the 2:4 selection. The schedule is a pure function of the
step, so resuming from a checkpoint needs no extra state. The layers implement :class:`SwitchableSparsity`; this
module never imports them.

:func:`activation_density` reads the density of ``s`` recorded by the last forward (for the
``sparsity/act_density`` metric) once tracking is switched on with :func:`set_density_tracking`.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

import torch

__all__ = ["SwitchableSparsity", "SparsitySchedule", "activation_density", "elas_mlps", "set_density_tracking"]

logger = logging.getLogger(__name__)


@runtime_checkable
class SwitchableSparsity(Protocol):
    """A module whose 2:4 activation sparsity the schedule switches at run time (the ELAS FFN implements it).

    Attributes:
        sparse_active: the schedule's switch (the dense warm-up sets it False).
        is_sparse: whether the next forward applies 2:4 sparsity (``sparse_active`` and the module allows it).
        track_density: when True, each forward records ``last_density``.
        last_density: the non-zero fraction of the sparse activation in the last forward, or None.
    """

    sparse_active: bool
    track_density: bool
    last_density: float | None

    @property
    def is_sparse(self) -> bool: ...


def _chunks(model_chunks: torch.nn.Module | Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    return [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)


def elas_mlps(model_chunks: torch.nn.Module | Iterable[torch.nn.Module]) -> Iterator[SwitchableSparsity]:
    """Every :class:`SwitchableSparsity` module (ElasMLP) in a model or list of model chunks (wrappers such as
    DDP are looked through)."""
    for chunk in _chunks(model_chunks):
        for module in chunk.modules():
            if isinstance(module, SwitchableSparsity):
                yield module


class SparsitySchedule:
    """Dense for the first ``dense_warmup_steps`` steps, 2:4-sparse afterwards.

    Args:
        dense_warmup_steps: ``model.dense_warmup_steps`` (0 = sparse from the first step).
    """

    def __init__(self, dense_warmup_steps: int = 0) -> None:
        if dense_warmup_steps < 0:
            raise ValueError(f"model.dense_warmup_steps={dense_warmup_steps} must be >= 0")
        self.dense_warmup_steps = dense_warmup_steps
        self._last_state: bool | None = None

    def is_sparse(self, step: int) -> bool:
        """Whether the step with 0-based index ``step`` runs with 2:4 sparsity."""
        return step >= self.dense_warmup_steps

    def apply(self, model_chunks: torch.nn.Module | Iterable[torch.nn.Module], step: int) -> bool:
        """Switch every ElasMLP for the step ``step`` (call before its forward). Returns :meth:`is_sparse`.

        ``model.sparse24=false`` modules stay dense whatever the schedule says (``ElasMLP.is_sparse``).
        """
        sparse = self.is_sparse(step)
        modules = list(elas_mlps(model_chunks))
        for module in modules:
            module.sparse_active = sparse
        if modules and sparse != self._last_state:
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                if sparse:
                    logger.info("sparsity: 2:4 activation sparsity ON at step %d in %d ElasMLP modules%s", step,
                                len(modules), " (dense warm-up over)" if self.dense_warmup_steps else "")
                else:
                    logger.info("sparsity: dense warm-up, steps %d..%d run without 2:4 sparsity", step,
                                self.dense_warmup_steps - 1)
            self._last_state = sparse
        return sparse

    def state_dict(self) -> dict:
        """The schedule's configuration (it has no state beyond the step, which the trainer owns)."""
        return {"dense_warmup_steps": self.dense_warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        if state.get("dense_warmup_steps", self.dense_warmup_steps) != self.dense_warmup_steps:
            logger.warning("sparsity: checkpoint had dense_warmup_steps=%s, this run uses %d (the config wins)",
                           state["dense_warmup_steps"], self.dense_warmup_steps)


def set_density_tracking(model_chunks: torch.nn.Module | Iterable[torch.nn.Module], enabled: bool) -> None:
    """Make every ElasMLP record the density of ``s`` in its forward (costs one elementwise pass over y1)."""
    for module in elas_mlps(model_chunks):
        module.track_density = enabled
        if not enabled:
            module.last_density = None


def activation_density(model_chunks: torch.nn.Module | Iterable[torch.nn.Module]) -> float | None:
    """Mean non-zero fraction of ``s = sparse24(relu(y1)**2)`` over this rank's ElasMLPs in the last forward.

    At most 0.5 with sparsity on (fewer where ReLU already zeroed a group). Measured on this rank's TP shard
    and micro-batch: a cheap estimate for logging, not reduced over ranks. None if nothing was recorded.
    """
    values = [m.last_density for m in elas_mlps(model_chunks) if m.last_density is not None]
    return sum(values) / len(values) if values else None
