"""The training loop: a small class whose methods each do one thing (build, train_step, evaluate, save/load).

One code path for every layout: the step always runs through Megatron-Core's ``get_forward_backward_func``
(no pipelining, 1F1B, or interleaved 1F1B). The data-parallel optimizer backend (``parallel.optimizer``) is
either megatron-core's DDP + (distributed) optimizer or DeepSpeed ZeRO-1/2, behind one interface
(:mod:`elas_megatron.training.optimizers`); both plug into the schedule through its hooks (``finalize_model_grads_func``
etc.). A single-process CPU run is simply the layout TP=PP=DP=1.

Reliability (docs/reliability.md): every step passes :class:`~elas_megatron.training.numerics.NumericGuard` before
the optimizer runs (rank-agreed NaN/Inf and loss-spike detection, bounded skipping); multi-process training runs
under a :class:`~elas_megatron.training.watchdog.Watchdog` that names stuck ranks; checkpoints are atomic and
their failures collective (:mod:`elas_megatron.training.checkpoint`), optionally written in the background
(``checkpoint.async_save``), and hold every rank's RNG states. One job per run directory: rank 0 locks
``train.run_dir`` before writing there (:mod:`elas_megatron.training.run_dir`), and every rank stops if it cannot. ``train()`` decides to stop in one place,
:meth:`Trainer.should_stop`.

Hooks (:mod:`elas_megatron.training.callbacks`): ``Trainer(cfg, callbacks=[...])`` calls each callback at fixed
points of the loop (model built, step begin/end, around the optimizer step, evaluation, checkpoint phases, save,
resume); the metrics log is one of them.
"""
from __future__ import annotations

import logging
import time
import weakref
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from elas_megatron.config.loader import config_to_dict, dump_config
from elas_megatron.config.schema import Config, ConfigError, validate
from elas_megatron.data.loader import StepBatches
from elas_megatron.parallel.setup import ParallelInfo, first_rank_error, initialize_parallel, set_collective_timeout
from elas_megatron.training.callbacks import Callback, CallbackList
from elas_megatron.training.checkpoint import (RNG_KEY, CheckpointError, CheckpointManager, get_rng_state,
                                                rng_sharded_object, set_rng_state)
from elas_megatron.training.metrics import MetricsLogger
from elas_megatron.training.numerics import NumericGuard
from elas_megatron.training.optimizers import backend_class, build_optimizer_backend, build_scheduler
from elas_megatron.training.profiling import Profiler
from elas_megatron.training.run_dir import prepare_run_dir
from elas_megatron.training.signals import StopSignal
from elas_megatron.training.stragglers import ComputeTimer, StragglerCheck
from elas_megatron.training.sinks import build_sinks, check_sinks
from elas_megatron.training.watchdog import Limit, Progress, Watchdog
from elas_megatron.utils.errors import DataError
from elas_megatron.utils.interrupts import Interrupted
from elas_megatron.utils.progress import ProgressMeter
from elas_megatron.variants.registry import get_variant

logger = logging.getLogger(__name__)


def resolve_bf16(cfg: Config, device: torch.device) -> bool:
    """``train.dtype`` -> bf16 parameters? (auto: on CUDA). bf16 on CPU runs, slowly: it is for tests only."""
    if cfg.train.dtype == "bf16" and device.type == "cpu":
        logger.warning("train.dtype=bf16 on CPU: correct but slow; meant for testing the bf16 code path")
    return cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")


def _counted(iterator, progress: ProgressMeter):
    """``iterator``'s items, counting each in ``progress``."""
    for item in iterator:
        progress.update()
        yield item


