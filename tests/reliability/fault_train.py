"""``elas-train`` with the faults of ``$ELAS_TEST_FAULTS`` injected (:class:`faults.FaultInjector`).

Takes elas-train's arguments; ``reliability_runs.launch(..., faults=spec)`` runs it (also under torchrun).
``$ELAS_TEST_SLOW_START=PHASE:FILE[:SECONDS][:rank=R]`` also stalls start-up (:func:`faults.slow_startup`; PHASE
``datasets`` or ``checkpoint_load``), creating FILE when the stall begins.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main(argv: list[str] | None = None, callbacks=()) -> int:
    from faults import FaultInjector, slow_startup_from_env

    from elas_megatron.cli.train import main as train

    slow_startup_from_env()
    faults = FaultInjector.from_env()
    return train(argv, callbacks=[*([faults] if faults is not None else []), *callbacks])


if __name__ == "__main__":  # dist_checkpointing may spawn processes: keep the guard
    sys.exit(main())
