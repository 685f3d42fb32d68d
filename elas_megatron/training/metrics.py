"""Structured training logs: one JSON object per logged step in ``{run_dir}/metrics.jsonl`` plus a console line.

The trainer drives :class:`MetricsLogger` as one of its callbacks (:mod:`elas_megatron.training.callbacks`): a
record every ``log.every`` steps and at the last step, one per evaluation, one per resume.

Keys are flat and stable because scripts and plots read them: ``step``, ``loss``, ``lr``, ``grad_norm``,
``tokens_per_s``, ``step_time_s``, ``tokens`` (consumed so far), and on CUDA ``mfu`` and ``mem_peak_gib`` (the
peak allocated memory during that step); evaluation records carry ``val_loss`` and ``val_ppl``. Only the logging
rank writes. The JSONL holds each step's own values; the console line summarises the steps since the previous line
(``log.every``): mean loss, tokens/s (their tokens over their time), MFU from that tokens/s, the highest memory peak
of those steps, ``step N/M``, elapsed time and an ETA from that interval's step time.

Metric sinks (:mod:`elas_megatron.training.sinks`, e.g. TensorBoard with ``log.tensorboard``) receive every step and
evaluation record written here, under slash-namespaced names.

The file is appended to across restarts. Every run first writes ``{"event": "resume", "step": S, "checkpoint":
"step_..."}`` (:meth:`MetricsLogger.log_resume`), S = 0 and checkpoint null when it starts from scratch; records
written before it for steps after S are superseded (an earlier attempt trained them, then the state went back to
S -- e.g. a kill -9 before the first checkpoint). :func:`read_metrics` reads the file that way.

Metrics are not worth a lost run: a failed write (``OSError``, e.g. a full disk) logs one warning and training
continues; records are dropped until writes succeed again (then one line says how many were lost). A record is
written with one ``write``; a torn line left by a failed write or a kill is terminated before the next record,
and :func:`read_metrics` skips lines that are not JSON with a warning.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from elas_megatron.training.callbacks import Callback
from elas_megatron.training.sinks import MetricSink, sink_scalars
from elas_megatron.utils.interrupts import deferred
from elas_megatron.utils.progress import hms as _hms

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peak per GPU (datasheet, no sparsity): MFU is reported against these.
_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "GH200": 989e12, "B200": 2250e12}

RESUME_EVENT = "resume"


def read_metrics(path: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl`` that describe the run as it finally went: a resume event (written when a
    run resumed from the checkpoint of step S) drops every earlier record of a step after S. Resume events
    themselves are not returned. A line that is not a complete record (torn by a full disk or a kill) is skipped
    with a warning.

    Args:
        path: a ``metrics.jsonl`` file.

    Returns:
        Step and evaluation records in file order.
    """
    records: list[dict] = []
    lines = Path(path).read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or "step" not in rec:
            where = "last line" if number == len(lines) else f"line {number}"
            logger.warning("%s: ignoring the %s, which is not a complete record (a write torn by a full disk or a "
                           "kill): %.80r", path, where, line)
            continue
        if rec.get("event") == RESUME_EVENT:
            records = [r for r in records if r["step"] <= rec["step"]]
        else:
            records.append(rec)
    return records


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of ``device`` (None on CPU or an unknown GPU: MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


class MetricsLogger(Callback):
    """Writes step, evaluation and resume records to ``{run_dir}/metrics.jsonl`` (logging rank only).

    As a callback it writes the step record of every ``every``-th step and of step ``last_step``
    (:meth:`on_step_end`), evaluation (:meth:`on_evaluate`) and resume (:meth:`on_resume`) records. ``sinks``
    receive the step and evaluation records too (when ``enabled``); they are closed at the end of training.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool, flops_per_token: float | None,
                 device: torch.device, num_gpus: int, every: int = 1, last_step: int | None = None,
                 sinks: list[MetricSink] | tuple[MetricSink, ...] = ()) -> None:
        self.enabled = enabled
        self.every = every
        self.last_step = last_step
        self.sinks = list(sinks) if enabled else []
        self._start: float | None = None  # perf_counter at the first step of this process
        # (loss, tokens, seconds, memory peak GiB or None) of the steps since the last console line
        self._window: list[tuple[float, int, float, float | None]] = []
        self.flops_per_token = flops_per_token
        self.device = device
        peak = peak_flops(device)
        self.peak_total = peak * num_gpus if peak else None
        self.path = Path(run_dir) / "metrics.jsonl"
        self._check_tail = True  # before the next write: terminate a torn last line (a kill, a failed write)
        self._lost = 0  # records not written since the last failure
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    # callback interface ------------------------------------------------------------------------------------
    def on_step_begin(self, trainer, step: int) -> None:
        if self._start is None:
            self._start = time.perf_counter()
        if self.device.type == "cuda":  # mem_peak_gib: this step's own peak
            torch.cuda.reset_peak_memory_stats(self.device)

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        self._window.append((metrics["loss"], metrics["tokens_per_step"], metrics["step_time_s"],
                             self._memory_peak_gib()))
        if step % self.every == 0 or step == self.last_step:
            self.log_step(step=step, **metrics)
        elif (metrics.get("extra") or {}).get("sparsity/act_density") is not None:
            logger.info("step %d: sparsity/act_density %.4f", step, metrics["extra"]["sparsity/act_density"])

    def on_evaluate(self, trainer, step: int, val_loss: float) -> None:
        self.log_eval(step=step, val_loss=val_loss)

    def on_resume(self, trainer, path: Path) -> None:
        self.log_resume(step=trainer.step, checkpoint=Path(path).name)

    def on_train_end(self, trainer) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close the sinks."""
        for sink in self.sinks:
            sink.close()

    # records ---------------------------------------------------------------------------------------------
    def _write(self, record: dict) -> None:
        self._append(json.dumps(record) + "\n")
        if "event" not in record:
            scalars = sink_scalars(record)
            for sink in self.sinks:
                sink.write(record["step"], scalars)

    def _append(self, line: str) -> None:
        """Append one line to the file with a single write; on OSError warn once and go on (see module doc)."""
        try:
            with self.path.open("ab") as f:
                if self._check_tail and f.tell() > 0:
                    with self.path.open("rb") as r:
                        r.seek(-1, 2)
                        if r.read(1) != b"\n":
                            line = "\n" + line  # the torn line stays a line of its own; read_metrics skips it
                f.write(line.encode())
            self._check_tail = False
        except OSError as exc:
            self._check_tail = True
            if not self._lost:
                logger.warning("cannot write %s (%s: %s); training continues, metrics records are dropped until "
                               "writes succeed again", self.path, type(exc).__name__, exc)
            self._lost += 1
            return
        if self._lost:
            logger.warning("%s is writable again; %d record(s) were lost", self.path, self._lost)
            self._lost = 0

    def _memory_peak_gib(self) -> float | None:
        """Peak allocated memory (GiB) since the current step began; None off CUDA."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def _mfu(self, tokens_per_s: float) -> float | None:
        if not (self.peak_total and self.flops_per_token) or not math.isfinite(tokens_per_s):
            return None
        return tokens_per_s * self.flops_per_token / self.peak_total

    def _window_summary(self, step: int) -> dict[str, str]:
        """Console parts from the steps since the last line (and empties it): ``loss`` (mean), ``tok/s`` (their
        tokens over their time), ``mfu`` (from that tokens/s), ``mem`` (their highest peak), ``elapsed``, ``ETA``."""
        window, self._window = self._window, []
        if not window:
            return {}
        losses = [w[0] for w in window if math.isfinite(w[0])]
        seconds = sum(w[2] for w in window)
        tokens_per_s = sum(w[1] for w in window) / seconds if seconds > 0 else float("nan")
        parts = {"loss": f"loss {sum(losses) / len(losses):.4f}" if losses else "loss n/a",
                 "tok/s": f"{tokens_per_s:,.0f} tok/s" if seconds > 0 else "tok/s n/a"}
        mfu = self._mfu(tokens_per_s)
        if mfu is not None:
            parts["mfu"] = f"mfu {100 * mfu:.1f}%"
        peaks = [w[3] for w in window if w[3] is not None]
        if peaks:
            parts["mem"] = f"mem {max(peaks):.1f} GiB"
        if self._start is not None:
            parts["elapsed"] = f"elapsed {_hms(time.perf_counter() - self._start)}"
        if self.last_step is not None and step < self.last_step and seconds > 0:
            parts["ETA"] = f"ETA {_hms((self.last_step - step) * seconds / len(window))}"
        return parts

    def log_step(self, *, step: int, loss: float, lr: float, grad_norm: float | None, tokens_per_step: int,
                 step_time_s: float, tokens: int, extra: dict | None = None) -> dict:
        tokens_per_s = tokens_per_step / step_time_s if step_time_s > 0 else float("nan")
        rec = {"step": step, "loss": loss, "lr": lr,
               "grad_norm": grad_norm if grad_norm is None or math.isfinite(grad_norm) else str(grad_norm),
               "tokens_per_s": tokens_per_s, "step_time_s": step_time_s, "tokens": tokens}
        mem = self._memory_peak_gib()
        if mem is not None:
            rec["mem_peak_gib"] = mem
        mfu = self._mfu(tokens_per_s)
        if mfu is not None:
            rec["mfu"] = mfu
        if extra:
            rec.update(extra)
        if self.enabled:
            self._write(rec)
            # the interval's values; a record logged outside the callbacks (no window) shows its own
            window = self._window_summary(step) or {
                "loss": f"loss {loss:.4f}", "tok/s": f"{tokens_per_s:,.0f} tok/s",
                **({"mfu": f"mfu {100 * mfu:.1f}%"} if mfu is not None else {}),
                **({"mem": f"mem {mem:.1f} GiB"} if mem is not None else {})}
            parts = [f"step {step}/{self.last_step}" if self.last_step else f"step {step}", window["loss"],
                     window["tok/s"], f"lr {lr:.3e}",
                     f"grad_norm {grad_norm:.3f}" if grad_norm is not None else "grad_norm n/a"]
            parts.extend(window[k] for k in ("mfu", "mem", "elapsed", "ETA") if k in window)
            for key, value in (extra or {}).items():
                parts.append(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}")
            logger.info(" | ".join(parts))
        return rec

    def log_resume(self, *, step: int, checkpoint: str | None) -> dict:
        """Mark that the run resumed from ``checkpoint`` at ``step`` (a run from scratch: step 0, checkpoint None):
        later records supersede earlier records of steps after ``step`` (see :func:`read_metrics`), in the sinks
        as in the file."""
        rec = {"event": RESUME_EVENT, "step": step, "checkpoint": checkpoint}
        if self.enabled:
            with deferred():  # written at start-up: a stop signal there waits for the one record
                self._write(rec)
            for sink in self.sinks:
                sink.resume(step)
        return rec

    def log_eval(self, *, step: int, val_loss: float) -> dict:
        rec = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if self.enabled:
            self._write(rec)
            logger.info(f"step {step} | validation loss {val_loss:.4f} | validation perplexity {rec['val_ppl']:.2f}")
        return rec

