# SPDX-License-Identifier: Apache-2.0
"""The ``deepspeed`` optimizer backend: DeepSpeed ZeRO stage 1/2 as the data-parallel optimizer of a
Megatron-Core model and schedule.

``parallel.optimizer=deepspeed`` swaps only the data-parallel half of training: the model chunks are our
megatron ``GPTModel`` s (TP layers, megatron's process groups), and every step still runs through megatron's
``get_forward_backward_func`` (no pipelining / 1F1B / interleaved). DeepSpeed owns gradient reduction over the
data-parallel group, the fp32 master weights and Adam states partitioned over it, grad-norm clipping and the
update. How the two are combined (docs/parallelism.md has the long version):

* ``deepspeed.initialize`` receives the chunks in one ``ModuleList`` (so all of them share ONE ZeRO optimizer
  and one global grad norm), torch's ``AdamW`` as the client optimizer, and :class:`MegatronMPU`, which exposes
  megatron's ``parallel_state`` groups through the ``mpu`` interface DeepSpeed reads (data-parallel group for
  ZeRO partitioning, model-parallel group for the grad norm).
* The schedule never calls the engine: it runs forward on the chunks and backward with plain autograd, exactly
  like DeepSpeed's own ``PipelineEngine`` does ("backward handled outside ZeRO"). After the last micro-batch
  megatron calls ``finalize_model_grads_func``, which is :meth:`DeepSpeedZeRO.finalize_grads`: it reduces the
  gradients through ``engine.allreduce_gradients()`` at an accumulation boundary (ZeRO-1: one reduce of the
  accumulated gradients into each rank's partition, the PipelineEngine path) or flushes the last bucket
  (ZeRO-2). ``engine.step()`` then clips and updates.
* ZeRO-2 reduces (reduce-scatters) gradients inside backward, per micro-batch, through the hooks its optimizer
  put on every parameter; between two micro-batches its epilogue must run. ZeRO-2 is only allowed without
  pipelining (``validate``), where megatron's schedule strictly alternates forward and backward, so the epilogue
  of micro-batch ``k - 1`` runs at the start of the forward of micro-batch ``k`` (:meth:`before_microbatch`).
* Sequence parallelism: parameters marked ``sequence_parallel`` (norm gains, the replicated low-rank factors)
  get partial gradients on each TP rank. Megatron DDP sums them over TP in ``finalize_model_grads``; here a
  tensor hook sums each such gradient over the TP group as it is produced, before ZeRO sees it.

Checkpoints: the model goes through ``dist_checkpointing`` like the megatron backend's; the ZeRO optimizer state
is DeepSpeed's own per-rank state dict, written by every rank into the same atomic step directory
(:meth:`save_optimizer` / :meth:`load_optimizer`) and loadable with the same TP/PP/DP layout.

DeepSpeed is imported lazily: the framework works without it, and asking for it then fails with one line
naming the install command (:func:`import_deepspeed`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from elas_megatron.config.schema import Config, ConfigError, validate
from elas_megatron.training.checkpoint import CheckpointError
from elas_megatron.training.optimizers.backend import other_backend, use_adam_impl

__all__ = ["INSTALL_HINT", "import_deepspeed", "check_deepspeed_config", "deepspeed_config", "MegatronMPU",
           "DeepSpeedZeRO"]

logger = logging.getLogger(__name__)

INSTALL_HINT = ("DS_BUILD_OPS=0 pip install --no-deps deepspeed==0.19.8 einops hjson msgpack ninja py-cpuinfo "
                "&& pip install 'pydantic>=2'")
"""Pure-Python DeepSpeed next to an existing torch (``--no-deps`` so that pip never replaces torch)."""

ZERO_DIR = "zero"
"""Sub-directory of a checkpoint step directory holding the per-rank ZeRO optimizer states."""


def import_deepspeed():
    """Import DeepSpeed (CPU accelerator when CUDA is absent), or raise one ``ImportError`` line with the fix."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError(f"parallel.optimizer=deepspeed needs DeepSpeed, which is not importable ({exc}); "
                          f"install it with: {INSTALL_HINT}") from None
    return deepspeed


