"""Each Megatron-Core CPU workaround does its one job, and nothing is patched when CUDA is present."""
from __future__ import annotations

import pytest
import torch

from elas_megatron.compat.cpu import cpu_mode_active, enable_cpu_megatron

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the workarounds are only active without CUDA")


@cpu_only
def test_current_device_and_synchronize():
    assert enable_cpu_megatron() is True
    assert enable_cpu_megatron() is True  # idempotent
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    torch.cuda.synchronize()


@cpu_only
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 0), 0])
def test_factory_device_arguments_are_redirected(device):
    enable_cpu_megatron()
    assert torch.zeros(3, dtype=torch.int, device=device).device.type == "cpu"
    assert torch.tensor([1.0], device=device).device.type == "cpu"


@cpu_only
def test_tensor_cuda_and_type_checks():
    enable_cpu_megatron()
    t = torch.ones(2)
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu"
    assert t.type() == "torch.cuda.FloatTensor"          # megatron optimizer wrappers check this string
    assert t.type(torch.float64).dtype == torch.float64   # typed conversions are untouched


@cpu_only
def test_rng_tracker_uses_a_stand_in_generator_and_leaves_the_default_alone(megatron_world):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    megatron_world()
    model_parallel_cuda_manual_seed(7)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        pass
    assert torch.equal(before, torch.get_rng_state())
    tracker_state = get_cuda_rng_tracker().get_states()["model-parallel-rng"]
    model_parallel_cuda_manual_seed(7, force_reset_rng=True)
    assert torch.equal(tracker_state, get_cuda_rng_tracker().get_states()["model-parallel-rng"])


@pytest.mark.gpu
def test_nothing_is_patched_on_gpu():
    original = torch.cuda.current_device
    assert not cpu_mode_active()
    assert enable_cpu_megatron() is False
    assert torch.cuda.current_device is original
    assert torch.zeros(1, device="cuda").device.type == "cuda"


@cpu_only
def test_device_rewrite_is_active_inside_custom_backward():
    """Megatron's recompute re-runs forward code (device="cuda" factories) inside an autograd.Function backward."""
    enable_cpu_megatron()

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            mask = torch.ones(grad.shape, device="cuda")  # what get_default_causal_mask does
            return grad * 2 * mask

    x = torch.ones(3, requires_grad=True)
    Recompute.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))
