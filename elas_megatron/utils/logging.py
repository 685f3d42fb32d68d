"""Logging set-up for entry points: one formatted root logger, quiet on non-logging ranks."""
from __future__ import annotations

import logging
import warnings


def init_logging(level: str = "info", *, rank: int = 0, verbose_ranks: bool = False) -> None:
    """Configure the root logger; ranks other than 0 only report warnings unless ``verbose_ranks``."""
    lvl = getattr(logging, level.upper())
    if rank != 0 and not verbose_ranks:
        lvl = max(lvl, logging.WARNING)
    logging.basicConfig(level=lvl, format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    # Megatron-Core logs every bucket and parameter at INFO: keep it to warnings unless debugging.
    logging.getLogger("megatron").setLevel(logging.DEBUG if lvl == logging.DEBUG else logging.WARNING)
    # Megatron-Core's import-time notices about optional fused kernels are noise for our users.
    for pattern in ("Transformer Engine and Apex are not installed", "Apex is not installed"):
        warnings.filterwarnings("ignore", message=pattern)
