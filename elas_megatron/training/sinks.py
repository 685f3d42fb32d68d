# SPDX-License-Identifier: Apache-2.0
"""Metric sinks: other places the records of ``metrics.jsonl`` go (TensorBoard, Weights & Biases), behind one small
interface.

``metrics.jsonl`` stays the source of truth; :class:`~elas_megatron.training.metrics.MetricsLogger` hands every
step and evaluation record it writes there to each sink too, on the logging rank only. A sink receives the record's
numeric values under slash-namespaced names (:func:`sink_scalars`): ``loss/train``, ``loss/val``,
``perf/tokens_per_s``, ``perf/mfu``, ``memory/peak_gib``, ``sparsity/act_density``, ``optim/lr``,
``optim/grad_norm``, ...

A sink whose package is missing stops the run at start-up (:func:`check_sinks`, on every rank, before the model is
built) with one line naming the extra to install.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import string
from pathlib import Path
from urllib.parse import urlparse

from elas_megatron.utils.errors import ConfigError

__all__ = ["MetricSink", "TensorBoardSink", "WandbSink", "build_sinks", "check_sinks", "resolve_wandb_mode",
           "sink_scalars"]

logger = logging.getLogger(__name__)

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
    wrote for the steps after the checkpoint, and a resumed run has one value per step.

    A write only queues the values: the writer's own thread writes them and flushes the file every
    :attr:`FLUSH_S` seconds, and :meth:`close` flushes the rest. Why not flush at each write: ``flush`` waits for
    that thread, inside the training step, where every other rank waits in a collective for this one; beside two
    CPU hogs that wait took over 8 s, and the watchdog took it for a hang. The package is imported at construction
    (start-up) for the same reason: importing it takes seconds on a busy node."""

    FLUSH_S = 10
    """TensorBoard shows a value at most this long after its step (metrics.jsonl at once)."""
    MAX_QUEUE = 1000
    """Values queued before a write waits for the writer's thread (about 80 steps of records)."""

    def __init__(self, log_dir: str | Path) -> None:
        _require("tensorboard", "tensorboard", "log.tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self._writer = None
        self._purge_step: int | None = None

    def resume(self, step: int) -> None:
        self.close()
        self._purge_step = step + 1

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self._writer is None:
            self._writer = self._writer_class(str(self.log_dir), purge_step=self._purge_step,
                                              max_queue=self.MAX_QUEUE, flush_secs=self.FLUSH_S)
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


WANDB_STATE = "wandb_run.json"
"""In the run directory: the W&B run's id and project and the last step sent to it (``--resume`` continues it)."""


def _wandb_api_key_found(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str, timeout_s: float = 3.0) -> tuple[str, str]:
    """``log.wandb_mode`` -> (``online`` | ``offline``, why). ``auto`` honours an environment ``WANDB_MODE``, else is
    online only when an API key is found (``WANDB_API_KEY``, ``~/.netrc``) and the server (``WANDB_BASE_URL``, default
    https://api.wandb.ai) accepts a TCP connection within ``timeout_s``."""
    if mode != "auto":
        return mode, f"log.wandb_mode={mode}"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "dryrun", "disabled"):
        return {"dryrun": "offline"}.get(env, env), f"WANDB_MODE={env}"
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host = url.hostname or "api.wandb.ai"
    if not _wandb_api_key_found(host):
        return "offline", "no W&B API key (WANDB_API_KEY or ~/.netrc)"
    try:
        socket.create_connection((host, url.port or (80 if url.scheme == "http" else 443)), timeout=timeout_s).close()
    except OSError as exc:
        return "offline", f"{host} is not reachable ({type(exc).__name__})"
    return "online", "an API key and a reachable server"


