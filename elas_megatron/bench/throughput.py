# SPDX-License-Identifier: Apache-2.0
"""Throughput of dense, cola and elas: training steps or forward-only prefill, over micro-batch sizes.

A *worker* (:func:`measure`) builds one variant at one sequence length and walks a list of micro-batch sizes in
ascending order. Per batch size it runs warm-up steps, timed steps and profiled steps, and emits one record:

* ``tokens_per_s`` = tokens of a step / median timed step time (the device is synchronised around each step);
* ``mfu`` = tokens/s x model FLOPs per token / the GPU's dense bf16 peak (``training.metrics.peak_flops``).
  Training FLOPs per token are :func:`elas_megatron.models.flops.flops_per_token` (2:4 sparsity counted as
  dense); prefill FLOPs are :func:`prefill_flops_per_token`;
* ``state_gib``: memory allocated before the step's first forward (weights, gradient buffers, optimizer
  states); ``peak_gib`` = ``torch.cuda.max_memory_allocated`` over the timed steps; ``activation_gib`` = the
  peak of forward + backward (read just before the optimizer step) minus ``state_gib``;
  ``optimizer_peak_gib`` = the peak during the optimizer step;
* ``time_*_ms``: the per-step split of :class:`elas_megatron.bench.timing.ModuleTimer` on the profiled steps:
  attention (of which core attention), FFN, output layer, optimizer step, gradient synchronisation
  (``finalize_model_grads``: the data-parallel all-reduce / reduce-scatter) and the rest (embedding, norms,
  loss, data, schedule). On a CPU the memory fields are None and the timings are host timings.

An out-of-memory error (CUDA OOM, an ``*_ALLOC_FAILED`` library status or ``MemoryError``) ends the worker's
walk with a record of status ``oom``; the parent (:func:`run_sweep`) stops increasing that variant's batch.
The parent runs workers as subprocesses: ``isolation="config"`` (default) starts one per (variant, micro-batch,
sequence length), so every peak and every OOM belongs to that configuration alone; ``isolation="variant"`` starts
one per (variant, sequence length) that walks all batch sizes (one model build instead of one per batch; peaks
are still per batch, read after ``reset_peak_memory_stats`` and ``empty_cache``), and re-runs a batch that ran
out of memory after others in a fresh process before believing it; ``isolation="none"`` runs in this process
(tests, debugging).

Data are random tokens (uniform over the vocabulary): speed does not depend on them. Weights are drawn on the
device (``Trainer(..., weight_init="fast")``, :func:`elas_megatron.models.init.initialize_weights_fast`) instead of
the layout-invariant CPU initialisation, which takes tens of seconds per process at 1B; the values do not change
the speed. ``--exact-init`` keeps the training initialisation.

Training steps are observed through the trainer's callbacks (:class:`StepProbe`): the step time with the device
synchronised around the step, the memory peaks before and during the optimizer step, and the optimizer's
interval of the time split. Nothing of the trainer is replaced.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from elas_megatron.training.callbacks import Callback
from elas_megatron.variants.registry import get_variant

__all__ = ["TINY_OVERRIDES", "StepProbe", "WorkerSpec", "measure", "prefill_flops_per_token", "run_sweep"]

logger = logging.getLogger(__name__)

TINY_OVERRIDES = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.ffn_hidden_size=128",
                  "model.rank=16", "model.vocab_size=256", "train.device=cpu", "train.dtype=fp32"]
"""A 2-layer fp32 model on the CPU: checks that everything runs; its numbers mean nothing."""

_GIB = 2**30
RESULT_PREFIX = "RESULT "


@dataclasses.dataclass(kw_only=True)
class WorkerSpec:
    """One worker: a variant at one sequence length over ascending micro-batch sizes."""
    configs: list[str]
    """YAML files merged left to right (as ``elas-train``)."""
    overrides: list[str]
    """``section.key=value`` overrides applied after the YAML files (before the bench's own)."""
    variant: str
    mode: str
    """``train`` (forward + backward + optimizer step) or ``inference`` (forward-only prefill)."""
    seq_len: int
    micro_batches: list[int]
    accumulation: int = 1
    """Micro-batches per optimizer step (train)."""
    steps: int = 5
    warmup_steps: int = 2
    profile_steps: int = 1
    vocab_size: int = 32000
    """Used when the configs leave ``model.vocab_size`` unset."""
    fast_init: bool = True
    run_dir: str = "runs/bench"
    label: str = ""
    simulate_oom_above: int | None = None
    """Tests: raise an out-of-memory error for micro-batches above this."""


# ------------------------------------------------------------------------------------------------- helpers
class RandomTokens:
    """Samples of uniformly random tokens, generated from their index (no files, any length)."""

    def __init__(self, *, seq_len: int, vocab_size: int, seed: int = 0) -> None:
        self.seq_len, self.vocab_size, self.seed = seq_len, vocab_size, seed

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        seq = np.random.default_rng((self.seed, index)).integers(0, self.vocab_size, size=self.seq_len + 1)
        return {"tokens": seq[:-1], "labels": seq[1:], "loss_mask": np.ones(self.seq_len, dtype=np.float32),
                "position_ids": np.arange(self.seq_len, dtype=np.int64)}


def prefill_flops_per_token(model_cfg, vocab_size: int, seq_len: int) -> float:
    """FLOPs per token of a forward-only prefill that computes logits for the last position only.

    The forward third of :func:`~elas_megatron.models.flops.flops_per_token` (``2 N_matmul + 4 L h_attn s``,
    2:4 counted as dense), less the output layer on all but one position per sequence: ``2 V h (1 - 1/s)``.
    """
    from elas_megatron.models.flops import flops_per_token

    return flops_per_token(model_cfg, vocab_size, seq_len) / 3 - 2.0 * vocab_size * model_cfg.hidden_size * (
        1 - 1 / seq_len)


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory failures of the allocator or of a CUDA library."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "ALLOC_FAILED" in text


def _load_config(spec: WorkerSpec, micro_batch: int):
    from elas_megatron.config.loader import load_config

    steps = 10**6  # the LR schedule is irrelevant here; a long one never ends mid-benchmark
    bench = [f"model.variant={spec.variant}", f"train.seq_len={spec.seq_len}", f"train.micro_batch={micro_batch}",
             f"train.global_batch={micro_batch * spec.accumulation}", f"train.steps={steps}", "train.eval_every=0",
             f"train.run_dir={spec.run_dir}", "checkpoint.save_final=false", "checkpoint.every=0",
             "log.level=warning"]
    if get_variant(spec.variant).sparsity:
        bench.append("model.dense_warmup_steps=0")  # measure the 2:4 path
    cfg = load_config(spec.configs or None, [*spec.overrides, *bench], world_size=1)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = spec.vocab_size
    return cfg


class _Memory:
    """Peak-memory bookkeeping on CUDA; every reading is None on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def allocated(self) -> float | None:
        return torch.cuda.memory_allocated() / _GIB if self.cuda else None

    def peak(self) -> float | None:
        return torch.cuda.max_memory_allocated() / _GIB if self.cuda else None

    def reserved_peak(self) -> float | None:
        return torch.cuda.max_memory_reserved() / _GIB if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def release(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def _split_ms(raw: dict[str, float], step_ms: float) -> dict[str, float]:
    """Per-step time split: raw intervals plus attention / ffn / output layer / optimizer / sync / other."""
    out = {f"time_{k.replace('/', '_')}_ms": v for k, v in sorted(raw.items())}
    parts = {}
    for cat in ("attention", "core_attention", "ffn", "output_layer"):
        parts[cat] = raw.get(f"{cat}/fwd", 0.0) + raw.get(f"{cat}/bwd", 0.0)
    parts["optimizer"] = raw.get("optimizer", 0.0)
    parts["grad_sync"] = raw.get("grad_sync", 0.0)
    for key, value in parts.items():
        out[f"time_{key}_ms"] = value
    counted = parts["attention"] + parts["ffn"] + parts["output_layer"] + parts["optimizer"] + parts["grad_sync"]
    out["time_step_ms"] = step_ms
    out["time_other_ms"] = max(0.0, step_ms - counted)
    return out


# -------------------------------------------------------------------------------------------------- worker
def measure(spec: WorkerSpec, emit: Callable[[dict], None]) -> None:
    """Run ``spec`` in this process; ``emit`` one record per micro-batch size (stops after an OOM or error)."""
    from elas_megatron.models.flops import count_parameters, flops_per_token
    from elas_megatron.models.gpt import resolve_loss_backend
    from elas_megatron.parallel.setup import destroy_parallel
    from elas_megatron.training.metrics import peak_flops

    batches = sorted(spec.micro_batches)
    cfg = _load_config(spec, batches[0])
    vocab = cfg.model.vocab_size
    base = {"label": spec.label, "variant": spec.variant, "mode": spec.mode, "seq_len": spec.seq_len,
            "accumulation": spec.accumulation if spec.mode == "train" else 1,
            "params_m": count_parameters(cfg.model, vocab)["total"] / 1e6}
    use_fast = spec.fast_init and cfg.parallel.tp == 1
    try:
        weight_init = "fast" if use_fast else "exact"
        runner = (_TrainRunner if spec.mode == "train" else _PrefillRunner)(cfg, spec, weight_init)
    except Exception as exc:  # noqa: BLE001  (a build failure is reported like a step failure)
        emit({**base, "micro_batch": batches[0], "status": "oom" if is_oom(exc) else "error",
              "error": f"build: {type(exc).__name__}: {exc}"[:2000]})
        destroy_parallel()
        return
    peak = peak_flops(runner.device)
    fpt = (flops_per_token(cfg.model, vocab, spec.seq_len) if spec.mode == "train"
           else prefill_flops_per_token(cfg.model, vocab, spec.seq_len))
    base.update(device=torch.cuda.get_device_name() if runner.device.type == "cuda" else "cpu",
                dtype="bf16" if runner.bf16 else "fp32", init="fast" if use_fast else "exact",
                attention_backend=runner.attention_backend, rope_backend=runner.rope_backend,
                adam_impl=getattr(runner, "adam_kernel", "-"), flops_per_token=fpt,
                lowrank_parts=cfg.model.lowrank_parts, multi_tensor_impl=cfg.optim.multi_tensor_impl,
                loss_backend=resolve_loss_backend(cfg.model.loss_backend, runner.device, cfg.parallel.tp))
    try:
        for b in batches:
            tokens = b * spec.seq_len * base["accumulation"]
            rec = {**base, "micro_batch": b, "tokens_per_step": tokens}
            try:
                if spec.simulate_oom_above is not None and b > spec.simulate_oom_above:
                    raise torch.OutOfMemoryError(f"simulated out-of-memory at micro-batch {b}")
                rec.update(runner.run(b))
            except Exception as exc:  # any failure ends the walk and is reported
                oom = is_oom(exc)
                emit({**rec, "status": "oom" if oom else "error", "peak_gib": runner.memory.peak(),
                      "error": f"{type(exc).__name__}: {exc}"[:2000]})
                if not oom:
                    logger.exception("micro-batch %d failed", b)
                return
            rec["status"] = "ok"
            rec["tokens_per_s"] = tokens / rec["step_time_s"]
            rec["tflops_per_s"] = rec["tokens_per_s"] * fpt / 1e12
            rec["mfu"] = rec["tokens_per_s"] * fpt / peak if peak else None
            emit(rec)
    finally:
        runner.close()
        destroy_parallel()


class StepProbe(Callback):
    """A training callback that measures each step: its time with the device synchronised before and after
    (``step_times_s``), with ``track_peaks`` the memory peak of forward + backward and of the optimizer step
    (``peaks``), and, while ``timer`` is enabled, the optimizer step as the interval ``optimizer``.

    Args:
        clock: the device's :class:`~elas_megatron.bench.timing.Clock`.
        memory: peak-memory readings (None on a CPU).
        timer: the :class:`~elas_megatron.bench.timing.ModuleTimer` of the time split, if any.
    """

    def __init__(self, clock, memory: _Memory, timer=None) -> None:
        self.clock, self.memory, self.timer = clock, memory, timer
        self.step_times_s: list[float] = []
        self.peaks = {"fwd_bwd": 0.0, "optimizer": 0.0}
        self.track_peaks = False
        self._start: float | None = None

    def on_step_begin(self, trainer, step: int) -> None:
        self.clock.synchronize()
        self._start = time.perf_counter()

    def on_before_optimizer_step(self, trainer) -> None:
        if self.track_peaks:  # the forward/backward peak, then the optimizer's own
            self.peaks["fwd_bwd"] = max(self.peaks["fwd_bwd"], self.memory.peak())
            self.memory.reset_peak()
        if self.timer is not None:
            self.timer.begin("optimizer")

    def on_after_optimizer_step(self, trainer) -> None:
        if self.timer is not None:
            self.timer.end("optimizer")
        if self.track_peaks:
            self.peaks["optimizer"] = max(self.peaks["optimizer"], self.memory.peak())

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        self.clock.synchronize()
        self.step_times_s.append(time.perf_counter() - self._start)


class _TrainRunner:
    """Trainer steps (megatron schedule, optimizer backend) on random tokens."""

    def __init__(self, cfg, spec: WorkerSpec, weight_init: str = "exact") -> None:
        from elas_megatron.bench.timing import Clock, ModuleTimer
        from elas_megatron.layers.specs import resolve_attention_backend, resolve_rope_backend
        from elas_megatron.parallel.setup import resolve_device
        from elas_megatron.training.trainer import Trainer

        self.spec = spec
        self.data = RandomTokens(seq_len=spec.seq_len, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed)
        device = resolve_device(cfg.train.device)
        self.memory = _Memory(device)
        self.clock = Clock(device)
        self.probe = StepProbe(self.clock, self.memory)
        self.trainer = Trainer(cfg, datasets=(self.data, self.data), callbacks=[self.probe],
                               weight_init=weight_init)
        self.device, self.bf16 = self.trainer.device, self.trainer.bf16
        self.attention_backend = resolve_attention_backend(cfg.model.attention_backend, self.device)
        self.rope_backend = resolve_rope_backend(cfg.model.rope_backend, self.device, spec=cfg.model.spec)
        self.adam_kernel = getattr(self.trainer.backend, "adam_kernel", "-")
        self.timer = self.probe.timer = ModuleTimer(self.trainer.model, self.clock)
        tconfig = self.trainer.tconfig
        if tconfig.finalize_model_grads_func is not None:  # megatron's setting for it: there is no hook
            tconfig.finalize_model_grads_func = self.timer.timed("grad_sync", tconfig.finalize_model_grads_func)

    def _set_batch(self, micro_batch: int) -> None:
        from elas_megatron.data.loader import StepBatches

        t = self.trainer.cfg.train
        t.micro_batch, t.global_batch = micro_batch, micro_batch * self.spec.accumulation
        self.trainer.train_batches = StepBatches(self.data, global_batch=t.global_batch, micro_batch=micro_batch,
                                                 dp_rank=0, dp_size=1, device=self.device)

    def _step(self) -> float:
        loss, _ = self.trainer.train_step()
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss is {loss}")
        return self.probe.step_times_s[-1]

    def run(self, micro_batch: int) -> dict:
        from elas_megatron.training.memory import estimate_memory

        self._set_batch(micro_batch)
        self.memory.release()
        for _ in range(self.spec.warmup_steps):
            self._step()
        state = self.memory.allocated()
        self.memory.reset_peak()
        self.probe.peaks = {"fwd_bwd": 0.0, "optimizer": 0.0}
        self.probe.track_peaks = self.memory.cuda
        try:
            times = [self._step() for _ in range(self.spec.steps)]
        finally:
            self.probe.track_peaks = False
        out = {"step_time_s": statistics.median(times), "step_time_mean_s": statistics.fmean(times),
               "state_gib": state, "reserved_gib": self.memory.reserved_peak(), "peak_gib": None,
               "activation_gib": None, "optimizer_peak_gib": None}
        if self.memory.cuda:
            peaks = self.probe.peaks
            out.update(peak_gib=max(peaks.values()), activation_gib=peaks["fwd_bwd"] - state,
                       optimizer_peak_gib=peaks["optimizer"])
        est = estimate_memory(self.trainer.cfg, world_size=1, vocab_size=self.trainer.vocab_size).peak
        out.update(activation_estimate_gib=est.activations / _GIB, total_estimate_gib=est.total / _GIB)
        if self.spec.profile_steps:
            self.timer.reset()
            self.timer.enabled = True
            try:
                step_s = sum(self._step() for _ in range(self.spec.profile_steps)) / self.spec.profile_steps
            finally:
                self.timer.enabled = False
            out.update(_split_ms(self.timer.summary_ms(self.spec.profile_steps), step_s * 1e3))
        return out

    def close(self) -> None:
        self.timer.remove()
        self.trainer.backend.close()


class _PrefillRunner:
    """Forward-only prefill of the model (no optimizer): all positions through the layers, logits of the last."""

    def __init__(self, cfg, spec: WorkerSpec, weight_init: str = "exact") -> None:
        from megatron.core.transformer.module import Float16Module

        from elas_megatron.bench.timing import Clock, ModuleTimer
        from elas_megatron.layers.specs import resolve_attention_backend, resolve_rope_backend
        from elas_megatron.models.gpt import build_model, transformer_config
        from elas_megatron.parallel.setup import initialize_parallel
        from elas_megatron.training.trainer import resolve_bf16

        self.spec = spec
        info = initialize_parallel(cfg.parallel, seed=cfg.train.seed, device=cfg.train.device)
        self.device = info.device
        self.bf16 = resolve_bf16(cfg, self.device)
        self.attention_backend = resolve_attention_backend(cfg.model.attention_backend, self.device)
        self.rope_backend = resolve_rope_backend(cfg.model.rope_backend, self.device, spec=cfg.model.spec)
        tconfig = transformer_config(cfg)
        model = build_model(cfg, vocab_size=cfg.model.vocab_size, config=tconfig, weight_init=weight_init)
        self.gpt = model
        self.model = Float16Module(tconfig, model) if self.bf16 else model
        self.model.eval()
        self.vocab_size = cfg.model.vocab_size
        # Prefill needs the next-token logits of the last position only (as serving does).
        self._hook = model.output_layer.register_forward_pre_hook(
            lambda _m, args, kwargs: ((args[0][-1:], *args[1:]), kwargs), with_kwargs=True)
        self.memory = _Memory(self.device)
        self.clock = Clock(self.device)
        self.timer = ModuleTimer([self.model], self.clock)

    @torch.no_grad()
    def _step(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> float:
        self.clock.synchronize()
        start = time.perf_counter()
        logits = self.model(tokens, position_ids, None)                          # [b, 1, V]
        self.clock.synchronize()
        if not torch.isfinite(logits).all():
            raise FloatingPointError("non-finite logits")
        return time.perf_counter() - start

    def run(self, micro_batch: int) -> dict:
        s = self.spec.seq_len
        self.memory.release()
        gen = torch.Generator(device=self.device).manual_seed(micro_batch)
        tokens = torch.randint(0, self.vocab_size, (micro_batch, s), device=self.device, generator=gen)
        position_ids = torch.arange(s, device=self.device).expand(micro_batch, s)
        state = self.memory.allocated()
        for _ in range(self.spec.warmup_steps):
            self._step(tokens, position_ids)
        self.memory.reset_peak()
        times = [self._step(tokens, position_ids) for _ in range(self.spec.steps)]
        out = {"step_time_s": statistics.median(times), "step_time_mean_s": statistics.fmean(times),
               "state_gib": state, "reserved_gib": self.memory.reserved_peak(), "peak_gib": None,
               "activation_gib": None}
        if self.memory.cuda:
            peak = self.memory.peak()
            out.update(peak_gib=peak, activation_gib=peak - state)
        if self.spec.profile_steps:
            self.timer.reset()
            self.timer.enabled = True
            try:
                step_s = sum(self._step(tokens, position_ids) for _ in range(self.spec.profile_steps))
            finally:
                self.timer.enabled = False
            n = self.spec.profile_steps
            out.update(_split_ms(self.timer.summary_ms(n), step_s / n * 1e3))
        return out

    def close(self) -> None:
        self._hook.remove()
        self.timer.remove()


# -------------------------------------------------------------------------------------------------- parent
def _launch_subprocess(spec: WorkerSpec, log_path: Path, timeout_s: float) -> tuple[list[dict], str | None]:
    """Run a worker process; its records as they were printed, and why it ended early (None if it did not)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "elas_megatron.bench.throughput", "--worker", json.dumps(dataclasses.asdict(spec))]
    records: list[dict] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        watchdog = threading.Timer(timeout_s, proc.kill)
        watchdog.start()
        try:
            for line in proc.stdout:
                if line.startswith(RESULT_PREFIX):
                    records.append(json.loads(line[len(RESULT_PREFIX):]))
                    logger.info("  %s", _progress(records[-1]))
            rc = proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:  # interrupted: never leave a worker holding the GPU
                proc.kill()
                proc.wait()
    if rc == 0:
        return records, None
    tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-5:])
    why = f"killed after {timeout_s:.0f} s" if rc == -signal.SIGKILL else f"exit {rc}"
    return records, f"worker {why}: {tail}"[:2000]


