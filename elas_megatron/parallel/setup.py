"""Process groups, device binding and seeds: everything that must happen before a model is built.

Reads the usual torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); without it the process
is a world of one. NCCL on CUDA, gloo on CPU (with the :mod:`elas_megatron.compat.cpu` workarounds).
Megatron-Core's ``parallel_state`` is the one piece of global state we keep, because Megatron requires it.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from elas_megatron.compat.cpu import enable_cpu_megatron
from elas_megatron.config.schema import ParallelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits in the layout (process ranks; ``rank`` alone is the low-rank width)."""
    global_rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """The last pipeline stage's first TP/DP rank: the one that sees the loss."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0


def resolve_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available; use train.device=auto or cpu")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_parallel(parallel: ParallelConfig, *, seed: int, device: str = "auto") -> ParallelInfo:
    """Initialise torch.distributed and Megatron-Core model-parallel groups, bind the device, seed RNGs."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    dev = resolve_device(device)
    if dev.type == "cpu":
        enable_cpu_megatron()
    else:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs = {}
        if "RANK" not in os.environ:  # a plain `elas-train` / python process: a world of one, on a free port
            # (passed explicitly, not via os.environ, so that child processes never inherit a stale port)
            kwargs = dict(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=parallel.distributed_timeout_s),
                                device_id=dev if dev.type == "cuda" else None, **kwargs)
    world = dist.get_world_size()
    if world % (parallel.tp * parallel.pp) != 0:
        raise RuntimeError(f"world size {world} is not divisible by parallel.tp * parallel.pp = "
                           f"{parallel.tp * parallel.pp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        distributed_timeout_minutes=max(1, parallel.distributed_timeout_s // 60),
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    info = ParallelInfo(
        global_rank=dist.get_rank(), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_size=parallel.tp, pp_size=parallel.pp, dp_size=parallel_state.get_data_parallel_world_size(),
        device=dev)
    logger.debug("parallel layout: %s", info)
    return info


def destroy_parallel() -> None:
    """Tear down model-parallel groups and the process group (tests and clean exits)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