def check_deepspeed_config(cfg: Config) -> None:
    """Rules of the DeepSpeed backend on top of ``validate``, checked before any process group exists.

    Raises:
        ConfigError: (one line) any rule of ``validate`` (ZeRO stage 1/2 only), or DeepSpeed not importable
            (with the install line).
    """
    p = cfg.parallel
    if p.optimizer != "deepspeed":
        return
    validate(cfg)  # the stage rules live there (ZeRO 1/2; 1 with PP)
    try:
        import_deepspeed()
    except ImportError as exc:
        raise ConfigError(f"{exc} (or use parallel.optimizer=megatron)") from None


def deepspeed_config(cfg: Config, *, dp_size: int, bf16: bool) -> dict:
    """The DeepSpeed JSON config of a run.

    Batch sizes are bookkeeping only (the schedule is megatron's): one "micro-batch" of DeepSpeed is this DP
    rank's whole share of the global batch, so DeepSpeed never rescales gradients by an accumulation count of
    its own; megatron's schedule already divides each micro-batch loss by the number of micro-batches.
    """
    p, o = cfg.parallel, cfg.optim
    stage2 = p.zero_stage == 2
    ds = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.global_batch // dp_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": o.clip_grad,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": p.zero_stage,
            # ZeRO-1 keeps no gradient hooks: gradients accumulate in param.grad over the micro-batches and are
            # reduced once, at finalize_grads. ZeRO-2 needs its hooks (contiguous partitioned gradients).
            "contiguous_gradients": stage2,
            "overlap_comm": False,
            "reduce_scatter": True,
        },
        "bf16": {"enabled": bf16},
    }
    if bf16:
        # ZeRO-2 accumulates the micro-batches' bf16 gradients in fp32 (its hooks keep an fp32 ``grad_accum``),
        # like megatron's grad_reduce_in_fp32. For ZeRO-1, fp32 accumulation would make DeepSpeed switch to its
        # separate BF16_Optimizer, whose gradient path expects DeepSpeed's own backward; ZeRO-1 therefore
        # accumulates in bf16 (param.grad) and reduces once per step. See docs/parallelism.md.
        ds["data_types"] = {"grad_accum_dtype": "fp32" if stage2 else "bf16"}
    return ds


class MegatronMPU:
    """DeepSpeed's ``mpu`` interface over megatron-core's ``parallel_state`` (which dropped a few names).

    Model parallel = tensor x pipeline parallel, as in megatron (``get_model_parallel_group``). DeepSpeed's own
    "sequence parallelism" (Ulysses) is a different thing from megatron's and is not exposed.
    """

    def __init__(self) -> None:
        from megatron.core import parallel_state

        self.ps = parallel_state

    _DELEGATED = frozenset(f"get_{kind}_{what}" for kind in ("data_parallel", "tensor_model_parallel",
                                                              "pipeline_model_parallel")
                           for what in ("group", "rank", "world_size")) | {"get_tensor_model_parallel_src_rank"}
    """The getters ``parallel_state`` has under the names DeepSpeed reads, passed through unchanged."""

    def __getattr__(self, name: str):
        if name in MegatronMPU._DELEGATED:
            return getattr(self.ps, name)
        raise AttributeError(f"{type(self).__name__} has no {name!r}")

    def get_model_parallel_group(self):
        return self.ps.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self.ps.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self.ps.get_model_parallel_group())


