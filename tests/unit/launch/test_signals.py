"""StopSignal: SIGTERM/SIGUSR1 are recorded, and every rank agrees to stop after the same step."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from elas_megatron.training.signals import StopSignal


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_the_flag_and_restore_puts_the_old_handler_back(sig):
    before = signal.getsignal(sig)
    with StopSignal() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), sig)
        assert stop.received == sig.name
        assert stop.should_stop() and stop.reason == sig.name
        assert stop.should_stop()  # stays stopped
    assert signal.getsignal(sig) == before


def test_check_every_polls_only_every_nth_call():
    with StopSignal(check_every=3) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert [stop.should_stop() for _ in range(3)] == [False, False, True]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown signal 'SIGFOO'"):
        StopSignal(["SIGFOO"])
    with pytest.raises(ValueError, match="check_every"):
        StopSignal(check_every=0)


_WORKER = textwrap.dedent("""
    import json, os, signal, sys
    import torch.distributed as dist
    from elas_megatron.training.signals import StopSignal
    rank, sent = int(sys.argv[1]), sys.argv[3]    # sent: the signal this rank gets in "step 3", or "-"
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
    stop = StopSignal()
    stopped_at = None
    for step in range(6):
        if step == 3 and sent != "-":
            os.kill(os.getpid(), signal.Signals[sent])
        if stop.should_stop():
            stopped_at = step
            break
    print(json.dumps({"rank": rank, "stopped_at": stopped_at, "reason": stop.reason}))
    dist.destroy_process_group()
""")


@pytest.mark.parametrize(("sent", "reasons"), [
    (["-", "SIGUSR1"], ["SIGUSR1 on another rank", "SIGUSR1"]),  # rank 0, which prints the last line, names it
    (["SIGTERM", "SIGUSR1"], ["SIGTERM", "SIGUSR1"]),           # each rank names its own
])
def test_two_ranks_stop_at_the_same_step_and_name_the_signal(sent, reasons):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(rank), port, sent[rank]], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["stopped_at"] for r in results] == [3, 3]
    assert [r["reason"] for r in results] == reasons
