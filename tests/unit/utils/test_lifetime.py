"""Children forked by the training process die with it, also when it is SIGKILLed (utils/lifetime.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux-only")

# The way a rank dies during a megatron-core checkpoint save: the parent forks a writer, prints its pid, waits in
# JoinableQueue.join() and is SIGKILLed there; the writer then calls task_done() (without the hook it blocks in
# Condition.notify_all for ever, waiting for the dead parent). The writer waits for the parent's death rather than
# for a fixed time, so that a busy machine cannot reorder the two.
PARENT = """
import multiprocessing as mp, os, signal, sys, threading, time
from elas_megatron.utils.lifetime import forked_children_die_with_this_process
if sys.argv[1] == "hook":
    forked_children_die_with_this_process()
ctx = mp.get_context("fork")
done = ctx.JoinableQueue()
done.put(0)

def writer(parent):
    done.get()
    while os.getppid() == parent:  # wait for the parent's death (with the hook, this child dies with it)
        time.sleep(0.05)
    done.task_done()      # the last task: notify_all waits for the dead parent to acknowledge
    print("task_done returned", flush=True)

child = ctx.Process(target=writer, args=(os.getpid(),))
child.start()
print(child.pid, flush=True)
threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGKILL)).start()  # the main thread is in join() by then
done.join()
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("hook", [True, False], ids=["hook", "without-hook"])
def test_a_forked_child_dies_with_its_sigkilled_parent(hook: bool, tmp_path):
    out = tmp_path / "out"
    with out.open("w") as stdout:  # a file, not a pipe: a child left alive holds its end open
        proc = subprocess.run([sys.executable, "-c", PARENT, "hook" if hook else "none"], stdout=stdout,
                              stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == -signal.SIGKILL, out.read_text()[-2000:]
    child = int(out.read_text().split()[0])
    try:
        if hook:
            deadline = time.monotonic() + 30
            while _alive(child) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _alive(child), "the child outlived its SIGKILLed parent"
        else:  # the control: without the hook the writer is left blocked, as in a killed rank's save
            time.sleep(3)
            assert _alive(child) and "task_done returned" not in out.read_text(), out.read_text()
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
