# SPDX-License-Identifier: Apache-2.0
"""CPU behaviour of the kernel dispatcher: auto -> reference, explicit GPU backends fail loudly."""
from __future__ import annotations

import logging

import pytest
import torch

from elas_megatron.kernels.dispatch import BACKENDS, KernelUnavailableError, relu2_sparse24_matmul
from elas_megatron.kernels.reference import relu2_sparse24_matmul_reference


@pytest.mark.parametrize("grad_mode", ["masked", "dense"])
def test_auto_on_cpu_is_the_reference(grad_mode, caplog):
    y = torch.randn(6, 32, requires_grad=True)
    w = torch.randn(32, 8, requires_grad=True)
    with caplog.at_level(logging.INFO, logger="elas_megatron.kernels.dispatch"):
        z = relu2_sparse24_matmul(y, w, grad_mode=grad_mode)
    z_ref = relu2_sparse24_matmul_reference(y, w, grad_mode=grad_mode)
    assert torch.equal(z, z_ref)


@pytest.mark.parametrize("backend", ["triton", "cusparselt"])
def test_explicit_gpu_backend_on_cpu_raises(backend):
    with pytest.raises(KernelUnavailableError, match=backend):
        relu2_sparse24_matmul(torch.randn(4, 16), torch.randn(16, 4), backend=backend)


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="reference"):
        relu2_sparse24_matmul(torch.randn(4, 16), torch.randn(16, 4), backend="cutlass")
    with pytest.raises(ValueError, match="masked"):
        relu2_sparse24_matmul(torch.randn(4, 16), torch.randn(16, 4), grad_mode="ste")


def test_dense_network_runs_anywhere():
    assert "reference" in BACKENDS
    y, w = torch.randn(4, 16), torch.randn(16, 4)
    torch.testing.assert_close(relu2_sparse24_matmul(y, w, sparse=False, backend="triton"), torch.relu(y) ** 2 @ w)


# --- the op with B_up inside (what ElasMLP calls) -------------------------------------------------------------------

from elas_megatron.kernels.dispatch import lowrank_relu2_sparse24_matmul  # noqa: E402


@pytest.mark.parametrize("grad_mode", ["masked", "dense"])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_lowrank_op_on_cpu_is_up_projection_then_reference(grad_mode, sparse, backend):
    h = torch.randn(3, 5, 8, requires_grad=True)
    up = torch.randn(8, 32, requires_grad=True)
    w = torch.randn(32, 6, requires_grad=True)
    z = lowrank_relu2_sparse24_matmul(h, up, w, sparse=sparse, grad_mode=grad_mode, backend=backend)
    z_ref = relu2_sparse24_matmul_reference(h @ up, w, sparse=sparse, grad_mode=grad_mode)
    assert torch.equal(z, z_ref)
    gz = torch.randn_like(z)
    for a, b in zip(torch.autograd.grad(z, (h, up, w), gz), torch.autograd.grad(z_ref, (h, up, w), gz)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "cusparselt"])
def test_lowrank_op_explicit_gpu_backend_on_cpu_raises(backend):
    with pytest.raises(KernelUnavailableError, match=backend):
        lowrank_relu2_sparse24_matmul(torch.randn(4, 8), torch.randn(8, 16), torch.randn(16, 4), backend=backend)
    with pytest.raises(ValueError, match="unknown"):
        lowrank_relu2_sparse24_matmul(torch.randn(4, 8), torch.randn(8, 16), torch.randn(16, 4), backend="cuda")


def test_cusparselt_binding_reports_why_it_cannot_run_here():
    from elas_megatron.kernels import cusparselt, cusparselt_lib

    assert "16-bit" in cusparselt_lib.binding_unavailable_reason(0, torch.float32)
    if not torch.cuda.is_available():
        assert cusparselt_lib.binding_unavailable_reason(0, torch.bfloat16) is not None
    assert cusparselt.transposed_result_ok(torch.bfloat16) and not cusparselt.transposed_result_ok(torch.float16)
