"""Stragglers: every parallel.straggler_check_every steps the ranks compare their compute time per step (one
all_gather of a float), and rank 0 names a rank slower than 1.2x the median -- here in a 2-rank torchrun job whose
rank 1 the fault injector slows from step 4 on (0.4 s more per step). The decision rule on its own:
tests/unit/training/test_stragglers.py."""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
from reliability_runs import launch
from straggler_train import PREFIX

from elas_megatron.training.stragglers import stragglers

STRAGGLER_TRAIN = Path(__file__).with_name("straggler_train.py")
SLOWDOWN_S = 0.4
CHECK_EVERY = 3


@pytest.mark.distributed
def test_a_slowed_rank_is_measured_and_rank_0_names_stragglers_by_the_rule(tmp_path):
    """What holds however busy the machine: both ranks gather the same times at steps 3 and 6; rank 1's time over
    steps 4-6 includes the injected sleep; rank 0, and only rank 0, warns exactly when the rule names a rank, with
    that rank's time and the median. Which rank is named is the rule's answer to the measured times, so the test
    does not fix it: beside two CPU hogs and the rest of the suite, rank 1 was named over steps 4-6 (0.435 s against
    0.029 s) and, by chance, over steps 1-3 (0.114 s against 0.069 s, 1.25x the median); in another such run rank 0
    was named over steps 1-3 with 0.675 s against 0.059 s, more than the injected 0.4 s."""
    result = launch(tmp_path / "run", "train.steps=6", f"parallel.straggler_check_every={CHECK_EVERY}",
                    "checkpoint.save_final=false", faults=f"slow@4:rank=1:{SLOWDOWN_S}", script=STRAGGLER_TRAIN,
                    timeout_s=600)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = re.findall(rf"{PREFIX} rank (\d) step (\d+) (\[.*\])", result.stdout)
    by_rank = {rank: {int(step): json.loads(times) for r, step, times in printed if r == rank} for rank in "01"}
    assert by_rank["0"] == by_rank["1"] and sorted(by_rank["0"]) == [3, 6], result.stdout[-3000:]
    times = by_rank["0"]
    assert times[6][1] >= SLOWDOWN_S, times  # the sleep at the step's start is inside the measured compute

    warnings = re.findall(r"straggler: rank (\d) took ([\d.]+) s of compute per step over steps (\d)-(\d), ([\d.]+)x "
                          r"the median ([\d.]+) s", result.stderr)
    expected_count = 0
    for step, gathered in times.items():
        named = [w for w in warnings if int(w[3]) == step]
        expected = stragglers(gathered)  # 2 ranks: at most one is above 1.2x their median
        expected_count += len(expected)
        assert [int(w[0]) for w in named] == expected, (step, gathered, named)
        for rank, took, first, _, _, median in named:
            assert int(first) == step - CHECK_EVERY + 1, (named, step)
            assert abs(float(took) - gathered[int(rank)]) < 1e-3, (named, gathered)
            assert abs(float(median) - statistics.median(gathered)) < 1e-3, (named, gathered)
    assert len(warnings) == expected_count, warnings  # no other window warned
    assert "[rank1]" not in "".join(l for l in result.stderr.splitlines() if "straggler:" in l)  # rank 0 logs it