class DeepSpeedZeRO:
    """ZeRO-1/2 over megatron model chunks, driven from megatron's schedule (see the module docstring).

    Args:
        cfg: the run config (``parallel.zero_stage``, ``optim``, ``train.global_batch``).
        chunks: the model chunks (``GPTModel``, or ``Float16Module`` around one for bf16), not DDP-wrapped.
        param_groups: torch optimizer parameter groups over ``chunks``' parameters.
        dp_size: data-parallel world size.
        bf16: bf16 parameters (fp32 master weights inside ZeRO).

    Attributes:
        engine: the ``DeepSpeedEngine`` (never called for forward/backward).
        optimizer: its ZeRO optimizer; ``param_groups`` is what the LR scheduler drives.
    """

    def __init__(self, cfg: Config, chunks: list[torch.nn.Module], param_groups: list[dict], *, dp_size: int,
                 bf16: bool) -> None:
        deepspeed = import_deepspeed()
        # DeepSpeed insists on LOCAL_RANK in the environment, which a plain one-process run does not set.
        os.environ.setdefault("LOCAL_RANK", "0")
        if not torch.cuda.is_available():
            _quiet_deepspeed_cpu_logging()
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False,
                                   verbose=False, dist_init_required=False)
        o = cfg.optim
        base = torch.optim.AdamW(param_groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                 weight_decay=o.weight_decay)
        self.stage = cfg.parallel.zero_stage
        self.container = torch.nn.ModuleList(chunks)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.container, optimizer=base, config=deepspeed_config(cfg, dp_size=dp_size, bf16=bf16),
            mpu=MegatronMPU(), dist_init_required=False)
        self.adam_impl = o.adam_impl
        self._apply_adam_impl()
        self._tp_hooks = self._hook_sequence_parallel_grads(chunks) if cfg.parallel.sequence_parallel else []
        self._pending_epilogue = False
        logger.info("DeepSpeed ZeRO-%d optimizer (%s) over %d model chunk(s), dp=%d", self.stage,
                    type(self.optimizer).__name__, len(chunks), dp_size)

    name = "deepspeed"

    check_config = staticmethod(check_deepspeed_config)

    @staticmethod
    def wrap_chunk(cfg: Config, tconfig, chunk: torch.nn.Module, *, vp_stage: int) -> torch.nn.Module:
        """The bare chunk: DeepSpeed reduces gradients itself."""
        return chunk

    # ------------------------------------------------------------------------------------------ gradients
    def configure_schedule(self, tconfig) -> None:
        """megatron's schedule hands gradient finalisation to ZeRO; no loss scaling (fp32/bf16), no DDP no_sync."""
        tconfig.finalize_model_grads_func = self.finalize_grads
        tconfig.grad_scale_func = None
        tconfig.no_sync_func = None

    @staticmethod
    def _hook_sequence_parallel_grads(chunks: list[torch.nn.Module]) -> list:
        """Sum the gradients of ``sequence_parallel`` parameters over TP as autograd produces them."""
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()

        def all_reduce(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.contiguous()
            dist.all_reduce(grad, group=group)
            return grad

        return [p.register_hook(all_reduce) for c in chunks for p in c.parameters()
                if p.requires_grad and getattr(p, "sequence_parallel", False)]

    def _set_boundary(self, is_boundary: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(is_boundary)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()
        if hasattr(self.optimizer, "clear_backward_seen_flag"):
            self.optimizer.clear_backward_seen_flag()
        self._pending_epilogue = False

    def before_microbatch(self, index: int, num_microbatches: int) -> None:
        """Called at the start of each micro-batch's forward (``index`` counts from 0 within the step).

        ZeRO-2 only (no pipelining, so the previous micro-batch's backward is complete): flush the previous
        micro-batch's gradient buckets, then tell ZeRO whether the coming backward ends the accumulation.
        """
        if self.stage < 2:
            return
        if index > 0:
            self.optimizer.overlapping_partition_gradients_reduce_epilogue()
        self._set_boundary(index == num_microbatches - 1)

    def finalize_grads(self, model, num_tokens=None, pg_collection=None, force_all_reduce=False) -> None:
        """megatron's ``finalize_model_grads_func``: reduce the accumulated gradients over data parallelism."""
        assert num_tokens is None, "per-token loss scaling is not used"
        self._set_boundary(True)
        self.engine.allreduce_gradients()

    def step(self) -> tuple[bool, float | None]:
        """Clip and update (ZeRO partitions, then all-gather of the updated weights). Returns (ok, grad norm)."""
        self._set_boundary(True)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        ok = not getattr(self.optimizer, "overflow", False)
        return ok, (float(norm) if norm is not None else None)

    # ---------------------------------------------------------------------------------------- checkpoints
    def sharded_state_dict(self, model_sharded_state_dict: dict, *, is_loading: bool, metadata: dict | None):
        """None: ZeRO state is not in the dist checkpoint but per rank (:meth:`save_optimizer`)."""
        return None

    @staticmethod
    def _rank_file(directory: Path) -> Path:
        from megatron.core import parallel_state as ps

        return directory / ZERO_DIR / (f"tp{ps.get_tensor_model_parallel_rank():02d}_"
                                       f"pp{ps.get_pipeline_model_parallel_rank():02d}_"
                                       f"dp{ps.get_data_parallel_rank():03d}.pt")

    def save_optimizer(self, directory: Path) -> None:
        """Write this rank's ZeRO state into ``directory/zero/`` (all ranks call it; directory exists)."""
        path = self._rank_file(Path(directory))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"zero_stage": self.stage, "optimizer": self.optimizer.state_dict()}, path)

    def load_optimizer(self, directory: Path) -> None:
        """Load the ZeRO state this rank wrote (same TP/PP/DP layout; the caller checks the layout)."""
        path = self._rank_file(Path(directory))
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint holds no DeepSpeed ZeRO state for this rank "
                                  "(saved with parallel.optimizer=megatron or another layout)")
        state = _load_zero_state(path)
        if state["zero_stage"] != self.stage:
            raise CheckpointError(f"{path} holds ZeRO-{state['zero_stage']} state but parallel.zero_stage="
                                  f"{self.stage}; resume with the stage it was saved with")
        from megatron.core import parallel_state

        # DeepSpeed indexes the list by DP rank; with an unchanged DP size only this rank's entry is read.
        states = [None] * parallel_state.get_data_parallel_world_size()
        states[parallel_state.get_data_parallel_rank()] = state["optimizer"]
        self.optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
        self._apply_adam_impl()  # the loaded param groups carry the flags they were saved with

    def _apply_adam_impl(self) -> None:
        """torch's AdamW under ZeRO (over the fp32 partitions) on ``optim.adam_impl``; see ``use_adam_impl``."""
        self.adam_kernel = use_adam_impl(getattr(self.optimizer, "optimizer", self.optimizer), self.adam_impl)

    def load_state_dict(self, state: dict) -> None:
        """Never called: the dist checkpoint holds no ZeRO state (:meth:`sharded_state_dict` is None)."""
        raise CheckpointError("a DeepSpeed ZeRO run's optimizer state is per rank (load_optimizer), not in the "
                              "dist checkpoint")

    @staticmethod
    def layout_mismatch(saved: dict, now: dict) -> str | None:
        """ZeRO state is saved per rank: only the same TP/PP/DP/VPP layout and ZeRO stage can read it."""
        reason = other_backend(saved, now)
        if reason is not None:
            return reason
        keys = ("tp", "pp", "dp", "vpp", "zero_stage")
        if any(saved.get(k) != now[k] for k in keys):
            return (f"holds per-rank DeepSpeed ZeRO state of the layout { {k: saved.get(k) for k in keys} }, which "
                    f"cannot be resharded to { {k: now[k] for k in keys} }; resume with the saved layout (the "
                    "megatron backend's checkpoints reshard across TP/PP/DP)")
        return None

    def close(self) -> None:
        for hook in self._tp_hooks:
            hook.remove()
        self._tp_hooks = []


def _zero_state_globals() -> list:
    """The DeepSpeed classes a ZeRO optimizer ``state_dict`` holds besides tensors and containers: plain records
    (a loss scaler's scale and flags, the ZeRO stage enum, a fragment's offset and size) whose unpickling only sets
    attributes or looks up an enum member."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load_zero_state(path: Path) -> dict:
    """``torch.load(weights_only=True)`` of a rank's ZeRO state, with only :func:`_zero_state_globals` added (for
    this load, not process-wide); anything else in the file is refused with one line naming it."""
    from elas_megatron.training.checkpoint_trust import torch_load_plain

    with torch.serialization.safe_globals(_zero_state_globals()):
        state = torch_load_plain(path, path)
    if not isinstance(state, dict) or "zero_stage" not in state or "optimizer" not in state:
        raise CheckpointError(f"{path}: not a ZeRO state file written by elas-megatron (no zero_stage/optimizer); "
                              "resume from an older checkpoint")
    return state


def _quiet_deepspeed_cpu_logging() -> None:
    """DeepSpeed logs its accelerator choice and config at INFO on every rank; keep warnings only."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
