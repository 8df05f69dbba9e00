"""NETSOR+ pieces used by attention: a Moment of an outer product (a width contraction between
two vectors) and a LinComb whose coefficients are Scalars. Checked against the closed form
and against the finite-width interpreter (tolerance from the spread over seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tensorprograms as tp
from frontend.reference import apply_pair, relu_pair
from tensorprograms.program import functions as F


def _program(X: torch.Tensor):
    P = tp.Program()
    h = P.input_layer(X, weight_variance=1.0, bias_variance=0.1)
    W = P.matrix("W", variance=2.0)
    g = W @ P.nonlin(torch.relu, h)
    theta = P.moment(F.Outer(g.shape, g.shape), g, g, elementwise=False)  # (1/n) Σ g ⊗ g

    def attend(u, t):
        # u arrives as (*batch, 1, N): padded to θ's rank by the calling convention
        return (u @ torch.softmax(t, -1).T).squeeze(-2)  # y_i = Σ_j softmax(θ)_ij u_j

    y = P.linear(attend, g, params=(theta,))
    V = P.matrix("V", variance=1.5)
    z = V @ y
    return P, theta, y, z


def _closed_form(X: np.ndarray):
    K_h = X @ X.T / X.shape[1] + 0.1
    K_g = 2.0 * apply_pair(K_h, relu_pair)
    e = np.exp(K_g - K_g.max(1, keepdims=True))
    A = e / e.sum(1, keepdims=True)
    return K_g, 1.5 * A @ K_g @ A.T


@pytest.fixture
def X():
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def test_outer_moment_and_scalar_lincomb_closed_form(X):
    P, theta, y, z = _program(X)
    assert y.is_gaussian
    limit = tp.master_theorem(P)
    K_g, K_z = _closed_form(X.numpy())
    np.testing.assert_allclose(limit.value(theta).numpy(), K_g, rtol=1e-12, atol=0)
    np.testing.assert_allclose(limit.cov(z).numpy(), K_z, rtol=1e-12, atol=0)


def test_scalar_lincomb_finite_width(X):
    P, theta, y, z = _program(X)
    K = tp.master_theorem(P).cov(z)
    runs = torch.stack([tp.simulate(P, 2000, seed=s).second_moment(z) for s in range(8)])
    mean, se = runs.mean(0), runs.std(0) / math.sqrt(len(runs))
    assert ((mean - K).abs() / se).max() < 4.5
