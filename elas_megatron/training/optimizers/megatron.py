"""The ``megatron`` optimizer backend: megatron-core ``DistributedDataParallel`` + ``get_megatron_optimizer``.

AdamW with fp32 master weights under bf16, global grad-norm clipping over the model-parallel group, and the
distributed optimizer (states and gradients sharded over DP) when ``parallel.zero_stage >= 1``. The optimizer
state goes into megatron's dist checkpoint (reshardable across TP/PP/DP), so the local save/load of
:class:`~elas_megatron.training.optimizers.backend.OptimizerBackend` are no-ops here.
"""
from __future__ import annotations

from pathlib import Path

import torch

from elas_megatron.config.schema import Config
from elas_megatron.training.optimizers.backend import other_backend, use_adam_impl

__all__ = ["MegatronOptimizer"]


class MegatronOptimizer:
    """megatron-core DDP + optimizer as a backend of the trainer.

    Args:
        cfg: the run config.
        model_chunks: ``DistributedDataParallel``-wrapped chunks (one per virtual pipeline stage).
        bf16: bf16 parameters with fp32 master weights.
    """

    name = "megatron"

    @staticmethod
    def check_config(cfg: Config) -> None:
        """Nothing beyond ``validate``."""

    @staticmethod
    def wrap_chunk(cfg: Config, tconfig, chunk: torch.nn.Module, *, vp_stage: int) -> torch.nn.Module:
        """The chunk in megatron DDP (its gradient buffers; sharded over DP for the distributed optimizer)."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,  # no CUDA streams; see compat/cpu.py (6)
            use_distributed_optimizer=cfg.parallel.zero_stage >= 1)
        return DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk,
                                       disable_bucketing=vp_stage > 0)

    def __init__(self, cfg: Config, model_chunks: list, *, bf16: bool) -> None:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from elas_megatron.compat.multi_tensor import use_foreach_multi_tensor_ops

        o = cfg.optim
        use_foreach_multi_tensor_ops(o.multi_tensor_impl == "foreach")
        opt_cfg = OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.lr * o.min_lr_ratio, weight_decay=o.weight_decay,
            adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad,
            bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=cfg.parallel.zero_stage >= 1,
        )
        self.chunks = model_chunks
        self.optimizer = get_megatron_optimizer(opt_cfg, model_chunks)
        self.adam_impl = o.adam_impl
        self._apply_adam_impl()

    def _chain(self) -> list:
        return getattr(self.optimizer, "chained_optimizers", [self.optimizer])

    def _apply_adam_impl(self) -> None:
        """The torch AdamW inside megatron's wrapper(s) on ``optim.adam_impl`` (see :func:`use_adam_impl`);
        ``adam_kernel`` records the kernel(s) in use ("n/a" with Apex/TE's FusedAdam)."""
        used = {use_adam_impl(opt.optimizer, self.adam_impl) for opt in self._chain()}
        self.adam_kernel = ",".join(sorted(used))

    def configure_schedule(self, tconfig) -> None:
        """Hooks megatron's schedule calls: DDP grad sync control, loss scaling, grad finalisation."""
        from megatron.core.distributed import finalize_model_grads

        tconfig.finalize_model_grads_func = finalize_model_grads
        tconfig.grad_scale_func = self.optimizer.scale_loss
        no_sync = [m.no_sync for m in self.chunks]
        tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync

    def zero_grad(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def before_microbatch(self, index: int, num_microbatches: int) -> None:
        """Nothing to do: megatron DDP reduces in ``finalize_model_grads``."""

    def step(self) -> tuple[bool, float | None]:
        success, grad_norm, _ = self.optimizer.step()
        return success, (float(grad_norm) if grad_norm is not None else None)

    def sharded_state_dict(self, model_sharded_state_dict: dict, *, is_loading: bool, metadata: dict | None):
        """The optimizer state as dist-checkpointing sharded tensors (reshardable across TP/PP/DP)."""
        if is_loading:
            self._materialize_distributed_optimizer_state()
        return self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, metadata=metadata)

    def _materialize_distributed_optimizer_state(self) -> None:
        """Give a fresh distributed optimizer Adam states to load into.

        Without Apex/TE (CPU, or a bare GPU install) megatron's ``DistributedOptimizer.state_dict`` reads the
        ``step`` of torch's Adam states, which do not exist before the first step, and asserts. Megatron's own
        remedy is ``_init_optimizer_states_with_dummy_values`` (one step on zero gradients, overwritten by the
        load); it runs here with the learning rate forced to 0, so that step (weight decay included) leaves the
        weights untouched.
        """
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        for opt in self._chain():
            if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
                lrs = [g["lr"] for g in opt.optimizer.param_groups]
                for g in opt.optimizer.param_groups:
                    g["lr"] = 0.0
                opt._init_optimizer_states_with_dummy_values()
                for g, lr in zip(opt.optimizer.param_groups, lrs):
                    g["lr"] = lr

    def load_state_dict(self, state: dict) -> None:
        # no_grad: with fp32 parameters the distributed optimizer's main params are views of the (leaf) model
        # parameters, which the load copies into in place.
        with torch.no_grad():
            self.optimizer.load_state_dict(state)
        chain = self._chain()
        states = [state] if len(chain) == 1 else [state[i] for i in range(len(chain))]
        for opt, sd in zip(chain, states):
            _restore_adam_steps(opt, sd)
        self._apply_adam_impl()

    def save_optimizer(self, directory: Path) -> None:
        """Nothing to write: the optimizer state is in the dist checkpoint (:meth:`sharded_state_dict`)."""

    def load_optimizer(self, directory: Path) -> None:
        """Nothing to read: :meth:`load_state_dict` got the state from the dist checkpoint."""

    @staticmethod
    def layout_mismatch(saved: dict, now: dict) -> str | None:
        """Only another backend's state is unreadable: dist checkpoints reshard across TP/PP/DP and ZeRO stages."""
        return other_backend(saved, now)

    def close(self) -> None:
        """Nothing to release."""


def _restore_adam_steps(opt, state: dict) -> None:
    """Give every torch Adam state of a distributed optimizer its own ``step`` tensor, set to the saved step.

    Without Apex/TE (CPU, or a bare GPU install) megatron-core 0.16's ``DistributedOptimizer`` keeps Adam's step
    in torch's per-parameter ``state[p]["step"]`` and gets two things wrong on load (both made resumed runs
    diverge by ~6e-3 at the first step after the checkpoint):

    * ``load_state_dict`` puts ONE tensor into every parameter's state; torch's Adam increments ``step`` in
      place once per parameter, so after one step it reads ``saved + number_of_parameters``;
    * the ``dp_reshardable`` format restores the step as a ``LocalNonpersistentObject`` -- the value the
      optimizer held when the load's state dict was built (1, from the dummy step that allocates the states) --
      and copies it over the checkpoint's value.

    The checkpoint's step is in its param groups (``state["optimizer"]["param_groups"][i]["step"]``, written by
    ``DistributedOptimizer.state_dict`` on this path); states without ``step`` (FusedAdam) are left alone.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not isinstance(opt, DistributedOptimizer):
        return
    groups = state.get("optimizer", {}).get("param_groups", [])
    steps = {g["step"] for g in groups if g.get("step") is not None}
    if not steps:
        return
    assert len(steps) == 1, f"distributed optimizer checkpoint with several Adam steps: {steps}"
    step = float(steps.pop())
    for param_state in opt.optimizer.state.values():
        if "step" in param_state:
            param_state["step"] = torch.tensor(step, dtype=torch.float32)
