"""The NNGP of a hand-written L-layer MLP program equals the textbook layer recursion.

The references below are written independently of the engine: the arc-cosine
recursion for ReLU (Cho & Saul 2009), Williams' arcsine kernel for erf, and nested
adaptive quadrature (scipy.integrate.quad) for tanh, which has no closed form.
"""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

import tensorprograms as tp

SW2, SB2, DEPTH = 1.7, 0.15, 4


def mlp_program(x, phi):
    P = tp.Program()
    h = P.input_layer(x, SW2, SB2, name="h1")
    for layer in range(2, DEPTH + 1):
        W = P.matrix(f"W{layer}", variance=SW2)
        b = P.vector(f"b{layer}", variance=SB2)
        h = P.lincomb([1.0, 1.0], [W @ P.nonlin(phi, h), b], name=f"h{layer}")
    return P, h


def recursion(x: np.ndarray, pair_expectation) -> np.ndarray:
    K = SW2 * x @ x.T / x.shape[1] + SB2
    for _ in range(2, DEPTH + 1):
        new = np.empty_like(K)
        for i in range(len(K)):
            for j in range(len(K)):
                new[i, j] = SW2 * pair_expectation(K[i, i], K[j, j], K[i, j]) + SB2
        K = new
    return K


def relu_pair(a, b, c):
    rho = np.clip(c / math.sqrt(a * b), -1, 1)
    t = math.acos(rho)
    return math.sqrt(a * b) / (2 * math.pi) * (math.sin(t) + (math.pi - t) * math.cos(t))


def erf_pair(a, b, c):
    return 2 / math.pi * math.asin(2 * c / math.sqrt((1 + 2 * a) * (1 + 2 * b)))


def tanh_pair(a, b, c):
    """E[tanh(u) tanh(v)] by nested adaptive quadrature: u = √a·s, v | u Gaussian."""
    sa = math.sqrt(a)
    beta = c / a
    resid = max(b - c * c / a, 0.0)

    def inner(s):
        mu = beta * sa * s
        if resid == 0.0:
            return math.tanh(mu)
        f = lambda t: math.tanh(mu + math.sqrt(resid) * t) * math.exp(-t * t / 2)  # noqa: E731
        return integrate.quad(f, -np.inf, np.inf, epsabs=1e-14, epsrel=1e-13, limit=200)[0] / math.sqrt(
            2 * math.pi
        )

    g = lambda s: math.tanh(sa * s) * inner(s) * math.exp(-s * s / 2)  # noqa: E731
    return integrate.quad(g, -np.inf, np.inf, epsabs=1e-14, epsrel=1e-13, limit=200)[0] / math.sqrt(
        2 * math.pi
    )


@pytest.mark.parametrize(
    "phi,pair,rtol",
    [
        (torch.relu, relu_pair, 1e-12),  # both closed forms: float64 rounding through 4 layers
        (torch.erf, erf_pair, 1e-12),
        # quadrature vs adaptive quadrature: the engine's rule is accurate to ~1e-13
        # (benchmarks/quadrature_accuracy.py) and scipy's to its epsrel 1e-13
        (torch.tanh, tanh_pair, 1e-10),
    ],
    ids=["relu", "erf", "tanh"],
)
def test_mlp_nngp_equals_textbook_recursion(inputs, phi, pair, rtol):
    x = inputs[:4]
    P, out = mlp_program(x, phi)
    K = tp.master_theorem(P).cov(out)
    ref = recursion(x.numpy(), pair)
    np.testing.assert_allclose(K.numpy(), ref, rtol=rtol, atol=0)


def test_relu_mlp_nngp_all_backends_agree(inputs):
    P, out = mlp_program(inputs, torch.relu)
    closed = tp.master_theorem(P, backend="closed_form").cov(out)
    quad = tp.master_theorem(P, backend="quadrature").cov(out)
    torch.testing.assert_close(quad, closed, rtol=1e-12, atol=0)
