"""closed_form.derivative: φ' of the recognised activations as a basis expansion (used by the
NTK's backward pass), checked against autograd pointwise and, in expectation, against
quadrature of the same function."""

import pytest
import torch

import tensorprograms as tp
from tensorprograms import functions as F
from tensorprograms.master import closed_form

WITH_DERIVATIVE = {
    "identity": F.identity, "relu": F.relu, "abs": F.abs, "leaky_relu": F.leaky_relu(0.2),
    "affine": F.affine(2.0, 0.5), "sin": F.sin, "cos": F.cos, "exp": F.exp,
    "torch.relu": torch.relu, "aten.relu": torch.ops.aten.relu.default,
    "erf": F.erf, "torch.erf": torch.erf,
}


@pytest.mark.parametrize("name", WITH_DERIVATIVE)
def test_derivative_matches_autograd(name):
    fn = WITH_DERIVATIVE[name]
    x = torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x[x.abs() > 1e-6].requires_grad_(True)  # away from kinks
    (grad,) = torch.autograd.grad(fn(x).sum(), x)
    d = closed_form.derivative(fn)
    assert isinstance(d, closed_form.Combination)
    # sums of a few float64 terms (e.g. 0.2 + 0.8·step): equal to a couple of ulps
    torch.testing.assert_close(d(x.detach()), grad, rtol=0, atol=4e-16)


def test_no_derivative_without_a_basis():
    # step' is a delta, gauss' = −2x·exp(−x²) is not in the basis, tanh has no expansion
    for fn in (F.step, closed_form.derivative(F.erf), torch.tanh):
        assert closed_form.derivative(fn) is None


@pytest.mark.parametrize("name", ["relu", "abs", "leaky_relu", "sin", "exp", "erf"])
def test_derivative_expectations_match_quadrature(inputs, name):
    d = closed_form.derivative(WITH_DERIVATIVE[name])
    P = tp.Program()
    h = P.input_layer(inputs, 1.0, 0.2)
    y = P.nonlin(d, h)
    exact = tp.master_theorem(P, backend="closed_form").second_moment(y)
    quad = tp.master_theorem(P, backend="quadrature").second_moment(y)
    # quadrature of these integrands is exact to ~1e-13 (benchmarks/quadrature_accuracy.py)
    torch.testing.assert_close(exact, quad, rtol=1e-11, atol=1e-12)