def _progress(r: dict) -> str:
    head = f"{r['label']} {r['mode']} {r['variant']} s={r['seq_len']} b={r['micro_batch']}: {r['status']}"
    if r["status"] != "ok":
        return f"{head} ({r.get('error', '')[:160]})"
    mem = f", peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else ""
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    return f"{head}, {r['tokens_per_s']:,.0f} tok/s{mfu}{mem}"


def run_sweep(*, rows: list[dict], configs: list[str], overrides: list[str], variants: list[str],
              batches_by_mode: dict[str, list[int]], seq_lens: list[int], isolation: str, timeout_s: float,
              out_dir: Path, on_rows: Callable[[list[dict]], None], **spec_kwargs) -> list[dict]:
    """Every (mode, sequence length, variant) over ascending micro-batches; stops a walk at its first OOM.

    Rows are appended to ``rows`` as they come (so a caller interrupted by a signal still has them), and
    ``on_rows(rows)`` is called after every worker (to write results incrementally).
    """
    for mode, micro_batches in batches_by_mode.items():
        for seq_len in seq_lens:
            for variant in variants:
                pending = sorted(set(micro_batches))
                while pending:
                    batch = pending if isolation in ("variant", "none") else pending[:1]
                    spec = WorkerSpec(configs=configs, overrides=overrides, variant=variant, mode=mode,
                                      seq_len=seq_len, micro_batches=batch,
                                      run_dir=str(out_dir / "runs" / f"{mode}_{variant}_s{seq_len}"), **spec_kwargs)
                    if isolation == "none":
                        got: list[dict] = []
                        measure(spec, got.append)
                        why = None
                    else:
                        log = out_dir / "logs" / f"{mode}_{variant}_s{seq_len}_b{batch[0]}.log"
                        got, why = _launch_subprocess(spec, log, timeout_s)
                    pending = _advance(spec, got, why, pending, isolation, rows)
                    on_rows(rows)
    return rows


