"""The interface every data-parallel optimizer backend implements, and what the backends share.

The trainer drives a backend only through :class:`OptimizerBackend`; ``parallel.optimizer`` picks the class
(:func:`elas_megatron.training.optimizers.backend_class`). Both backends use the same parameter groups
(:func:`param_groups`) and the same switch between torch Adam's kernels (:func:`use_adam_impl`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from elas_megatron.config.schema import Config

__all__ = ["OptimizerBackend", "param_groups", "use_adam_impl", "other_backend"]


@runtime_checkable
class OptimizerBackend(Protocol):
    """A data-parallel optimizer over megatron model chunks, driven from megatron's schedule.

    Attributes:
        name: the ``parallel.optimizer`` value that selects it.
        optimizer: the optimizer whose ``param_groups`` the learning-rate schedule drives.
        adam_kernel: the torch Adam kernel(s) in use ("foreach", "fused" or "n/a").
    """

    name: ClassVar[str]
    optimizer: Any
    adam_kernel: str

    # ------------------------------------------------------------------ before the backend exists
    @staticmethod
    def check_config(cfg: Config) -> None:
        """The backend's rules on top of ``validate``, before any process group exists (raises ConfigError)."""

    @staticmethod
    def wrap_chunk(cfg: Config, tconfig, chunk: torch.nn.Module, *, vp_stage: int) -> torch.nn.Module:
        """One model chunk wrapped as the backend needs it (e.g. megatron DDP), or the chunk itself."""

    # ------------------------------------------------------------------------------------- a step
    def configure_schedule(self, tconfig) -> None:
        """Set the hooks megatron's schedule calls (``finalize_model_grads_func``, ``grad_scale_func``,
        ``no_sync_func``) on the transformer config."""

    def before_microbatch(self, index: int, num_microbatches: int) -> None:
        """Called at the start of each training micro-batch's forward (``index`` counts from 0 in a step)."""

    def zero_grad(self) -> None:
        """Clear the gradients before a step's first micro-batch."""

    def step(self) -> tuple[bool, float | None]:
        """Clip and update; returns (update applied, global grad norm)."""

    # -------------------------------------------------------------------------------- checkpoints
    def sharded_state_dict(self, model_sharded_state_dict: dict, *, is_loading: bool,
                           metadata: dict | None) -> dict | None:
        """The optimizer state for megatron's dist checkpoint, or None where the backend saves it per rank."""

    def load_state_dict(self, state: dict) -> None:
        """Load what :meth:`sharded_state_dict` described, as read back from the dist checkpoint."""

    def save_optimizer(self, directory: Path) -> None:
        """Write this rank's local optimizer state into a checkpoint step directory (all ranks call it)."""

    def load_optimizer(self, directory: Path) -> None:
        """Read this rank's local optimizer state back from a checkpoint step directory."""

    @staticmethod
    def layout_mismatch(saved: dict, now: dict) -> str | None:
        """Why a checkpoint written under the layout ``saved`` cannot be loaded under ``now``, or None if it can.

        Both are ``{"tp", "pp", "dp", "vpp", "optimizer", "zero_stage"}`` dicts (``saved`` may lack keys: older
        checkpoints). The reason completes "checkpoint <path> ...".
        """

    def close(self) -> None:
        """Release what the backend holds (hooks)."""


def other_backend(saved: dict, now: dict) -> str | None:
    """The rule every backend shares: optimizer state is only readable by the backend that wrote it."""
    saved_backend = saved.get("optimizer", "megatron")
    if saved_backend != now["optimizer"]:
        return (f"holds {saved_backend} optimizer state but parallel.optimizer={now['optimizer']}; "
                f"resume with parallel.optimizer={saved_backend}")
    return None


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
