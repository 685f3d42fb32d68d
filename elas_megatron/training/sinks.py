# SPDX-License-Identifier: Apache-2.0
"""Metric sinks: other places the records of ``metrics.jsonl`` go (TensorBoard), behind one small interface.

``metrics.jsonl`` stays the source of truth; :class:`~elas_megatron.training.metrics.MetricsLogger` hands every
step and evaluation record it writes there to each sink too, on the logging rank only. A sink receives the record's
numeric values under slash-namespaced names (:func:`sink_scalars`): ``loss/train``, ``loss/val``,
``perf/tokens_per_s``, ``perf/mfu``, ``memory/peak_gib``, ``sparsity/act_density``, ``optim/lr``,
``optim/grad_norm``, ...

A sink whose package is missing stops the run at start-up (:func:`check_sinks`, on every rank, before the model is
built) with one line naming the extra to install.
"""
from __future__ import annotations

import math
from pathlib import Path

from elas_megatron.utils.errors import ConfigError

__all__ = ["MetricSink", "TensorBoardSink", "build_sinks", "check_sinks", "sink_scalars"]

SINK_KEYS = {
    "loss": "loss/train",
    "val_loss": "loss/val",
    "val_ppl": "loss/val_ppl",
    "tokens_per_s": "perf/tokens_per_s",
    "step_time_s": "perf/step_time_s",
    "mfu": "perf/mfu",
    "mem_peak_gib": "memory/peak_gib",
    "lr": "optim/lr",
    "grad_norm": "optim/grad_norm",
    "skipped_steps": "optim/skipped_steps",
    "tokens": "progress/tokens",
}
"""metrics.jsonl key -> sink name; keys that already hold a ``/`` (``sparsity/act_density``) keep their name."""


def sink_scalars(record: dict) -> dict[str, float]:
    """The finite numeric values of a metrics.jsonl record under their sink names (``step`` and flags left out)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = SINK_KEYS.get(key, key if "/" in key else None)
        if name is not None and math.isfinite(value):
            out[name] = float(value)
    return out


class MetricSink:
    """Where records go besides metrics.jsonl. ``write`` gets a step's scalars (see :func:`sink_scalars`)."""

    def resume(self, step: int) -> None:
        """The run resumed from the checkpoint of ``step``: values already written for later steps are superseded."""

    def write(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release (end of training)."""


def _require(module: str, extra: str, key: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(f"{key} needs the '{module}' package, which is not installed: "
                          f"pip install 'elas-megatron[{extra}]' (or set {key} off)") from None


class TensorBoardSink(MetricSink):
    """TensorBoard scalars in ``log_dir`` (torch.utils.tensorboard's SummaryWriter). The writer opens at the first
    value; after :meth:`resume` it opens with ``purge_step`` so that TensorBoard drops the values an interrupted run
    wrote for the steps after the checkpoint, and a resumed run has one value per step."""

    def __init__(self, log_dir: str | Path) -> None:
        _require("tensorboard", "tensorboard", "log.tensorboard")
        self.log_dir = Path(log_dir)
        self._writer = None
        self._purge_step: int | None = None

    def resume(self, step: int) -> None:
        self.close()
        self._purge_step = step + 1

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=self._purge_step)
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def check_sinks(log_cfg) -> None:
    """Raise a one-line :class:`ConfigError` if a requested sink's package is missing (call on every rank)."""
    if log_cfg.tensorboard:
        _require("tensorboard", "tensorboard", "log.tensorboard")


def build_sinks(log_cfg, run_dir: str | Path) -> list[MetricSink]:
    """The sinks ``log_cfg`` asks for (for the logging rank)."""
    sinks: list[MetricSink] = []
    if log_cfg.tensorboard:
        sinks.append(TensorBoardSink(Path(run_dir) / "tensorboard"))
    return sinks