def _advance(spec: WorkerSpec, got: list[dict], why: str | None, pending: list[int], isolation: str,
             rows: list[dict]) -> list[int]:
    """Record a worker's results; return the micro-batches still to run for this walk."""
    if got and got[-1]["status"] == "oom" and len(got) > 1 and isolation == "variant":
        # An OOM after other batch sizes in the same process could be fragmentation: confirm it alone.
        rows.extend(got[:-1])
        logger.info("  OOM at micro-batch %d after smaller ones in the same process: re-running it alone",
                    got[-1]["micro_batch"])
        return [b for b in pending if b >= got[-1]["micro_batch"]]
    rows.extend(got)
    if got and got[-1]["status"] != "ok":
        return []
    done = {r["micro_batch"] for r in got}
    rest = [b for b in pending if b not in done]
    if why is not None and rest:  # the worker died without reporting the next batch
        rows.append({"label": spec.label, "variant": spec.variant, "mode": spec.mode, "seq_len": spec.seq_len,
                     "micro_batch": rest[0], "status": "oom" if "out of memory" in why.lower() else "error",
                     "error": why})
        logger.info("  %s", _progress(rows[-1]))
        return []
    return rest


def _worker_main(spec_json: str) -> int:
    from elas_megatron.utils.logging import init_logging

    init_logging("warning")
    spec = WorkerSpec(**json.loads(spec_json))

    def emit(record: dict) -> None:
        # a leading newline: a library's unterminated output line cannot swallow the prefix
        print("\n" + RESULT_PREFIX + json.dumps(record), flush=True)

    measure(spec, emit)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        sys.exit(_worker_main(sys.argv[2]))
    sys.exit("usage: python -m elas_megatron.bench.throughput --worker SPEC_JSON (started by elas-bench)")