class Trainer:
    """Builds everything from a :class:`Config` and trains. All ranks of a torchrun job construct one.

    Args:
        cfg: the run config.
        resume: continue from the latest checkpoint in ``checkpoint.dir`` (if any).
        datasets: ``(train, valid)`` sample sequences to use instead of building them from ``cfg.data`` (tests,
            benchmarks); each item is a dict with ``tokens``, ``labels``, ``loss_mask`` and ``position_ids`` of
            length ``train.seq_len``. ``model.vocab_size`` must then be set (no tokenizer is read).
        callbacks: :class:`~elas_megatron.training.callbacks.Callback` s called at the loop's hook points, in
            order, before the trainer's own metrics log (``self.metrics``).
        weight_init: ``exact`` (training: layout-invariant) or ``fast`` (benchmarks: drawn on the device, TP = 1);
            see :func:`elas_megatron.models.gpt.build_model`.
    """

    def __init__(self, cfg: Config, *, resume: bool = False, datasets: tuple | None = None,
                 callbacks: tuple[Callback, ...] | list[Callback] = (), weight_init: str = "exact") -> None:
        # where this rank is: start-up phases here, then steps (the watchdog reads it; collectives follow its limits)
        self.progress = Progress(on_limit=self._set_collective_limit)
        self.watchdog: Watchdog | None = None  # created once the process group exists
        try:
            self._build(cfg, resume=resume, datasets=datasets, callbacks=callbacks, weight_init=weight_init)
        except Interrupted as exc:  # SIGTERM/SIGUSR1 while starting (utils/interrupts.py): say where
            exc.where = exc.where or self.progress.phase.removeprefix("start-up: ")
            raise
        finally:
            if self.watchdog is not None:  # start-up is over: watched again in train(), save() and load
                self.watchdog.stop()

    def _starting(self, phase: str) -> None:
        self.progress.update(0, f"start-up: {phase}", limit="start-up")

    def _set_collective_limit(self, kind: Limit) -> None:
        """Collectives time out as the watchdog times the phase they run in, just after it
        (:meth:`Watchdog.collective_timeout`): one in a save waits for a slow disk as long as the watchdog does, one
        in a step no longer (:mod:`elas_megatron.parallel.setup`)."""
        if self.watchdog is not None:  # created right after the process groups
            set_collective_timeout(self.watchdog.collective_timeout(kind))

    @contextmanager
    def _watched(self):
        """The watchdog runs inside this block (re-entrant): start-up, ``train()``, and saves or loads called on
        their own. Not between calls: an in-process program may hold an idle trainer as long as it likes."""
        started = self.watchdog is not None and not self.watchdog.running
        if started:
            self.watchdog.start()
        try:
            yield
        finally:
            if started:
                self.watchdog.stop()

    def _build(self, cfg: Config, *, resume: bool, datasets: tuple | None,
               callbacks: tuple[Callback, ...] | list[Callback], weight_init: str) -> None:
        from elas_megatron.models.flops import flops_per_token
        from elas_megatron.sparsity.schedule import SparsitySchedule

        backend_class(cfg).check_config(cfg)
        check_sinks(cfg.log)  # a requested sink's package is missing: stop before anything is built
        self._starting("distributed initialisation")
        self.info: ParallelInfo = initialize_parallel(cfg.parallel, seed=cfg.train.seed, device=cfg.train.device)
        p = cfg.parallel
        # every rank, one process too: start-up phases, steps and checkpoint saves/loads are timed from here on
        self.watchdog = Watchdog(self.progress, timeout_s=p.distributed_timeout_s, io_timeout_s=p.io_timeout_s,
                                 board=self.info.board, global_rank=self.info.global_rank)
        self._set_collective_limit(self.progress.limit)  # the start-up limit, now with the watchdog's margin
        self.watchdog.start()
        self.stragglers = StragglerCheck(p.straggler_check_every, device=self.info.device,
                                         world_size=self.info.world_size, global_rank=self.info.global_rank)
        self.compute_timer = ComputeTimer(self.info.device)
        validate(cfg, self.info.world_size)
        self.cfg = cfg
        self.weight_init = weight_init
        self.device = self.info.device
        self.bf16 = resolve_bf16(cfg, self.device)
        self.vocab_size = self._resolve_vocab_size(datasets is not None)
        if cfg.train.check_memory:
            self._starting("checking the memory estimate")
            self._check_memory()
        self.run_dir = Path(cfg.train.run_dir)
        self._starting("preparing the run directory")
        # one job per run directory: rank 0 locks it before anything is written there; all ranks stop if it cannot
        self.run_lock = prepare_run_dir(self.run_dir, is_owner=self.info.global_rank == 0,
                                        then=lambda d: dump_config(cfg, d / "config.yaml"))
        if self.run_lock is not None:  # held while this trainer lives (in-process programs build many)
            weakref.finalize(self, self.run_lock.release)
        t = cfg.train
        self.metrics = MetricsLogger(self.run_dir, enabled=self.info.is_logging_rank,
                                     flops_per_token=flops_per_token(cfg.model, self.vocab_size, t.seq_len),
                                     device=self.device, num_gpus=self.info.world_size, every=cfg.log.every,
                                     last_step=t.steps,
                                     sinks=build_sinks(cfg.log, self.run_dir, resume=resume,
                                                       config=config_to_dict(cfg)) if self.info.is_logging_rank else ())
        own: list[Callback] = []
        if cfg.log.profile_steps or cfg.log.memory_snapshot_step is not None:
            own.append(Profiler(self.run_dir, rank=self.info.global_rank, device=self.device,
                                profile_steps=cfg.log.profile_steps,
                                memory_snapshot_step=cfg.log.memory_snapshot_step))
        self.callbacks = CallbackList([*callbacks, *own, self.metrics])
        self.ckpt = CheckpointManager(cfg.checkpoint.dir or self.run_dir / "checkpoints",
                                      keep_last=cfg.checkpoint.keep_last, global_rank=self.info.global_rank,
                                      on_phase=self._checkpoint_phase,
                                      async_save=cfg.checkpoint.async_save)
        if cfg.checkpoint.every or cfg.checkpoint.save_final:
            self.ckpt.check_writable()  # before the data and the model: a bad directory costs seconds, not a run

        self._starting("building the model")
        self.model = self._build_model()
        self.backend = build_optimizer_backend(cfg, self.model, bf16=self.bf16, dp_size=self.info.dp_size)
        self.optimizer = self.backend.optimizer
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.backend.configure_schedule(self.tconfig)

        self._starting("building the datasets")
        train_ds, valid_ds = datasets if datasets is not None else self._build_datasets()
        batch_args = dict(micro_batch=t.micro_batch, dp_rank=self.info.dp_rank, dp_size=self.info.dp_size,
                          device=self.device, vocab_size=self.vocab_size)
        self.train_batches = StepBatches(train_ds, global_batch=t.global_batch, **batch_args)
        self.valid_batches = StepBatches(valid_ds, global_batch=t.micro_batch * self.info.dp_size, what="validation",
                                         **batch_args)
        self.variant = get_variant(cfg.model.variant)
        self.sparsity = SparsitySchedule(self.variant.dense_warmup_steps(cfg.model))

        self.step = 0
        self.callbacks.on_model_built(self)  # before the guard's hooks: the guard checks what callbacks' hooks do
        self.guard = NumericGuard(self._unwrapped(), max_skipped_steps=t.max_skipped_steps,
                                  loss_spike_factor=t.loss_spike_factor, device=self.device,
                                  grads_in_hooks=cfg.parallel.optimizer == "deepspeed" and cfg.parallel.zero_stage >= 2)
        self.guard.wrap_finalize(self.tconfig)
        self._time_finalize(self.tconfig)
        self.density: float | None = None  # measured in the last step (train.density_check_every)
        self.compute_seconds = 0.0  # the last step's time up to the gradient reduction (straggler check)
        self.stopped_by: str | None = None  # the signal that ended train() early (preemption), if any
        self._microbatch: int | None = None  # index of the next training micro-batch within a step
        self._num_microbatches = 0
        self.last_val_loss: float | None = None
        if not (resume and self.load_latest()):
            # a run from scratch marks it too: records of an earlier attempt in this run_dir (killed before its
            # first checkpoint) are superseded (metrics.read_metrics)
            self.metrics.log_resume(step=self.step, checkpoint=None)
        self._starting("before the first step")
        if self.info.world_size > 1:  # start-up ends on every rank together: no rank's first step (timed with the
            dist.barrier()            # collective limit) waits for another rank still starting

    # ----------------------------------------------------------------------------------------------- build
    def _resolve_vocab_size(self, have_datasets: bool) -> int:
        cfg = self.cfg
        if have_datasets:
            if cfg.model.vocab_size is None:
                raise ValueError("Trainer(datasets=...) needs model.vocab_size: there is no tokenizer to take it from")
            return cfg.model.vocab_size
        from elas_megatron.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.data.tokenizer)
        vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
        if vocab_size < tokenizer.vocab_size:
            raise ValueError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's vocabulary "
                             f"({tokenizer.vocab_size}, {cfg.data.tokenizer}); remove it or set it >= "
                             f"{tokenizer.vocab_size}")
        return vocab_size

    def _time_finalize(self, tconfig) -> None:
        """Mark the end of a step's compute where megatron's schedule starts reducing the gradients (straggler
        check, :mod:`elas_megatron.training.stragglers`)."""
        finalize = tconfig.finalize_model_grads_func
        if finalize is None:
            return

        def timed_finalize(*args, **kwargs):
            self.compute_timer.mark()
            return finalize(*args, **kwargs)

        tconfig.finalize_model_grads_func = timed_finalize

    def _check_memory(self) -> None:
        """Refuse (every rank, one :class:`ConfigError` line) a run whose memory estimate for this rank's pipeline
        stage exceeds what this process may allocate (:func:`~elas_megatron.training.memory.available_memory`).
        The estimate is the dry run's, for the device and dtype this run really uses."""
        import dataclasses
        import os

        from elas_megatron.training.memory import GIB, available_memory, estimate_memory

        t, p = self.cfg.train, self.cfg.parallel
        resolved = dataclasses.replace(self.cfg, train=dataclasses.replace(
            t, device=self.device.type, dtype="bf16" if self.bf16 else "fp32"))
        stage = estimate_memory(resolved, world_size=self.info.world_size,
                                vocab_size=self.vocab_size).stages[self.info.pp_rank]
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.device.type == "cpu" else 1
        available, where = available_memory(self.device.type, self.device.index, local)
        error = None
        if available and stage.total > available:
            fixes = ["lower train.micro_batch or train.seq_len"]
            if p.recompute != "full":
                fixes.append("set parallel.recompute=full")
            if p.zero_stage < 1 and self.info.dp_size > 1:
                fixes.append("parallel.zero_stage=1")
            error = (f"this run needs an estimated {stage.total / GIB:.1f} GiB per process (weights+grads+optimizer "
                     f"{(stage.weights + stage.grads + stage.optimizer) / GIB:.2f} GiB, activations "
                     f"{stage.activations / GIB:.1f} GiB for train.micro_batch={t.micro_batch} x train.seq_len="
                     f"{t.seq_len}, {self.device.type} {'bf16' if self.bf16 else 'fp32'}) but "
                     f"{available / GIB:.1f} GiB is available ({where}); " + ", ".join(fixes)
                     + ", or set train.check_memory=false to start anyway")
        error = first_rank_error(error)
        if error is not None:
            raise ConfigError(error)
        logger.info("memory estimate: %.2f GiB per process, %.1f GiB available (%s)", stage.total / GIB,
                    available / GIB, where)

    def _build_datasets(self) -> tuple:
        from elas_megatron.data.datasets import build_datasets

        t = self.cfg.train
        return build_datasets(
            self.cfg.data, seq_len=t.seq_len, seed=t.seed, train_samples=t.steps * t.global_batch,
            valid_samples=max(1, t.eval_iters * t.micro_batch * self.info.dp_size), vocab_size=self.vocab_size,
            cache_dir=self.cfg.data.cache_dir or str(self.run_dir / "data_cache"))

    def _build_model(self) -> list[torch.nn.Module]:
        """Model chunks (one per virtual pipeline stage) on the device, bf16-wrapped, and DDP-wrapped for the
        megatron backend (DeepSpeed reduces gradients itself and gets the bare chunks)."""
        from megatron.core import parallel_state
        from megatron.core.transformer.module import Float16Module

        from elas_megatron.models.gpt import build_model, transformer_config

        self.tconfig = transformer_config(self.cfg)
        if self.cfg.parallel.vpp is not None:
            # The interleaved schedule receives from the previous AND the next stage in one exchange; with pp=2
            # both are the same rank, and batched p2p (one batch_isend_irecv) then matches the two same-shaped
            # messages by posting order and swaps activations with gradients. Megatron's unbatched p2p path puts
            # the two directions on different process groups, which keeps them apart.
            self.tconfig.batch_p2p_comm = False
        vpp = self.cfg.parallel.vpp
        chunks = []
        for vp_stage in range(vpp or 1):
            stage = vp_stage if vpp else None
            pre = parallel_state.is_pipeline_first_stage(ignore_virtual=vpp is None, vp_stage=stage)
            post = parallel_state.is_pipeline_last_stage(ignore_virtual=vpp is None, vp_stage=stage)
            chunk = build_model(self.cfg, vocab_size=self.vocab_size, pre_process=pre, post_process=post,
                                vp_stage=stage, config=self.tconfig, weight_init=self.weight_init).to(self.device)
            if self.bf16:
                chunk = Float16Module(self.tconfig, chunk)
            chunk = backend_class(self.cfg).wrap_chunk(self.cfg, self.tconfig, chunk, vp_stage=vp_stage)
            chunks.append(chunk)
        n_local = sum(p.numel() for c in chunks for p in c.parameters())
        logger.info("model %s: %.2fM parameters on this rank (tp=%d pp=%d dp=%d, %s)", self.cfg.model.variant,
                    n_local / 1e6, self.info.tp_size, self.info.pp_size, self.info.dp_size,
                    "bf16" if self.bf16 else "fp32")
        return chunks

    # ------------------------------------------------------------------------------------------- stepping
    @staticmethod
    def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
        losses = output.float().reshape(-1)
        mask = loss_mask.reshape(-1)
        loss_sum = (losses * mask).sum()
        tokens = mask.sum()
        return loss_sum / tokens, {"loss_sum": loss_sum.detach(), "tokens": tokens.detach()}

    def _forward_step(self, data_iterator, model):
        if self._microbatch is not None:  # training: let the optimizer backend see micro-batch boundaries
            self.backend.before_microbatch(self._microbatch, self._num_microbatches)
            self._microbatch += 1
        self.progress.update(self.step + 1, "forward")
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       loss_mask=batch["loss_mask"])
        return output, partial(self._loss_func, batch["loss_mask"])

    def _agreed_batches(self, read) -> list[dict]:
        """``read()`` (this rank's micro-batches, on the host), agreed by every rank: when any rank's data holds a
        token id outside the vocabulary, every rank raises the same :class:`DataError` (no rank is left waiting in
        the evaluation's collectives). One MAX all-reduce of one flag in multi-process runs. (Training steps
        carry the flag in the numerical guard's all-reduce instead: :meth:`train_step`.)"""
        error, host = None, []
        try:
            host = read()
        except DataError as exc:
            error = str(exc)
        if self.info.world_size > 1:
            flag = torch.tensor([error is not None], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():
                error = first_rank_error(error)
        if error is not None:
            raise DataError(error)
        return host

    def _run_schedule(self, iterators: list, num_microbatches: int, forward_only: bool) -> float:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        fb = get_forward_backward_func()
        outputs = fb(forward_step_func=self._forward_step,
                     data_iterator=iterators if len(iterators) > 1 else iterators[0],
                     model=self.model if len(self.model) > 1 else self.model[0],
                     num_microbatches=num_microbatches, seq_length=self.cfg.train.seq_len,
                     micro_batch_size=self.cfg.train.micro_batch, forward_only=forward_only)
        return self._reduce_loss(outputs)

    def _reduce_loss(self, outputs: list[dict]) -> float:
        """Token-weighted mean loss over all micro-batches and DP ranks, known on every rank."""
        from megatron.core import parallel_state

        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.info.is_last_stage:
            for out in outputs:
                totals[0] += out["loss_sum"].double()
                totals[1] += out["tokens"].double()
            dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        if self.info.pp_size > 1:
            dist.broadcast(totals, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        return (totals[0] / totals[1]).item()

    def train_step(self) -> tuple[float, float | None]:
        """One optimizer step over ``train.global_batch`` sequences. Returns (loss, grad norm).

        A step the :class:`NumericGuard` rejects (NaN/Inf, loss spike) leaves weights, optimizer and LR schedule
        untouched and returns a None grad norm; its batch is dropped (the step counter still advances).
        Calls the callbacks' ``on_step_begin`` / ``on_step_end`` (with the step's metrics) and, around the
        optimizer step, ``on_before_optimizer_step`` / ``on_after_optimizer_step``.
        """
        from elas_megatron.sparsity.density import check_density
        from elas_megatron.sparsity.schedule import elas_mlps, set_density_tracking

        self._sync()
        start = time.perf_counter()
        self.compute_timer.begin()
        lr = self.optimizer.param_groups[0]["lr"]
        self.progress.update(self.step + 1, "step start")
        self.callbacks.on_step_begin(self, self.step + 1)
        self.sparsity.apply(self.model, self.step)
        measure_density = self._density_step()
        if measure_density:
            set_density_tracking(self.model, True)
        self.backend.zero_grad()
        self.guard.begin_step()
        batches = self.train_batches
        # a token id outside the vocabulary: clamped here, reported by the guard's check (no extra collective)
        data_errors: list[str] = []
        host = batches.host_batches(self.step, data_errors)
        self.guard.data_error = data_errors[0] if data_errors else None
        iterators = [batches.step_iterator(self.step, host) for _ in self.model]
        self._microbatch, self._num_microbatches = 0, batches.num_microbatches * len(self.model)
        try:
            loss = self._run_schedule(iterators, batches.num_microbatches, forward_only=False)
        finally:
            self._microbatch = None
        self.progress.update(self.step + 1, "numerical check")
        problem = self.guard.check(self.step + 1, loss)
        grad_norm = None
        if problem is None:
            self.progress.update(self.step + 1, "optimizer step")
            self.callbacks.on_before_optimizer_step(self)
            success, grad_norm = self.backend.step()
            self.callbacks.on_after_optimizer_step(self)
            if success:
                self.scheduler.step(increment=1)
        else:
            self.guard.skip(problem)  # raises NumericalError when the budget is spent
        self.density = None
        if measure_density:
            self.density = check_density(elas_mlps(self.model), self.step + 1, self.cfg.train.density_warn)
            set_density_tracking(self.model, False)
        self.step += 1
        self._sync()
        elapsed = time.perf_counter() - start
        self.compute_seconds = self.compute_timer.seconds()
        self.callbacks.on_step_end(self, self.step, self._step_metrics(loss, lr, grad_norm, elapsed))
        return loss, grad_norm

    def _step_metrics(self, loss: float, lr: float, grad_norm: float | None, elapsed: float) -> dict:
        """The ``metrics`` of ``on_step_end`` for the step just done (see :class:`Callback`)."""
        t = self.cfg.train
        tokens_per_step = t.global_batch * t.seq_len
        extra = {}
        if self.variant.sparsity:
            extra["sparse24"] = self.sparsity.is_sparse(self.step - 1)
            if self.density is not None:
                extra["sparsity/act_density"] = self.density
        if self.guard.skipped_steps:
            extra["skipped_steps"] = self.guard.skipped_steps
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_step": tokens_per_step,
                "step_time_s": elapsed, "tokens": self.step * tokens_per_step, "extra": extra}

    def _density_step(self) -> bool:
        every = self.cfg.train.density_check_every
        return (self.variant.sparsity and every > 0 and (self.step + 1) % every == 0
                and self.sparsity.is_sparse(self.step))

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over ``train.eval_iters`` fixed micro-batches per DP rank (progress shown on the
        logging rank when it takes long: :class:`~elas_megatron.utils.progress.ProgressMeter`)."""
        for chunk in self.model:
            chunk.eval()
        n = self.cfg.train.eval_iters
        progress = ProgressMeter(n, "eval", "batches", enabled=self.info.is_logging_rank)
        try:
            host = self._agreed_batches(lambda: self.valid_batches.eval_host_batches(n))
            iterators = [self.valid_batches.eval_iterator(n, host) for _ in self.model]
            iterators[-1] = _counted(iterators[-1], progress)  # the last chunk's batches: the loss's
            loss = self._run_schedule(iterators, n, forward_only=True)
        finally:
            progress.close()
            for chunk in self.model:
                chunk.train()
        self.last_val_loss = loss
        self.callbacks.on_evaluate(self, self.step, loss)
        return loss

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def should_stop(self) -> bool:
        """The one place the training loop decides to stop (``train.steps`` reached)."""
        return self.step >= self.cfg.train.steps

    def train(self) -> float:
        """Train to ``train.steps``; evaluate and checkpoint on schedule. Returns the final validation loss.
        Calls the callbacks' ``on_train_end`` on the way out, however it ends."""
        try:
            with self._watched():
                return self._train()
        finally:
            self.callbacks.on_train_end(self)

    def _train(self) -> float:
        if self.should_stop():
            logger.info("already at step %d of %d: nothing to train", self.step, self.cfg.train.steps)
        with StopSignal() as stop:
            while not self.should_stop():
                self._train_and_log()
                self.ckpt.poll()  # checkpoint.async_save: publish a save every rank has finished writing
                if stop.should_stop():  # SIGTERM/SIGUSR1 on any rank (preemption): save and leave, all together
                    self.stopped_by = stop.reason
                    self.wait_for_checkpoint()
                    latest = self.ckpt.latest()
                    if latest is None or latest.name != CheckpointManager.step_name(self.step):
                        self.save()
                        self.wait_for_checkpoint()
                    return self.last_val_loss if self.last_val_loss is not None else float("nan")
            val = self.evaluate()
            if self.cfg.checkpoint.save_final:
                self.save()
            self.wait_for_checkpoint()
        return val

    def _train_and_log(self) -> None:
        """One step (its log record is written by the metrics callback) and the evaluation / checkpoint it is
        due for."""
        t, c = self.cfg.train, self.cfg.checkpoint
        self.train_step()
        self.stragglers.record(self.step, self.compute_seconds)  # every N steps: one all_gather of a float
        if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
            self.evaluate()
        if c.every and self.step % c.every == 0 and self.step < t.steps:
            self.save()

    # ----------------------------------------------------------------------------------------- checkpoints
    def _unwrapped(self) -> list[torch.nn.Module]:
        """The GPTModels inside the DDP/Float16 wrappers: checkpoints hold their (unprefixed) keys."""
        from megatron.core.utils import unwrap_model

        return unwrap_model(self.model)

    def _sharded_state_dict(self, is_loading: bool = False, rng: bool = True) -> dict:
        sd: dict = {}
        models = self._unwrapped()
        if len(models) == 1:
            sd["model"] = models[0].sharded_state_dict()
        else:
            for i, chunk in enumerate(models):
                sd[f"model{i}"] = chunk.sharded_state_dict()
        model_sd = {k: v for k, v in sd.items() if k.startswith("model")}
        # megatron-core 0.16's default distributed-optimizer format ("fully_sharded_model_space", deprecated)
        # builds ShardedTensors with flattened_range, which its own ShardedTensor then refuses: every save with
        # parallel.zero_stage >= 1 failed on GPU. dp_reshardable is the format the TP/PP resharding tests cover.
        metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
        optimizer_sd = self.backend.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
        if optimizer_sd is not None:  # DeepSpeed's ZeRO state is saved per rank instead (save_optimizer)
            sd["optimizer"] = optimizer_sd
        sd["scheduler"] = self.scheduler.state_dict()
        sd["step"] = self.step
        if rng:  # this rank's generators, one shard per (pp, tp, dp) rank
            i = self.info
            sd[RNG_KEY] = rng_sharded_object(None if is_loading else get_rng_state(), pp_rank=i.pp_rank,
                                             pp_size=i.pp_size, tp_rank=i.tp_rank, tp_size=i.tp_size,
                                             dp_rank=i.dp_rank, dp_size=i.dp_size)
        return sd

    def _layout(self) -> dict:
        return {"tp": self.info.tp_size, "pp": self.info.pp_size, "dp": self.info.dp_size,
                "vpp": self.cfg.parallel.vpp, "optimizer": self.cfg.parallel.optimizer,
                "zero_stage": self.cfg.parallel.zero_stage}

    def save(self) -> Path:
        meta = {"config": config_to_dict(self.cfg), "vocab_size": self.vocab_size,
                "consumed_samples": self.step * self.cfg.train.global_batch, "layout": self._layout(),
                "guard": self.guard.state_dict(), "rng_state": True}
        with self._watched():
            self.progress.update(self.step, "checkpoint save", limit="io")
            path = self.ckpt.save(self.step, self._sharded_state_dict(), meta,
                                  write_local=self.backend.save_optimizer)
            self.progress.update(self.step, "after checkpoint save")
        self.callbacks.on_save_end(self, path)
        return path

    def _checkpoint_phase(self, phase: str, step: int) -> None:
        self.callbacks.on_checkpoint_phase(phase, step)

    def wait_for_checkpoint(self) -> None:
        """Block until a pending asynchronous save (``checkpoint.async_save``) is published; collective."""
        if self.ckpt.pending is not None:
            self.progress.update(self.step, "checkpoint finalize", limit="io")
            self.ckpt.wait()
            self.progress.update(self.step, "after checkpoint finalize")

    def _check_compatible(self, path: Path, meta: dict) -> None:
        theirs, ours = meta["config"]["model"], config_to_dict(self.cfg)["model"]
        # the fields that define the network: a checkpoint whose values differ cannot be loaded into this model
        diffs = [f"model.{k}: checkpoint {theirs.get(k)!r} vs config {ours[k]!r}"
                 for k in self.variant.identity_fields if theirs.get(k) != ours[k]]
        if meta.get("vocab_size") != self.vocab_size:
            diffs.append(f"vocab_size: checkpoint {meta.get('vocab_size')} vs this run {self.vocab_size}")
        if diffs:
            raise CheckpointError(f"checkpoint {path} was saved from a different model ({'; '.join(diffs)}); "
                                  "use a matching config or a different checkpoint.dir")
        saved, now = meta.get("layout", {}), self._layout()
        reason = self.backend.layout_mismatch(saved, now)
        if reason is not None:
            raise CheckpointError(f"checkpoint {path} {reason}")

    def _rng_restorable(self, path: Path, meta: dict) -> bool:
        """Whether ``path`` holds RNG states for this layout; if not, rank 0 says so once."""
        saved, now = meta.get("layout", {}), self._layout()
        reason = None
        if not meta.get("rng_state"):
            reason = "it holds none (saved by an older version)"
        elif any(saved.get(k) != now[k] for k in ("pp", "tp", "dp")):
            reason = (f"the layout changed (saved with pp={saved.get('pp')} tp={saved.get('tp')} dp={saved.get('dp')}, "
                      f"this run has pp={now['pp']} tp={now['tp']} dp={now['dp']})")
        if reason is not None and self.info.global_rank == 0:
            logger.warning("RNG states were not restored from %s: %s; random draws (e.g. dropout) continue from "
                           "this run's seeds", path.name, reason)
        return reason is None

    def load(self, path: Path, *, checked: bool = False) -> None:
        """Load the checkpoint ``path`` (verified first, unless ``checked``: :meth:`CheckpointManager.check` just
        passed)."""
        if not checked:
            CheckpointManager.check(path)  # before its files are read, elas_meta.json included
        meta = CheckpointManager.read_meta(path)
        self._check_compatible(path, meta)
        restore_rng = self._rng_restorable(path, meta)
        loaded = CheckpointManager.load(path, self._sharded_state_dict(is_loading=True, rng=restore_rng),
                                        checked=True)
        models = self._unwrapped()
        if len(models) == 1:
            models[0].load_state_dict(loaded["model"])
        else:
            for i, chunk in enumerate(models):
                chunk.load_state_dict(loaded[f"model{i}"])
        if "optimizer" in loaded:  # the backend's state in the dist checkpoint
            self.backend.load_state_dict(loaded["optimizer"])
        self.backend.load_optimizer(path)  # and its per-rank state (DeepSpeed's ZeRO partitions)
        self.scheduler.load_state_dict(loaded["scheduler"])
        self.step = int(loaded["step"])
        self.guard.load_state_dict(meta.get("guard", {}))
        if restore_rng and not set_rng_state(loaded[RNG_KEY]) and self.info.global_rank == 0:
            logger.warning("CUDA RNG states of %s not restored: saved on %s, this run is on %s", path.name,
                           loaded[RNG_KEY]["device"], self.device.type)
        logger.info("resumed from %s at step %d", path, self.step)

    def load_latest(self) -> bool:
        self._starting("loading the checkpoint")
        path = self.ckpt.latest()
        if path is None:
            logger.info("--resume: no checkpoint in %s yet, starting from step 0", self.ckpt.dir)
            return False
        if self.cfg.checkpoint.fallback_to_verified:  # a checkpoint failing verification is skipped, with a warning
            path = self.ckpt.newest_loadable(path)
            self.load(path, checked=True)
        else:
            self.load(path)
        self.callbacks.on_resume(self, path)
        return True
