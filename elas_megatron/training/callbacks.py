# SPDX-License-Identifier: Apache-2.0
"""Hooks into the training loop: ``Trainer(cfg, callbacks=[...])`` calls them at fixed points.

A :class:`Callback` overrides the methods it needs; the others do nothing. They exist so that code that watches
or instruments a run -- the metrics log, benchmarks that time steps, tests that inject faults -- lives outside
the loop instead of being written into it or patched onto it. Every rank calls its own callbacks; a callback
that must act on one rank only checks ``trainer.info`` itself.

Step numbers are 1-based, as logged in ``metrics.jsonl``: ``on_step_begin(trainer, 5)`` starts the step that
``on_step_end(trainer, 5, ...)`` ends (``trainer.step`` is 4 before it and 5 after it).

The trainer's own :class:`~elas_megatron.training.metrics.MetricsLogger` is a callback too; it runs after the
callbacks given to the trainer, so they may add keys to a step's ``metrics`` before it is written.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from elas_megatron.training.trainer import Trainer

__all__ = ["Callback", "CallbackList"]


class Callback:
    """Base class of training-loop hooks; each method is a no-op until overridden."""

    def on_model_built(self, trainer: Trainer) -> None:
        """The model chunks, optimizer backend and data exist; the numerical guard's hooks and a resume's
        checkpoint load come next. For hooks on the model that must run before the guard's (their effect is then
        checked like the model's own), and for state that a resume must overwrite (e.g. seeding generators)."""

    def on_resume(self, trainer: Trainer, path: Path) -> None:
        """The state of checkpoint ``path`` was loaded (``trainer.step`` is its step): records written by an
        interrupted run for later steps are superseded from here."""

    def on_step_begin(self, trainer: Trainer, step: int) -> None:
        """Training step ``step`` starts (nothing of it has run): per-step set-up and timing start."""

    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        """Forward and backward of the step are done and its gradients passed the numerical check; the
        optimizer is about to update the weights (not called for a skipped step)."""

    def on_after_optimizer_step(self, trainer: Trainer) -> None:
        """The optimizer has updated the weights (pairs with :meth:`on_before_optimizer_step`)."""

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict) -> None:
        """Step ``step`` is done. ``metrics``: ``loss``, ``lr``, ``grad_norm`` (None for a skipped step),
        ``step_time_s`` (the device synchronised around the step), ``tokens_per_step``, ``tokens`` (consumed
        so far) and ``extra`` (a dict of further keys for the log: ``sparse24``, ``sparsity/act_density``,
        ``skipped_steps`` when they apply)."""

    def on_evaluate(self, trainer: Trainer, step: int, val_loss: float) -> None:
        """A validation pass after step ``step`` gave ``val_loss``."""

    def on_checkpoint_phase(self, phase: str, step: int) -> None:
        """``CheckpointManager.save`` of step ``step`` reached ``phase``: ``begin``, ``scheduled``
        (``checkpoint.async_save``: background writers started), ``written`` (all files written, not yet
        published) or ``published`` (renamed into place, ``latest`` not yet updated). The points where a crash
        leaves distinct on-disk states; called on every rank (``published`` on rank 0 only)."""

    def on_save_end(self, trainer: Trainer, path: Path) -> None:
        """A checkpoint was saved to ``path`` (with ``checkpoint.async_save``: scheduled; published there later)."""

    def on_train_end(self, trainer: Trainer) -> None:
        """``Trainer.train`` is returning (trained to ``train.steps``, stopped by a signal, or failed): flush and
        release what the callback holds."""


class CallbackList:
    """Several callbacks called in order, as one: ``callbacks.on_step_end(trainer, step, metrics)`` calls each
    callback's ``on_step_end`` with those arguments (every hook of :class:`Callback`, none other)."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def __getattr__(self, hook: str):
        if not (hook.startswith("on_") and callable(getattr(Callback, hook, None))):
            raise AttributeError(f"{type(self).__name__} has no attribute {hook!r} (not a Callback hook)")

        def dispatch(*args) -> None:
            for cb in self.callbacks:
                getattr(cb, hook)(*args)

        return dispatch
