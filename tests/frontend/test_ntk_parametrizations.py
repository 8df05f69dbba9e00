"""The NTK in the standard parametrization (at a nominal width), in abc-parametrizations,
and with constant-initialized parameters (zero-variance biases, LayerNorm gains): layer
recursions to float64 rounding, finite-width Monte Carlo, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tensorprograms as tp
from tensorprograms.empirical import ntk_mean
from tensorprograms.parametrization import ABCParametrization, LayerScaling

from .models import MLP, SB2, SW2
from .reference import apply_pair, relu_pair
from .test_ntk import LN, erf_pair_derivs, pair_matrices, relu_pair_derivs
from .test_recursions import SW2 as CNN_SW2
from .test_recursions import SmallCNN, avg_pool_cov, cnn_input, conv_cov, relu_k0

Z = 4.5


@pytest.fixture
def x():
    gen = torch.Generator().manual_seed(9)
    return torch.randn(5, 6, generator=gen) * torch.linspace(0.5, 2.0, 5)[:, None]


def recursion(X, pair, depth, sw2, sb2_in, sb2, hidden_weight, bias_weight, input_weight, back_sw2=None):
    """Θ for an MLP where each parameter's gradient term is weighted as given.

    Per layer: K ← sw2·E[φφ] + sb2; Θ ← hidden_weight·E[φφ] + bias_weight + sw2·E[φ'φ']·Θ;
    the first layer: K = sw2·XXᵀ/d + sb2_in, Θ = input_weight·XXᵀ + bias_weight."""
    K = sw2 * X @ X.T / X.shape[1] + sb2_in
    theta = input_weight * X @ X.T + bias_weight
    for _ in range(depth):
        k1, k0 = pair_matrices(K, pair)
        K = sw2 * k1 + sb2
        theta = hidden_weight * k1 + bias_weight + sw2 * k0 * theta
    return theta


@pytest.mark.parametrize("act,pair", [(torch.relu, relu_pair_derivs), (torch.special.erf, erf_pair_derivs)],
                         ids=["relu", "erf"])
def test_standard_ntk_equals_recursion(x, act, pair):
    """SP (Sohl-Dickstein et al. 2020; neural-tangents' parameterization='standard'): weights
    contribute fan-in × E[x x'] (hidden fan-in = the nominal width), biases 1."""
    n0 = 300
    limit = tp.infinite_width(lambda w: MLP(w, act, depth=3), x, parametrization="standard",
                              nominal_width=n0)
    expected = recursion(x.numpy(), pair, 3, SW2, SB2, SB2, hidden_weight=n0, bias_weight=1.0,
                         input_weight=1.0)
    np.testing.assert_allclose(limit.ntk(x).numpy(), expected, rtol=1e-10, atol=0)
    # the NNGP does not depend on the parametrization
    ntp = tp.infinite_width(lambda w: MLP(w, act, depth=3), x)
    torch.testing.assert_close(limit.nngp(x), ntp.nngp(x), rtol=1e-13, atol=0)


class Default(nn.Module):
    """PyTorch's default initialization: weights U(±1/√fan_in) (variance 1/(3 fan_in)),
    biases likewise, so hidden and readout biases vanish in the limit."""

    def __init__(self, width):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 2))

    def forward(self, x):
        return self.net(x)


def test_vanishing_biases_count_in_standard_not_in_ntk(x):
    X = x.numpy()
    sw2, sb2_in = 1 / 3, 1 / 18
    n0 = 128
    sp = tp.infinite_width(Default, x, parametrization="standard", nominal_width=n0).ntk(x).numpy()
    np.testing.assert_allclose(
        sp, recursion(X, relu_pair_derivs, 2, sw2, sb2_in, 0.0, n0, 1.0, 1.0), rtol=1e-10, atol=0)
    # NTP: only the first bias has a variance (it has finite fan-in); the others are θ = 0 + 0·ω
    K = sw2 * X @ X.T / 6 + sb2_in
    theta = K.copy()
    for _ in range(2):
        k1, k0 = pair_matrices(K, relu_pair_derivs)
        K = sw2 * k1
        theta = K + sw2 * k0 * theta
    np.testing.assert_allclose(tp.infinite_width(Default, x).ntk(x).numpy(), theta, rtol=1e-10, atol=0)


@pytest.mark.parametrize("width", [256])
def test_standard_ntk_matches_finite_width(x, width):
    """The mean empirical NTK of the code as written (gradients w.r.t. the parameters
    themselves) at width n vs the SP limit at nominal width n; the SE sets the tolerance."""
    theta = tp.infinite_width(Default, x, parametrization="standard", nominal_width=width).ntk(x)
    emp = ntk_mean(Default, width, x, samples=16, seed=3, parametrization="standard")
    z = ((emp.mean - theta).abs() / emp.stderr).max()
    assert z < Z, f"max |MC - limit| / SE = {z:.2f}"


