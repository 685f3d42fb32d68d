"""NumericGuard on its own: layer names across pipeline stages, the loss-spike rule, gradients checked in hooks."""
from __future__ import annotations

import torch

from elas_megatron.training.numerics import NumericGuard


def test_layers_are_named_by_their_index_in_the_model_not_on_the_pipeline_stage():
    class Layer(torch.nn.Module):
        def __init__(self, layer_number):
            super().__init__()
            self.layer_number, self.mlp = layer_number, torch.nn.Linear(2, 2)

    chunk = torch.nn.Module()  # a second pipeline stage: its local layers 0, 1 are the model's layers 2, 3
    chunk.decoder = torch.nn.Module()
    chunk.decoder.layers = torch.nn.ModuleList([Layer(3), Layer(4)])
    guard = NumericGuard([chunk], max_skipped_steps=0, loss_spike_factor=0, device=torch.device("cpu"))
    assert guard.module_names == ["decoder.layers.2.mlp", "decoder.layers.2", "decoder.layers.3.mlp",
                                  "decoder.layers.3"]
    assert [n for n, _ in guard.params][:2] == ["decoder.layers.2.mlp.weight", "decoder.layers.2.mlp.bias"]


def test_loss_spike_guard():
    layer = torch.nn.Linear(2, 2)
    guard = NumericGuard([layer], max_skipped_steps=5, loss_spike_factor=2.0, device=torch.device("cpu"))
    guard.begin_step()
    for _ in range(10):
        assert guard.check(1, 3.0) is None
    assert guard.check(11, 5.9) is None
    assert "loss spike at step 12: 7.0000 > train.loss_spike_factor=2 x running mean" in guard.check(12, 7.0)
    off = NumericGuard([layer], max_skipped_steps=5, loss_spike_factor=0.0, device=torch.device("cpu"))
    for step in range(11):
        off.check(step, 3.0)
    assert off.check(12, 1e6) is None
    assert "loss nan" in guard.check(13, float("nan"))  # a non-finite loss is caught even without hooks


def test_hook_mode_sees_gradients_that_are_gone_by_the_check():
    """DeepSpeed ZeRO-2 reduces and frees gradients during backward: the guard must catch them as they appear."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].weight.register_hook(lambda g: g * float("nan"))  # autograd produces a NaN gradient
    guard = NumericGuard([model], max_skipped_steps=0, loss_spike_factor=0, device=torch.device("cpu"),
                         grads_in_hooks=True)
    guard.begin_step()
    model(torch.ones(2, 4)).sum().backward()
    for p in model.parameters():
        p.grad = None  # reduced into a partition and freed
    guard.record_grads()  # a no-op in hook mode
    assert "non-finite gradient in 1 of 4 parameters, nearest the output: 0.weight" in guard.check(1, 1.0)
