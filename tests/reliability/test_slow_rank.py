"""Stragglers: every parallel.straggler_check_every steps the ranks compare their compute time per step (one
all_gather of a float), and rank 0 names a rank slower than 1.2x the median -- here rank 1, slowed by the fault
injector (0.4 s more per step), in a 2-rank torchrun job. The decision rule on its own:
tests/unit/training/test_stragglers.py."""
from __future__ import annotations

import re

import pytest
from reliability_runs import launch


@pytest.mark.distributed
def test_a_rank_that_turns_slow_is_named_in_the_log_and_not_before(tmp_path):
    """One launch for both halves (each torchrun start costs ~10 s on 2 cores): rank 1 is slowed from step 4 on, so
    the window 4-6 must name rank 1 with the injected 0.4 s, and the window 1-3 must not show it. On a quiet machine
    1-3 passes without a warning; beside busy cores two healthy ranks can differ by more than 1.2x by themselves
    (seen: 1.24x, 0.100 s against 0.081 s), which the rule rightly reports, so a 1-3 warning is allowed there only
    with a compute time far below the slowdown that starts at step 4."""
    result = launch(tmp_path / "run", "train.steps=6", "parallel.straggler_check_every=3",
                    "checkpoint.save_final=false", faults="slow@4:rank=1:0.4", timeout_s=600)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = re.findall(r"straggler: rank (\d) took ([\d.]+) s of compute per step over steps (\d-\d), ([\d.]+)x "
                          r"the median", result.stderr)
    late = [w for w in warnings if w[2] == "4-6"]
    assert [w[0] for w in late] == ["1"] and float(late[0][1]) >= 0.4 and float(late[0][3]) > 1.2, result.stderr[-3000:]
    early = [w for w in warnings if w[2] == "1-3"]
    assert len(warnings) == len(late) + len(early) and all(float(w[1]) < 0.3 for w in early), result.stderr[-3000:]
    assert "[rank1]" not in "".join(l for l in result.stderr.splitlines() if "straggler:" in l)  # rank 0 logs it
