# SPDX-License-Identifier: Apache-2.0
"""The ELAS density check: after 2:4 sparsification at most half of an FFN activation may be non-zero.

:func:`check_density` reads what the 2:4-sparse FFNs measured in their last forward (their ``last_density``, see
:func:`elas_megatron.sparsity.schedule.set_density_tracking`): a density above 0.5 means the 2:4 invariant is
broken; one below ``train.density_warn`` means many all-zero groups of 4 (dying ReLU units). The trainer calls it
every ``train.density_check_every`` steps.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

__all__ = ["check_density"]

logger = logging.getLogger(__name__)


def check_density(modules: Iterable, step: int, warn_below: float) -> float | None:
    """Mean measured activation density of the 2:4-sparse ElasMLPs in ``modules`` (their last forward).

    Logs an error above 0.5 (the 2:4 invariant is broken: the FFN is not sparse) and a warning below
    ``warn_below`` (many all-zero groups of 4: dying ReLU units). Returns None when nothing was measured.
    """
    values = [m.last_density for m in modules if m.is_sparse and m.last_density is not None]
    if not values:
        return None
    density = sum(values) / len(values)
    if density > 0.5 + 1e-6:
        logger.error("step %d: measured 2:4 activation density %.4f > 0.5: the ELAS FFN is not 2:4 sparse (kernel or "
                     "schedule bug); sparsity/act_density in metrics.jsonl", step, density)
    elif density < warn_below:
        logger.warning("step %d: activation density after 2:4 sparsification dropped to %.4f < train.density_warn="
                       "%g (typical ~0.4): many FFN units output zero (dying ReLU); consider a lower optim.lr",
                       step, density, warn_below)
    return density
