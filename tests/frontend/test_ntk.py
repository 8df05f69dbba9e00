"""The infinite-width NTK (NTK parametrization) of plain PyTorch models: TP II's backward
program, checked against the literature's layer recursion to float64 rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import tensorprograms as tp

from .models import MLP, SB2, SW2


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


def ntk_recursion(X: np.ndarray, pair, depth: int, bias: bool) -> np.ndarray:
    """Jacot et al. 2018 / Arora et al. 2019: Θ^{l+1} = K^{l+1} + σ_w² E[φ'φ'] Θ^l."""
    sb = SB2 if bias else 0.0
    K = SW2 * X @ X.T / X.shape[1] + sb
    theta = K.copy()
    for _ in range(depth):
        k1 = np.empty_like(K)
        k0 = np.empty_like(K)
        for i in range(len(K)):
            for j in range(len(K)):
                k1[i, j], k0[i, j] = pair(K[i, i], K[j, j], K[i, j])
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


def test_ntk_errors(x):
    class LN(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.a, self.ln, self.b = nn.Linear(6, width), nn.LayerNorm(width), nn.Linear(width, 3)

        def forward(self, x):
            return self.b(self.ln(self.a(x)))

    with pytest.raises(tp.UnsupportedOperation, match="LayerNorm"):
        tp.infinite_width(LN, x).ntk(x)
    with pytest.raises(ValueError, match="parametrization='ntk'"):
        tp.infinite_width(lambda w: MLP(w, torch.relu), x, parametrization="standard").ntk(x)
