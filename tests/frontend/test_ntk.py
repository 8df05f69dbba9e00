"""The infinite-width NTK (NTK parametrization) of plain PyTorch models: TP II's backward
program, checked against the literature's layer recursion to float64 rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import tensorprograms as tp

from .models import MLP, SB2, SW2, init_


def relu_pair_derivs(a, b, c):
    n = math.sqrt(a * b)
    t = math.acos(min(1.0, max(-1.0, c / n)))
    k1 = n / (2 * math.pi) * (math.sin(t) + (math.pi - t) * math.cos(t))
    k0 = (math.pi - t) / (2 * math.pi)
    return k1, k0


def erf_pair_derivs(a, b, c):
    k1 = 2 / math.pi * math.asin(2 * c / math.sqrt((1 + 2 * a) * (1 + 2 * b)))
    k0 = 4 / math.pi / math.sqrt((1 + 2 * a) * (1 + 2 * b) - 4 * c * c)  # E[erf'(u) erf'(v)]
    return k1, k0


def pair_matrices(K: np.ndarray, pair) -> tuple[np.ndarray, np.ndarray]:
    """(E[φ(u)φ(v)], E[φ'(u)φ'(v)]) for every pair of inputs under the covariance K."""
    k1, k0 = np.empty_like(K), np.empty_like(K)
    for i in range(len(K)):
        for j in range(len(K)):
            k1[i, j], k0[i, j] = pair(K[i, i], K[j, j], K[i, j])
    return k1, k0


def ntk_recursion(X: np.ndarray, pair, depth: int, bias: bool) -> np.ndarray:
    """Jacot et al. 2018 / Arora et al. 2019: Θ^{l+1} = K^{l+1} + σ_w² E[φ'φ'] Θ^l."""
    sb = SB2 if bias else 0.0
    K = SW2 * X @ X.T / X.shape[1] + sb
    theta = K.copy()
    for _ in range(depth):
        k1, k0 = pair_matrices(K, pair)
        K = SW2 * k1 + sb
        theta = K + SW2 * k0 * theta
    return theta


@pytest.fixture
def x():
    gen = torch.Generator().manual_seed(9)
    return torch.randn(5, 6, generator=gen) * torch.linspace(0.5, 2.0, 5)[:, None]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("act,pair", [(torch.relu, relu_pair_derivs), (torch.special.erf, erf_pair_derivs)],
                         ids=["relu", "erf"])
@pytest.mark.parametrize("depth", [2, 3])
def test_mlp_ntk_equals_recursion(x, act, pair, bias, depth):
    limit = tp.infinite_width(lambda w: MLP(w, act, bias=bias, depth=depth), x)
    theta = limit.ntk(x).numpy()
    np.testing.assert_allclose(theta, ntk_recursion(x.numpy(), pair, depth, bias), rtol=1e-10, atol=0)


def test_ntk_two_batches_and_symmetry(x):
    limit = tp.infinite_width(lambda w: MLP(w, torch.relu), x)
    full = limit.ntk(x)
    torch.testing.assert_close(full, full.T, rtol=1e-13, atol=0)
    torch.testing.assert_close(limit.ntk(x[:2], x[2:]), full[:2, 2:], rtol=1e-12, atol=0)
    assert (torch.linalg.eigvalsh(full) > 0).all()
    # the NTK dominates the NNGP (it adds the hidden layers' gradient terms)
    assert (full.diagonal() > limit.nngp(x).diagonal()).all()
    K, theta = limit.kernels(x)
    torch.testing.assert_close(K, limit.nngp(x), rtol=1e-13, atol=0)
    torch.testing.assert_close(theta, full, rtol=1e-13, atol=0)


class LN(nn.Module):
    def __init__(self, width, affine=False):
        super().__init__()
        self.a, self.h, self.b = nn.Linear(6, width), nn.Linear(width, width), nn.Linear(width, 3)
        self.ln = nn.LayerNorm(width, elementwise_affine=affine)
        init_(self)

    def forward(self, x):
        return self.b(torch.relu(self.ln(self.h(torch.relu(self.a(x))))))


def test_layernorm_mlp_ntk_equals_recursion(x):
    """LayerNorm maps (K, Θ) to (K, Θ) / sqrt((K_aa + ε)(K_bb + ε)): in the limit the
    statistics' gradient terms vanish (the backward pass is odd in the readout seeds)."""
    X = x.numpy()
    K = SW2 * X @ X.T / X.shape[1] + SB2
    theta = K.copy()
    for layer in range(2):
        k1, k0 = pair_matrices(K, relu_pair_derivs)
        K = SW2 * k1 + SB2
        theta = K + SW2 * k0 * theta
        if layer == 0:
            d = np.sqrt(np.outer(np.diag(K) + 1e-5, np.diag(K) + 1e-5))
            K, theta = K / d, theta / d
    limit = tp.infinite_width(LN, x)
    np.testing.assert_allclose(limit.ntk(x).numpy(), theta, rtol=1e-10, atol=0)


def test_frozen_parameters_drop_out(x):
    def frozen(w):
        m = MLP(w, torch.relu)
        m.hidden[0].weight.requires_grad_(False)
        return m

    full = tp.infinite_width(lambda w: MLP(w, torch.relu), x).ntk(x).numpy()
    part = tp.infinite_width(frozen, x).ntk(x).numpy()
    # the hidden weight's term is σ² E[dh dh'] E[x x'] = Θ-difference; check it independently:
    X = x.numpy()
    K1 = SW2 * X @ X.T / X.shape[1] + SB2
    k1, _ = pair_matrices(K1, relu_pair_derivs)
    K2 = SW2 * k1 + SB2
    a, b, c = np.diag(K2)[:, None], np.diag(K2)[None, :], K2
    k0_2 = (math.pi - np.arccos(np.clip(c / np.sqrt(a * b), -1, 1))) / (2 * math.pi)
    # d(out)/d(h2) has E[dh2 dh2'] = σ² k0(K2); the hidden weight's term: that × σ² k1(K1)
    expected_term = SW2 * k0_2 * SW2 * k1
    np.testing.assert_allclose(full - part, expected_term, rtol=1e-10, atol=1e-14)


def test_ntk_errors(x):
    def nothing_trains(w):
        m = MLP(w, torch.relu)
        m.requires_grad_(False)
        return m

    with pytest.raises(ValueError, match="no trainable parameters"):
        tp.infinite_width(nothing_trains, x).ntk(x)
