"""Data-parallel optimizer backends behind one interface, :class:`~.backend.OptimizerBackend`.

``parallel.optimizer`` picks one:

* ``megatron`` (:mod:`.megatron`): megatron-core ``DistributedDataParallel`` chunks + ``get_megatron_optimizer``
  (the distributed optimizer -- states and gradients sharded over DP -- when ``parallel.zero_stage >= 1``).
* ``deepspeed`` (:mod:`.deepspeed`): DeepSpeed ZeRO-1/2 with torch's AdamW.

Both use the same parameter groups and the same warm-up + cosine schedule (:mod:`.lr_schedule`), so they compute
the same update up to floating-point reduction order. The backend modules are imported on first use (DeepSpeed
is optional).
"""
from __future__ import annotations

from elas_megatron.config.schema import Config
from elas_megatron.training.optimizers.backend import OptimizerBackend, param_groups
from elas_megatron.training.optimizers.lr_schedule import build_scheduler

__all__ = ["OptimizerBackend", "backend_class", "build_optimizer_backend", "build_scheduler"]


def backend_class(cfg: Config) -> type[OptimizerBackend]:
    """The backend class named by ``parallel.optimizer`` (its static methods serve before it is built)."""
    if cfg.parallel.optimizer == "deepspeed":
        from elas_megatron.training.optimizers.deepspeed import DeepSpeedZeRO

        return DeepSpeedZeRO
    from elas_megatron.training.optimizers.megatron import MegatronOptimizer

    return MegatronOptimizer


def build_optimizer_backend(cfg: Config, model_chunks: list, *, bf16: bool, dp_size: int) -> OptimizerBackend:
    """The backend named by ``parallel.optimizer`` over ``model_chunks`` (wrapped by its ``wrap_chunk``)."""
    cls = backend_class(cfg)
    if cfg.parallel.optimizer == "deepspeed":
        return cls(cfg, model_chunks, param_groups(model_chunks), dp_size=dp_size, bf16=bf16)
    return cls(cfg, model_chunks, bf16=bf16)
