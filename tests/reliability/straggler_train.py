"""``elas-train`` that prints, on every rank, each comparison of the straggler check: the step it was made at and
every rank's mean compute time per step that the ranks all-gathered (``StragglerCheck.last``). Faults as
``fault_train.py``; run it with ``reliability_runs.launch(..., script=STRAGGLER_TRAIN)``.

Why: beside busy cores the compute times of two ranks vary by far more than any slowdown a test can afford to
inject, so a test cannot expect a given rank to be named; it can hold rank 0's warnings to the rule applied to the
very numbers they were decided on.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from elas_megatron.training.callbacks import Callback  # noqa: E402

PREFIX = "straggler comparison"


class PrintComparisons(Callback):
    """After each comparison (seen at the next step's start, or at the end): ``straggler comparison rank R step S
    [t0, t1, ...]`` on stdout."""

    def __init__(self) -> None:
        self._printed = None

    def _print_new(self, trainer) -> None:
        last = trainer.stragglers.last
        if last is not None and last is not self._printed:
            self._printed = last
            # One write with its newline: the ranks share one stdout file and run unbuffered (torchrun's `python
            # -u`), where print() writes the text and the newline separately, so the other rank's line could land
            # between them (seen: two comparisons on one line).
            sys.stdout.write(f"{PREFIX} rank {trainer.info.global_rank} step {trainer.step} {json.dumps(last)}\n")
            sys.stdout.flush()

    def on_step_begin(self, trainer, step: int) -> None:
        self._print_new(trainer)

    def on_train_end(self, trainer) -> None:
        self._print_new(trainer)


if __name__ == "__main__":  # dist_checkpointing may spawn processes: keep the guard
    from fault_train import main

    sys.exit(main(callbacks=[PrintComparisons()]))
