"""megatron-core's checkpoint-writer helper survives the stop signals torchrun forwards to the process group, and
dies with its parent; synchronous saves do without it."""
from __future__ import annotations

import os
import queue as stdlib_queue
import signal
import subprocess
import sys
import time
from pathlib import Path

from megatron.core.dist_checkpointing.strategies import filesystem_async

from elas_megatron.compat import checkpoint_writer


def test_the_write_results_queue_outlives_sigterm_and_sigusr1():
    # a fresh helper, whatever an earlier asynchronous save in this process started (restored at the end)
    saved = filesystem_async._results_queue, checkpoint_writer._manager, checkpoint_writer._manager_queue
    filesystem_async._results_queue = checkpoint_writer._manager = checkpoint_writer._manager_queue = None
    try:
        assert checkpoint_writer.start_writer_queue() is True
        assert checkpoint_writer.start_writer_queue() is False       # idempotent
        queue = filesystem_async._get_write_results_queue()          # what a save uses: ours
        helper = checkpoint_writer._manager._process
        for sig in (signal.SIGTERM, signal.SIGUSR1):                 # as torchrun's os.killpg delivers them
            os.kill(helper.pid, sig)
        queue.put("written")
        assert queue.get(timeout=30) == "written" and helper.is_alive()
    finally:
        if checkpoint_writer._manager is not None:
            checkpoint_writer._manager.shutdown()
        filesystem_async._results_queue, checkpoint_writer._manager, checkpoint_writer._manager_queue = saved


def test_a_synchronous_save_uses_an_in_process_queue_and_starts_no_helper():
    saved = filesystem_async._results_queue
    try:
        helper = checkpoint_writer._manager
        checkpoint_writer.use_write_results_queue(async_save=False)
        assert checkpoint_writer._manager is helper                 # none started for forked writers to dial
        queue = filesystem_async._get_write_results_queue()
        assert type(queue) is stdlib_queue.Queue                    # in-process, not a Manager proxy
        queue.put("written")                                        # megatron: put and get_nowait, one process
        assert queue.get_nowait() == "written"
        checkpoint_writer.use_write_results_queue(async_save=False)
        assert filesystem_async._get_write_results_queue() is not queue  # a new one per save: nothing stale
    finally:
        filesystem_async._results_queue = saved


CHILD = """
import os
from elas_megatron.compat import checkpoint_writer
if __name__ == "__main__":
    checkpoint_writer.start_writer_queue()
    print(checkpoint_writer._manager._process.pid, flush=True)
    os.kill(os.getpid(), 9)
"""


def test_the_helper_dies_with_a_killed_parent(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    helper = int(out.stdout.split()[0])
    deadline = time.monotonic() + 60  # a bound on failure only: beside busy cores an exit can take seconds
    while Path(f"/proc/{helper}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{helper}").exists()
