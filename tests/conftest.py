"""Shared pytest fixtures: a single-process Megatron world (gloo on CPU) and GPU skipping."""
from __future__ import annotations

import os

import pytest
import torch

import elas_megatron  # noqa: F401  first: megatron-core's import-time notices are dropped at their source

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2-core CI machines: torchrun tests spawn several processes


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def megatron_world():
    """A world of one with Megatron-Core parallel state (TP=PP=1), torn down afterwards.

    Returns a factory ``init(parallel_cfg=None, seed=1234) -> ParallelInfo`` so a test can pick its layout.
    """
    from elas_megatron.config.schema import ParallelConfig
    from elas_megatron.parallel.setup import destroy_parallel, initialize_parallel

    def init(parallel_cfg: ParallelConfig | None = None, seed: int = 1234):
        return initialize_parallel(parallel_cfg or ParallelConfig(), seed=seed)

    yield init
    destroy_parallel()
