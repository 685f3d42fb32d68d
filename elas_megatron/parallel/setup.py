"""Process groups, device binding and seeds: everything that must happen before a model is built.

Reads the usual torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); without it the process
is a world of one. NCCL on CUDA, gloo on CPU (with the :mod:`elas_megatron.compat.cpu` workarounds).
Megatron-Core's ``parallel_state`` is the one piece of global state we keep, because Megatron requires it.

Timeouts: collectives time out as the training watchdog times the phase they run in. Process groups are created
with the start-up limit (:func:`~elas_megatron.config.schema.start_up_limit`: the longer of ``parallel.io_timeout_s``
and ``parallel.distributed_timeout_s``); the trainer then sets every group to its phase's limit, plus the
watchdog's margin (:func:`set_collective_timeout`, ``Watchdog.collective_timeout``): ``distributed_timeout_s`` in
training steps, ``io_timeout_s`` in checkpoint saves.
Why: ranks start at different times (imports from a shared file system, a busy node, one rank building the
dataset index) and wait for each other in start-up collectives (model build, optimizer set-up); neither a short
collective timeout, chosen to catch hangs in training, nor a short I/O limit, chosen to catch stalled saves, must
fail a slow start. Under torchrun each rank also holds a :class:`ProgressBoard` -- a client of the agent's
key-value store, which lives outside the workers -- where it checks in and waits for every rank before
initialisation, for up to the start-up limit. A rank that never checks in is named (torch alone only says which
store keys it waited for). The training watchdog (:class:`elas_megatron.training.watchdog.Watchdog`) later posts
its progress there.
"""
from __future__ import annotations

import gc
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from elas_megatron.compat.cpu import enable_cpu_megatron
from elas_megatron.config.schema import ParallelConfig, start_up_limit

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
    board: ProgressBoard | None = field(default=None, compare=False, repr=False)
    """Progress reports of every rank (torchrun only), for naming stuck ranks."""

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


class ProgressBoard:
    """One key per rank in the torchrun agent's store: ``check_in`` before initialisation, ``post`` progress later.

    Args:
        store: a ``torch.distributed.Store`` client.
        prefix: keys are ``{prefix}/{rank}``; unique per run and restart attempt.
        world_size, global_rank: this job and process.
    """

    def __init__(self, store, prefix: str, world_size: int, global_rank: int) -> None:
        self.store = store
        self.prefix = prefix
        self.world_size = world_size
        self.global_rank = global_rank

    @classmethod
    def connect(cls, timeout_s: float) -> ProgressBoard | None:
        """A board on the torchrun agent's store, or None outside torchrun (a rank-0-hosted store is created
        only inside ``init_process_group``, too late to see who never joined)."""
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            return None
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        prefix = (f"elas/{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}/"
                  f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
        return cls(store, prefix, int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]))

    def _key(self, rank: int) -> str:
        return f"{self.prefix}/{rank}"

    def post(self, value: str) -> None:
        self.store.set(self._key(self.global_rank), value)

    def check_in_and_wait(self, timeout_s: float) -> list[int]:
        """Check in, then wait until every rank has, for up to ``timeout_s``; the ranks still missing then.

        One counter and one key per job (the last rank in sets it), waited for in 1 s slices: a stop signal
        during the wait is handled between them (utils/interrupts.py), not after the whole timeout."""
        self.post("")
        everyone = f"{self.prefix}/all_checked_in"
        if self.store.add(f"{self.prefix}/checked_in", 1) >= self.world_size:
            self.store.set(everyone, "1")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.store.wait([everyone], timedelta(seconds=max(0.05, min(1.0, deadline - time.monotonic()))))
                return []
            except RuntimeError:  # DistStoreError: this slice timed out
                if time.monotonic() >= deadline:
                    return self.missing()

    def read_all(self) -> dict[int, str | None]:
        """Every rank's last post ("" for a rank that only checked in), None for ranks never seen."""
        out: dict[int, str | None] = {}
        for rank in range(self.world_size):
            key = self._key(rank)
            out[rank] = self.store.get(key).decode() if self.store.check([key]) else None
        return out

    def missing(self) -> list[int]:
        return [r for r, v in self.read_all().items() if v is None]

    # A hang, once one rank's watchdog declares it, is diagnosed by every rank before any of them exits (a rank
    # that exits first closes its connections, and the others would die of that instead of naming the stuck rank).
    def declare_hang(self) -> None:
        self.store.set(f"{self.prefix}/hang", str(self.global_rank))

    def hang_declared(self) -> bool:
        return self.store.check([f"{self.prefix}/hang"])

    def acknowledge_hang(self) -> int:
        """Count this rank as having diagnosed the hang; returns how many ranks have."""
        return self.store.add(f"{self.prefix}/hang_acks", 1)

    def hang_acks(self) -> int:
        return self.store.add(f"{self.prefix}/hang_acks", 0)


