"""Each closed form agrees with quadrature (to float64 rounding) and with Monte Carlo
(within 5 Monte Carlo standard errors, the tolerance the backend itself reports)."""

import itertools

import pytest
import torch

import tensorprograms as tp
from tensorprograms import functions as F
from tensorprograms.errors import ExpectationError
from tensorprograms.master import closed_form

FUNCTIONS = {
    "identity": F.identity,
    "relu": F.relu,
    "step": F.step,
    "abs": F.abs,
    "leaky_relu": F.leaky_relu(0.2),
    "affine": F.affine(2.0, 0.5),
    "erf": F.erf,
    "erf'": closed_form.derivative(F.erf),  # (2/√π)·exp(-x²): the NTK's E[erf' erf']
    "sin": F.sin,
    "cos": F.cos,
    "exp": F.exp,
    "torch.relu": torch.relu,
    "torch.erf": torch.erf,
    "aten.relu": torch.ops.aten.relu.default,  # what the PyTorch frontend captures
    "aten.sin": torch.ops.aten.sin.default,
}
PIECEWISE = {"identity", "relu", "step", "abs", "leaky_relu", "affine", "torch.relu", "aten.relu"}
ERF = {"identity", "erf", "torch.erf", "affine", "erf'"}
TRIG = {"identity", "sin", "cos", "exp", "affine", "aten.sin"}


def has_closed_form(a: str, b: str) -> bool:
    return any({a, b} <= fam for fam in (PIECEWISE, ERF, TRIG))


def limits(inputs, f, g):
    P = tp.Program()
    h = P.input_layer(inputs, 1.0, 0.2)
    y1 = P.nonlin(f, h)
    y2 = P.nonlin(g, h)
    return P, y1, y2


PAIRS = [p for p in itertools.combinations_with_replacement(FUNCTIONS, 2) if has_closed_form(*p)]


@pytest.mark.parametrize("a,b", PAIRS)
def test_closed_form_matches_quadrature_and_monte_carlo(inputs, a, b):
    P, y1, y2 = limits(inputs, FUNCTIONS[a], FUNCTIONS[b])
    exact = tp.master_theorem(P, backend="closed_form").second_moment(y1, y2)
    quad = tp.master_theorem(P, backend="quadrature").second_moment(y1, y2)
    mc_limit = tp.master_theorem(P, backend="monte_carlo", mc_samples=2**17, seed=1)
    mc = mc_limit.second_moment(y1, y2)
    se = mc_limit.stderr(y1, y2)
    # scale: sqrt(E f² E g²) bounds |E fg| (Cauchy–Schwarz), so entries near 0 are judged fairly
    d1 = tp.master_theorem(P, backend="quadrature").second_moment(y1).diagonal()
    d2 = tp.master_theorem(P, backend="quadrature").second_moment(y2).diagonal()
    scale = (d1[:, None] * d2[None, :]).sqrt()
    assert ((quad - exact).abs() / scale).max() < 1e-10
    assert ((mc - exact).abs() <= 5 * se + 1e-12).all(), ((mc - exact) / se).abs().max()


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_closed_form_means(inputs, name):
    P = tp.Program()
    h = P.input_layer(inputs, 1.0, 0.2)
    theta = P.moment(FUNCTIONS[name], h)
    exact = tp.master_theorem(P, backend="closed_form").value(theta)
    quad = tp.master_theorem(P, backend="quadrature").value(theta)
    mc_limit = tp.master_theorem(P, backend="monte_carlo", mc_samples=2**17, seed=2)
    mc, se = mc_limit.value(theta), mc_limit.stderr(theta)
    assert torch.allclose(quad, exact, rtol=1e-12, atol=1e-13)
    assert ((mc - exact).abs() <= 5 * se + 1e-12).all()


def test_known_values():
    """Spot values from the literature, independent of the table's code path."""
    P = tp.Program()
    h = P.vector("h", shape=(2,), cov=torch.tensor([[1.0, 0.5], [0.5, 1.0]]))
    y = P.nonlin(torch.relu, h)
    s = P.nonlin(F.step, h)
    e = P.nonlin(torch.erf, h)
    L = tp.master_theorem(P)
    theta = torch.arccos(torch.tensor(0.5))
    k1 = (torch.sin(theta) + (torch.pi - theta) * 0.5) / (2 * torch.pi)  # Cho & Saul, order 1
    assert torch.allclose(L.second_moment(y)[0, 1], k1, rtol=1e-14)
    assert torch.allclose(L.second_moment(y)[0, 0], torch.tensor(0.5), rtol=1e-14)  # E relu² = 1/2
    assert torch.allclose(L.second_moment(s)[0, 1], (torch.pi - theta) / (2 * torch.pi), rtol=1e-14)
    assert torch.allclose(L.mean(y), torch.full((2,), (2 * torch.pi) ** -0.5), rtol=1e-14)
    arcsine = 2 / torch.pi * torch.arcsin(torch.tensor(2 * 0.5 / 3.0))  # Williams 1997
    assert torch.allclose(L.second_moment(e)[0, 1], arcsine, rtol=1e-14)
    # E[exp(-u²) exp(-v²)] = det(I + 2Σ)^(-1/2) = (3·3 - 1)^(-1/2); erf' = (2/√π) exp(-x²)
    de = P.nonlin(closed_form.derivative(torch.erf), h)
    L = tp.master_theorem(P)
    assert torch.allclose(L.second_moment(de)[0, 1], torch.tensor(4 / torch.pi / 8 ** 0.5), rtol=1e-14)
    assert torch.allclose(L.mean(de), torch.full((2,), 2 / torch.pi ** 0.5 / 3 ** 0.5), rtol=1e-14)


def test_pairs_without_closed_form_fall_back_to_quadrature(inputs):
    P, y1, y2 = limits(inputs, F.relu, F.erf)
    with pytest.raises(ExpectationError, match="no closed form"):
        tp.master_theorem(P, backend="closed_form").second_moment(y1, y2)
    L = tp.master_theorem(P)
    L.second_moment(y1, y2)
    assert L.records[-1].backend == "quadrature"


def test_products_of_functions_of_independent_gaussians(inputs):
    P = tp.Program()
    a = P.input_layer(inputs, 1.0, 0.2)
    b = P.input_layer(inputs.flip(0), 2.0, 0.1)
    ya = P.nonlin(torch.tanh, a)  # no closed form: the means come from quadrature
    yb = P.nonlin(F.cos, b)
    L = tp.master_theorem(P)
    val = L.second_moment(ya, yb)
    assert L.records[-1].backend.startswith("independent")
    assert torch.allclose(val, torch.outer(L.mean(ya), L.mean(yb)), rtol=1e-13, atol=1e-15)
    mc = tp.master_theorem(P, backend="monte_carlo", mc_samples=2**17, seed=3)
    m, se = mc.second_moment(ya, yb), mc.stderr(ya, yb)
    assert ((m - val).abs() <= 5 * se + 1e-12).all()
