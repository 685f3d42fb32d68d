"""Optimizer backends and the learning-rate schedule.

Two interchangeable data-parallel optimizer backends, chosen by ``parallel.optimizer``, behind one small
interface the trainer drives (:class:`MegatronOptimizer` here, :class:`~elas_megatron.parallel.zero.DeepSpeedZeRO`
for DeepSpeed):

* ``megatron``: megatron-core ``DistributedDataParallel`` chunks + ``get_megatron_optimizer`` (AdamW, fp32 master
  weights under bf16, global grad-norm clipping over the model-parallel group, and the distributed optimizer --
  states and gradients sharded over DP -- when ``parallel.zero_stage >= 1``).
* ``deepspeed``: DeepSpeed ZeRO-1/2 with torch's AdamW (see :mod:`elas_megatron.parallel.zero`).

Both use the same parameter groups (no weight decay on biases and 1-D parameters such as the RMSNorm gains;
low-rank factors decay like any matrix) and the same linear warm-up + cosine decay through megatron's
``OptimizerParamScheduler``, so the two backends compute the same update up to floating-point reduction order.
"""
from __future__ import annotations

import torch

from elas_megatron.config.schema import Config

__all__ = ["warmup_steps", "param_groups", "build_scheduler", "MegatronOptimizer", "build_optimizer_backend",
           "use_adam_impl"]


def warmup_steps(cfg: Config) -> int:
    if cfg.optim.warmup_steps is not None:
        return min(cfg.optim.warmup_steps, cfg.train.steps)
    return int(cfg.optim.warmup_fraction * cfg.train.steps)


def param_groups(model_chunks: list[torch.nn.Module]) -> list[dict]:
    """AdamW groups as megatron's default builds them: ``wd_mult`` 0 for biases and 1-D parameters.

    ``wd_mult`` is read by ``OptimizerParamScheduler`` when it sets each group's weight decay.
    """
    decay, no_decay = [], []
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if name.endswith(".bias") or param.dim() == 1 else decay).append(param)
    groups = [{"params": decay, "wd_mult": 1.0, "lr_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0}]
    return [g for g in groups if g["params"]]


def build_scheduler(cfg: Config, optimizer):
    """Linear warm-up from 0 to ``optim.lr``, cosine decay to ``optim.lr * optim.min_lr_ratio`` at the last step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.lr * o.min_lr_ratio,
        lr_warmup_steps=warmup_steps(cfg), lr_decay_steps=cfg.train.steps, lr_decay_style="cosine",
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=cfg.train.steps, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False,
    )


def use_adam_impl(optimizer: torch.optim.Optimizer, impl: str) -> str:
    """Switch a torch Adam/AdamW between its ``foreach`` and ``fused`` kernels; returns the one in use.

    Why here and not at construction: without Apex/TE, megatron builds ``torch.optim.AdamW`` itself with no way
    to pass ``fused=True``, and its foreach path makes several passes over the fp32 master weights and states
    (the 1B dense optimizer step took 57 ms on an H100, 11 % of the step). Both kernels compute the same update;
    torch reads the choice from each param group at every step, so flipping it before the first step -- and
    again after loading a checkpoint, whose param groups carry the flags they were saved with -- is enough.
    ``fused`` needs every parameter on CUDA in a floating dtype (``auto`` picks it exactly then); its ``step``
    counters live on the device, so existing ones are moved there.

    Args:
        optimizer: a ``torch.optim.Adam``/``AdamW`` (anything else is left alone and reported as "n/a").
        impl: ``optim.adam_impl``: "auto", "foreach" or "fused".
    Raises:
        ValueError: ``fused`` requested for parameters that are not all floating-point CUDA tensors.
    """
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return "n/a"
    params = [p for g in optimizer.param_groups for p in g["params"]]
    can_fuse = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    if impl == "fused" and not can_fuse:
        raise ValueError("optim.adam_impl=fused needs every parameter on a CUDA device; use optim.adam_impl=auto "
                         "or foreach")
    fused = impl == "fused" or (impl == "auto" and can_fuse)
    for group in [*optimizer.param_groups, optimizer.defaults]:
        group["fused"], group["foreach"] = fused, not fused
    for p, state in optimizer.state.items():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            state["step"] = step.to(device=p.device if fused else "cpu", dtype=torch.float32)
    return "fused" if fused else "foreach"


class MegatronOptimizer:
    """megatron-core DDP + optimizer as a backend of the trainer.

    Args:
        cfg: the run config.
        model_chunks: ``DistributedDataParallel``-wrapped chunks (one per virtual pipeline stage).
        bf16: bf16 parameters with fp32 master weights.
    """

    name = "megatron"

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


def build_optimizer_backend(cfg: Config, model_chunks: list, *, bf16: bool, dp_size: int):
    """The backend named by ``parallel.optimizer`` over ``model_chunks`` (wrapped as that backend needs)."""
    if cfg.parallel.optimizer == "deepspeed":
        from elas_megatron.parallel.zero import DeepSpeedZeRO

        return DeepSpeedZeRO(cfg, model_chunks, param_groups(model_chunks), dp_size=dp_size, bf16=bf16)
    return MegatronOptimizer(cfg, model_chunks, bf16=bf16)