def test_layernorm_gains_standard(x):
    """Trainable LayerNorm gain γ and shift β (init 1, 0) add, at the LayerNorm output y,
    the terms E[(dy ŷ)(dy' ŷ')] and E[dy dy'], where dy = readout · relu'(ŷ): for ReLU,
    relu'(u)·u = relu(u), so the gain adds σ_w²·E[relu(ŷ)relu(ŷ')] (not E[relu'relu']·K̂,
    since dy and ŷ are dependent)."""
    n0 = 200
    X = x.numpy()
    K = SW2 * X @ X.T / 6 + SB2
    theta = X @ X.T + 1.0
    k1, k0 = pair_matrices(K, relu_pair_derivs)
    K = SW2 * k1 + SB2
    theta = n0 * k1 + 1.0 + SW2 * k0 * theta
    d = np.sqrt(np.outer(np.diag(K) + 1e-5, np.diag(K) + 1e-5))
    Kn, theta = K / d, theta / d
    k1, k0 = pair_matrices(Kn, relu_pair_derivs)
    expected = n0 * k1 + 1.0 + SW2 * k0 * theta + SW2 * k1 + SW2 * k0
    limit = tp.infinite_width(lambda w: LN(w, affine=True), x, parametrization="standard", nominal_width=n0)
    np.testing.assert_allclose(limit.ntk(x).numpy(), expected, rtol=1e-10, atol=0)
    # NTP: a constant-initialized parameter has no NTK term, so affine changes nothing
    torch.testing.assert_close(tp.infinite_width(lambda w: LN(w, affine=True), x).ntk(x),
                               tp.infinite_width(LN, x).ntk(x), rtol=1e-12, atol=0)


def test_layernorm_gains_match_finite_width(x):
    factory = lambda w: LN(w, affine=True)  # noqa: E731
    width = 256
    theta = tp.infinite_width(factory, x, parametrization="standard", nominal_width=width).ntk(x)
    emp = ntk_mean(factory, width, x, samples=16, seed=4, parametrization="standard")
    z = ((emp.mean - theta).abs() / emp.stderr).max()
    assert z < Z, f"max |MC - limit| / SE = {z:.2f}"


def test_abc_ntk_point(x):
    """The abc NTK point with unit learning rates on the raw weights w (W = n^-a w): every
    layer's term counts with fan-in-free weight: Θ ← E[φφ] + 1 + σ_w² E[φ'φ'] Θ."""
    limit = tp.infinite_width(lambda w: MLP(w, torch.relu, depth=3), x,
                              parametrization=tp.parametrization.ntk())
    expected = recursion(x.numpy(), relu_pair_derivs, 3, SW2, SB2, SB2, 1.0, 1.0, 1.0)
    np.testing.assert_allclose(limit.ntk(x).numpy(), expected, rtol=1e-10, atol=0)


def test_abc_standard_with_lr_over_width(x):
    """SP with learning rate ∝ 1/n (c = 1 everywhere): the input layer and the biases stop
    moving (their terms ∝ 1/n), the hidden and readout weights give a finite kernel."""
    L = LayerScaling
    par = ABCParametrization(L(0, 0, 1), L(0, 0.5, 1), L(0, 0.5, 1), name="SP, lr/n")
    limit = tp.infinite_width(lambda w: MLP(w, torch.relu, depth=3), x, parametrization=par)
    expected = recursion(x.numpy(), relu_pair_derivs, 3, SW2, SB2, SB2, 1.0, 0.0, 0.0)
    np.testing.assert_allclose(limit.ntk(x).numpy(), expected, rtol=1e-10, atol=0)


def test_parametrization_errors(x):
    mlp = lambda w: MLP(w, torch.relu)  # noqa: E731
    with pytest.raises(ValueError, match="NTK diverges.*'out.weight' \\(output\\).*width\\^1"):
        tp.infinite_width(mlp, x, parametrization=tp.parametrization.standard()).ntk(x)
    with pytest.raises(ValueError, match="does not realize its forward pass"):
        tp.infinite_width(mlp, x, parametrization=tp.parametrization.mup()).ntk(x)
    with pytest.raises(ValueError, match="nominal_width=n"):
        tp.infinite_width(mlp, x, parametrization="standard").ntk(x)
    with pytest.raises(ValueError, match="nominal_width applies"):
        tp.infinite_width(mlp, x, nominal_width=64)
    with pytest.raises(ValueError, match="positive integer"):
        tp.infinite_width(mlp, x, parametrization="standard", nominal_width=0)
    with pytest.raises(TypeError, match="ABCParametrization"):
        tp.infinite_width(mlp, x, parametrization=3)


def test_small_cnn_standard_ntk_recursion():
    """The CNN-NTK recursion over all position pairs in SP at nominal width n₀: a convolution
    weight's term is its fan-in C_in·3 times the patch average of E[x x'], a bias's is 1."""
    n0 = 96
    x = cnn_input()
    X = x.numpy()
    N, C, L = X.shape

    def weight_term(S, fan_in):
        return conv_cov(S, bias=0.0) * fan_in / CNN_SW2

    S0 = np.einsum("acp,bcq->apbq", X, X) / C
    K1, T1 = conv_cov(S0), weight_term(S0, C * 3) + 1.0
    flat = K1.reshape(N * L, -1)
    R = apply_pair(flat, relu_pair).reshape(K1.shape)
    T = (relu_k0(flat) * T1.reshape(N * L, -1)).reshape(K1.shape)
    P = avg_pool_cov(R)
    K2 = conv_cov(P)
    T2 = weight_term(P, n0 * 3) + 1.0 + conv_cov(avg_pool_cov(T), bias=0.0)
    flat2 = K2.reshape(N * (L // 2), -1)
    R2 = apply_pair(flat2, relu_pair).reshape(K2.shape)
    T2r = (relu_k0(flat2) * T2.reshape(N * (L // 2), -1)).reshape(K2.shape)
    expected = n0 * R2.mean(axis=(1, 3)) + 1.0 + CNN_SW2 * T2r.mean(axis=(1, 3))
    theta = tp.infinite_width(SmallCNN, x, parametrization="standard", nominal_width=n0).ntk(x).numpy()
    np.testing.assert_allclose(theta, expected, rtol=1e-10, atol=0)