def _init_process_group(dev: torch.device, parallel: ParallelConfig, board: ProgressBoard | None, **kwargs) -> None:
    limit_s, key = start_up_limit(parallel.distributed_timeout_s, parallel.io_timeout_s)
    if board is not None:
        missing = board.check_in_and_wait(limit_s)
        if missing:
            raise RuntimeError(
                f"distributed initialisation failed on global rank {board.global_rank} of {board.world_size} after "
                f"waiting up to {key}={limit_s} (the start-up limit: the longer of the I/O and collective limits): "
                f"rank(s) {missing} never joined (check that their processes started and can reach "
                f"MASTER_ADDR={os.environ.get('MASTER_ADDR')})")
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                            timeout=timedelta(seconds=limit_s),
                            device_id=dev if dev.type == "cuda" else None, **kwargs)


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
    board = None
    if not dist.is_initialized():
        kwargs = {}
        if "RANK" not in os.environ:  # a plain `elas-train` / python process: a world of one, on a free port
            # (passed explicitly, not via os.environ, so that child processes never inherit a stale port)
            kwargs = dict(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        else:
            board = ProgressBoard.connect(parallel.distributed_timeout_s)
        _init_process_group(dev, parallel, board, **kwargs)
    elif dist.get_world_size() > 1:
        board = ProgressBoard.connect(parallel.distributed_timeout_s)
    world = dist.get_world_size()
    if world % (parallel.tp * parallel.pp) != 0:
        raise RuntimeError(f"world size {world} is not divisible by parallel.tp * parallel.pp = "
                           f"{parallel.tp * parallel.pp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
        _destroy_subgroups()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        # start-up, as the world (megatron takes minutes: a float keeps the seconds)
        distributed_timeout_minutes=start_up_limit(parallel.distributed_timeout_s, parallel.io_timeout_s)[0] / 60,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    info = ParallelInfo(
        global_rank=dist.get_rank(), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_size=parallel.tp, pp_size=parallel.pp, dp_size=parallel_state.get_data_parallel_world_size(),
        device=dev, board=board)
    logger.debug("parallel layout: %s", info)
    return info


def set_collective_timeout(seconds: float) -> None:
    """From now on, collectives of every process group of this process -- the world, megatron-core's, any other
    library's (DeepSpeed's) -- time out after ``seconds``. Local: no rank waits for another.

    Uses torch's ``_set_pg_timeout`` (private; megatron-core's ``parallel_state.update_pg_timeout`` uses it too, but
    only for megatron's own groups and after a world barrier, which a per-rank phase change must not need).
    """
    if not dist.is_initialized():
        return
    timeout = timedelta(seconds=seconds)
    for group in list(dist.distributed_c10d._world.pg_map):
        dist.distributed_c10d._set_pg_timeout(timeout, group)


def rank_errors(error: str | None) -> list[tuple[int, str]]:
    """Collective over the world: every rank's ``error`` that is not None, as ``(rank, error)`` in rank order, the
    same list on every rank, so that all ranks stop together when any one cannot go on. Without a multi-process
    group it is this process's own error (rank 0) and communicates nothing."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [(0, error)] if error else []
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return [(rank, e) for rank, e in enumerate(errors) if e]


def first_rank_error(error: str | None) -> str | None:
    """Collective (:func:`rank_errors`): the lowest failing rank's error, as ``"rank R: error"`` in a
    multi-process run and as it is in one process; None when no rank has one."""
    failed = rank_errors(error)
    if not failed:
        return None
    rank, first = failed[0]
    return f"rank {rank}: {first}" if dist.is_initialized() and dist.get_world_size() > 1 else first


def _destroy_subgroups() -> None:
    """Destroy every process group but the world (all ranks call this, as they created them).

    Why: megatron's ``destroy_model_parallel`` only forgets its groups; torch keeps each one registered, and a gloo
    group keeps its connection threads. A process that lays out a new model-parallel layout over the same world
    (the equivalence tests run ~50 layouts per torchrun job) otherwise piles up thousands of gloo threads whose
    polling ends up taking most of the CPU.
    """
    world = dist.GroupMember.WORLD
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not world:
            dist.destroy_process_group(group)
    gc.collect()  # the groups' last references (old models, optimizers) go now, and with them their threads


def destroy_parallel() -> None:
    """Tear down model-parallel groups and the process group (tests and clean exits)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