class WandbSink(MetricSink):
    """Weights & Biases: each record's scalars are logged at its training step, in one W&B run per run directory.

    The run's id, project and the last step it was sent are kept in ``{run_dir}/wandb_run.json``. A trainer built
    with ``resume=True`` continues that run (same id, ``resume="allow"``); otherwise a new run starts and its id
    replaces the stored one. W&B accepts a step once (later values of a step it already has are dropped), so after a
    resume from a checkpoint older than the last step sent (an interrupted run trained past its last checkpoint),
    the steps up to that last step are not sent again: W&B keeps the interrupted run's values there, while
    metrics.jsonl and TensorBoard hold the resumed run's. One log line says so.

    The W&B run opens at :meth:`resume` (the trainer calls it once the model is built and any checkpoint loaded) or
    at the first :meth:`write`. If ``wandb.init`` or a ``log`` fails (no network in online mode, a bad key), one
    warning is logged and training continues without W&B: metrics are not worth a lost run.
    """

    def __init__(self, run_dir: str | Path, *, project: str, entity: str | None = None, mode: str = "auto",
                 resume: bool = False, config: dict | None = None) -> None:
        _require("wandb", "wandb", "log.wandb_project")
        self.run_dir = Path(run_dir)
        self.state_path = self.run_dir / WANDB_STATE
        self.project, self.entity, self.config = project, entity, config
        self.mode, self._why = resolve_wandb_mode(mode)
        self.run = None
        self._failed = False
        self._floor: int | None = None  # steps <= floor are already in the W&B run (sent by an earlier process)
        self._dropped = 0
        state = self._read_state() if resume else None
        if state is not None and state.get("project") == project and state.get("entity") == entity:
            self.run_id, self._last = str(state["id"]), state.get("last_step")
        else:  # W&B's own id format: 8 characters of [a-z0-9]
            self.run_id, self._last = "".join(secrets.choice(string.ascii_lowercase + string.digits)
                                              for _ in range(8)), None

    def _read_state(self) -> dict | None:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and state.get("id") else None

    def _save_state(self) -> None:
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"id": self.run_id, "project": self.project, "entity": self.entity,
                                       "last_step": self._last}) + "\n")
            os.replace(tmp, self.state_path)
        except OSError as exc:
            logger.warning("cannot write %s (%s); a --resume will start a new W&B run", self.state_path, exc)

    def _open(self) -> bool:
        if self.run is None and not self._failed:
            import wandb

            try:
                self.run = wandb.init(project=self.project, entity=self.entity, id=self.run_id, resume="allow",
                                      mode=self.mode, dir=str(self.run_dir), name=self.run_dir.name,
                                      config=self.config, reinit="create_new")
            except Exception as exc:  # noqa: BLE001 -- whatever W&B raises, training goes on without it
                self._failed = True
                logger.warning("W&B run %s could not start (%s: %s); training continues without W&B "
                               "(metrics.jsonl has every record)", self.run_id, type(exc).__name__,
                               str(exc).splitlines()[0] if str(exc) else "")
                return False
            self._save_state()
            logger.info("W&B run %s (project %s, %s: %s)%s", self.run_id, self.project, self.mode, self._why,
                        f"; upload with: wandb sync {self.run_dir / 'wandb'}/offline-run-*-{self.run_id}"
                        if self.mode == "offline" else "")
        return self.run is not None

    def resume(self, step: int) -> None:
        self._floor = self._last
        if self._last is not None and self._last > step:
            logger.info("W&B run %s already holds steps up to %d; this run resumed at step %d, so its values of "
                        "steps %d-%d go to metrics.jsonl and TensorBoard only (W&B accepts each step once)",
                        self.run_id, self._last, step, step + 1, self._last)
        self._open()

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self._floor is not None and step <= self._floor:
            self._dropped += 1
            return
        if not self._open():
            return
        try:
            self.run.log(scalars, step=step)
        except Exception as exc:  # noqa: BLE001 -- as in _open: W&B's failure is not the run's
            logger.warning("W&B run %s: logging step %d failed (%s: %s); training continues without W&B "
                           "(metrics.jsonl has every record)", self.run_id, step, type(exc).__name__, exc)
            self.run, self._failed = None, True
            return
        if self._last is None or step > self._last:
            self._last = step
            self._save_state()

    def close(self) -> None:
        if self._dropped:
            logger.info("W&B run %s: %d record(s) of steps it already held were not sent again", self.run_id,
                        self._dropped)
            self._dropped = 0
        if self.run is not None:
            self.run.finish()
            self.run = None


def check_sinks(log_cfg) -> None:
    """Raise a one-line :class:`ConfigError` if a requested sink's package is missing (call on every rank)."""
    if log_cfg.tensorboard:
        _require("tensorboard", "tensorboard", "log.tensorboard")
    if log_cfg.wandb_project:
        _require("wandb", "wandb", "log.wandb_project")


def build_sinks(log_cfg, run_dir: str | Path, *, resume: bool = False, config: dict | None = None) -> list[MetricSink]:
    """The sinks ``log_cfg`` asks for (for the logging rank). ``resume``: the trainer continues from the run
    directory's latest checkpoint (the W&B run continues too); ``config``: the resolved config, for W&B."""
    sinks: list[MetricSink] = []
    if log_cfg.tensorboard:
        sinks.append(TensorBoardSink(Path(run_dir) / "tensorboard"))
    if log_cfg.wandb_project:
        sinks.append(WandbSink(run_dir, project=log_cfg.wandb_project, entity=log_cfg.wandb_entity,
                               mode=log_cfg.wandb_mode, resume=resume, config=config))
    return sinks
