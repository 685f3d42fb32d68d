"""SparsitySchedule drives any SwitchableSparsity module; it knows the layers only through that protocol."""
from __future__ import annotations

import torch

from elas_megatron.sparsity.schedule import (SparsitySchedule, SwitchableSparsity, activation_density, elas_mlps,
                                             set_density_tracking)


class _Switchable(torch.nn.Module):
    def __init__(self, allowed: bool = True) -> None:
        super().__init__()
        self.allowed = allowed
        self.sparse_active = True
        self.track_density = False
        self.last_density: float | None = None

    @property
    def is_sparse(self) -> bool:
        return self.allowed and self.sparse_active


def test_schedule_switches_protocol_modules_only():
    model = torch.nn.Sequential(_Switchable(), torch.nn.Linear(2, 2), torch.nn.Sequential(_Switchable(False)))
    found = list(elas_mlps(model))
    assert len(found) == 2 and all(isinstance(m, SwitchableSparsity) for m in found)
    assert not isinstance(model[1], SwitchableSparsity)
    schedule = SparsitySchedule(dense_warmup_steps=2)
    assert schedule.apply([model], 0) is False and not any(m.sparse_active for m in found)
    assert schedule.apply(model, 2) is True and all(m.sparse_active for m in found)
    assert [m.is_sparse for m in found] == [True, False]


def test_density_tracking_through_the_protocol():
    model = torch.nn.Sequential(_Switchable(), _Switchable())
    set_density_tracking(model, True)
    assert all(m.track_density for m in model)
    model[0].last_density, model[1].last_density = 0.25, 0.5
    assert activation_density(model) == 0.375
    set_density_tracking(model, False)
    assert activation_density(model) is None


def test_elas_mlp_implements_the_protocol():
    from elas_megatron.layers.mlp import ElasMLP

    for name in ("sparse_active", "track_density", "last_density", "is_sparse"):
        assert name in ElasMLP.__init__.__code__.co_names or hasattr(ElasMLP, name), name
