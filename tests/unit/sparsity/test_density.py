"""The ELAS density check: > 0.5 is an error, below train.density_warn a warning, dense modules are left out."""
from __future__ import annotations

import logging

import pytest

from elas_megatron.sparsity.density import check_density


class _Mlp:
    def __init__(self, density, sparse=True):
        self.last_density, self.is_sparse = density, sparse


def test_density_check(caplog):
    with caplog.at_level(logging.WARNING, logger="elas_megatron.sparsity.density"):
        assert check_density([_Mlp(0.40), _Mlp(0.42)], 7, 0.2) == pytest.approx(0.41)
        assert not caplog.records
        assert check_density([_Mlp(0.6)], 8, 0.2) == pytest.approx(0.6)
        assert "density 0.6000 > 0.5: the ELAS FFN is not 2:4 sparse" in caplog.text
        check_density([_Mlp(0.1)], 9, 0.2)
        assert "dropped to 0.1000 < train.density_warn=0.2" in caplog.text
    assert check_density([_Mlp(0.9, sparse=False)], 10, 0.2) is None  # dense modules (warm-up, ablation) not checked
