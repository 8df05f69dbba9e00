"""Limits are differentiable: torch.autograd.gradcheck (float64) of kernels with respect to
variance hyperparameters and to the inputs, through closed forms and quadrature."""

import pytest
import torch

import tensorprograms as tp


def kernel_fn(act):
    def kernel(sw, sb, x):
        P = tp.Program()
        h = P.input_layer(x, sw, sb)
        for _ in range(2):
            W = P.matrix(variance=sw)
            b = P.vector(variance=sb)
            h = P.lincomb([1.0, 1.0], [W @ P.nonlin(act, h), b])
        return tp.master_theorem(P).cov(h)

    return kernel


@pytest.mark.parametrize("act", [torch.relu, torch.erf, torch.tanh], ids=["relu", "erf", "tanh"])
def test_gradcheck_variances_and_inputs(act):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=gen).requires_grad_(True)
    sw = torch.tensor(1.7, requires_grad=True)
    sb = torch.tensor(0.2, requires_grad=True)
    assert torch.autograd.gradcheck(kernel_fn(act), (sw, sb, x), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradient_is_finite_on_the_diagonal():
    """A vector paired with itself has ρ ≡ 1, where arccos' is infinite: the gradient of the
    diagonal must still be finite and equal its closed form d(σ_w² E relu²)/dσ_w² = K/σ_w²·…"""
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    sw = torch.tensor(2.0, requires_grad=True)
    P = tp.Program()
    h = P.input_layer(x, sw, 0.0)
    W = P.matrix(variance=sw)
    g = W @ P.nonlin(torch.relu, h)
    K = tp.master_theorem(P).cov(g)
    K.diagonal().sum().backward()
    # K_aa = sw · sw·|x_a|²/d / 2, so dK_aa/dsw = sw·|x_a|²/d; Σ_a = 2·(1 + 4)/2 = 5
    assert torch.isfinite(sw.grad) and abs(sw.grad.item() - 5.0) < 1e-12
