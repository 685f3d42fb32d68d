"""How long ranks wait for each other to start (before distributed initialisation): the longer of the two limits,
so that neither a short collective timeout nor a short I/O limit fails a slow start."""
from __future__ import annotations

import pytest

from elas_megatron.config.schema import ParallelConfig
from elas_megatron.parallel.setup import _start_wait


@pytest.mark.parametrize("distributed, io, want", [
    (2, 3, (3, "parallel.io_timeout_s")),                     # the usual order: io the longer
    (120, 20, (120, "parallel.distributed_timeout_s")),      # a short I/O limit (to catch stalled saves)
    (60, 60, (60, "parallel.io_timeout_s")),                   # a tie names the start-up limit
])
def test_ranks_wait_for_the_longer_limit(distributed, io, want):
    assert _start_wait(ParallelConfig(distributed_timeout_s=distributed, io_timeout_s=io)) == want
