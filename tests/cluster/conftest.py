"""The ``slurm`` fixture: one real two-node SLURM cluster on this machine for the whole test session.

Skipped, with a one-line reason that says how to enable it, when SLURM or root is missing. The daemons are
stopped at the end of the session, also when a test or the start-up fails.
"""
from __future__ import annotations

import pytest
from slurm_cluster import SlurmCluster, skip_reason


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
