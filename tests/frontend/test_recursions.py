"""NNGP of plain PyTorch models vs the literature's closed-form recursions, to float64
rounding (the same recursions neural-tangents implements)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import tensorprograms as tp

from .models import init_
from .reference import apply_pair, erf_pair, relu_pair

SW2, SB2 = 1.7, 0.05


class Net(nn.Module):
    def __init__(self, width, act, layernorm=False):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(7, width), nn.Linear(width, width), nn.Linear(width, 4)
        self.act, self.ln = act, (nn.LayerNorm(width) if layernorm else None)
        init_(self, SW2, SB2)

    def forward(self, x):
        h = self.l2(self.act(self.l1(x)))
        if self.ln is not None:
            h = self.ln(h)
        return self.l3(self.act(h))


@pytest.fixture
def x():
    gen = torch.Generator().manual_seed(5)
    return torch.randn(6, 7, generator=gen) * torch.linspace(0.4, 2.5, 6)[:, None]


@pytest.mark.parametrize("act,pair", [(torch.relu, relu_pair), (torch.special.erf, erf_pair)],
                         ids=["relu", "erf"])
def test_mlp_recursion(x, act, pair):
    X = x.numpy()
    K = SW2 * X @ X.T / X.shape[1] + SB2
    for _ in range(2):
        K = SW2 * apply_pair(K, pair) + SB2
    limit = tp.infinite_width(lambda w: Net(w, act), x).nngp(x).numpy()
    np.testing.assert_allclose(limit, K, rtol=1e-10, atol=0)


def test_layernorm_mlp_recursion(x):
    """LayerNorm over the width maps K to K_ab / sqrt((K_aa + eps)(K_bb + eps)) (the
    pre-activation has mean zero in the limit)."""
    X = x.numpy()
    K = SW2 * X @ X.T / X.shape[1] + SB2
    K = SW2 * apply_pair(K, relu_pair) + SB2
    d = np.diag(K) + 1e-5
    K = K / np.sqrt(np.outer(d, d))
    K = SW2 * apply_pair(K, relu_pair) + SB2
    limit = tp.infinite_width(lambda w: Net(w, torch.relu, layernorm=True), x).nngp(x).numpy()
    np.testing.assert_allclose(limit, K, rtol=1e-10, atol=0)


class SmallCNN(nn.Module):
    """conv(3, pad 1) → relu → avgpool(2) → conv(3, pad 1) → relu → global average → dense."""

    def __init__(self, width):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(2, width, 3, padding=1), nn.Conv1d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, 3)
        init_(self, SW2, SB2)

    def forward(self, x):
        h = nn.functional.avg_pool1d(torch.relu(self.c1(x)), 2)
        return self.fc(torch.relu(self.c2(h)).mean(-1))


def conv_cov(S: np.ndarray, bias: float = SB2) -> np.ndarray:
    """S[a, p, b, q] (per channel) -> the same after conv(kernel 3, padding 1), NTK param."""
    Lp = S.shape[1]
    out = np.zeros_like(S)
    for p in range(Lp):
        for q in range(Lp):
            tot = 0.0
            for k in range(3):
                pp, qq = p + k - 1, q + k - 1
                if 0 <= pp < Lp and 0 <= qq < Lp:
                    tot = tot + S[:, pp, :, qq]
            out[:, p, :, q] = SW2 / 3 * tot + bias
    return out


def avg_pool_cov(R: np.ndarray) -> np.ndarray:
    N, L = R.shape[0], R.shape[1]
    P = np.zeros((N, L // 2, N, L // 2))
    for p in range(L // 2):
        for q in range(L // 2):
            P[:, p, :, q] = R[:, 2 * p:2 * p + 2, :, 2 * q:2 * q + 2].mean(axis=(1, 3))
    return P


def cnn_input():
    gen = torch.Generator().manual_seed(6)
    return torch.randn(4, 2, 8, generator=gen) * torch.tensor([0.5, 1.0, 1.5, 2.0])[:, None, None]


def test_small_cnn_recursion():
    """The CNN-GP recursion (Novak et al. 2019; Garriga-Alonso et al. 2019) with average and
    global pooling, written over all position pairs."""
    x = cnn_input()
    X = x.numpy()
    N, C, L = X.shape

    S0 = np.einsum("acp,bcq->apbq", X, X) / C  # input second moments, averaged over channels
    K1 = conv_cov(S0)
    flat = K1.reshape(N * L, N * L)
    R = apply_pair(flat, relu_pair).reshape(N, L, N, L)
    P = avg_pool_cov(R)
    K2 = conv_cov(P)
    R2 = apply_pair(K2.reshape(N * (L // 2), -1), relu_pair).reshape(N, L // 2, N, L // 2)
    expected = SW2 * R2.mean(axis=(1, 3)) + SB2
    limit = tp.infinite_width(SmallCNN, x).nngp(x).numpy()
    np.testing.assert_allclose(limit, expected, rtol=1e-10, atol=0)
    assert math.isfinite(limit.sum())


def relu_k0(flat: np.ndarray) -> np.ndarray:
    """E[relu'(u) relu'(v)] = (π - θ)/(2π) for every pair (arc-cosine kernel of order 0)."""
    d = np.sqrt(np.outer(np.diag(flat), np.diag(flat)))
    return (math.pi - np.arccos(np.clip(flat / d, -1, 1))) / (2 * math.pi)


def test_small_cnn_ntk_recursion():
    """The CNN-NTK recursion (Arora et al. 2019) over all position pairs, NTK parametrization:
    relu multiplies Θ by E[relu'relu'], pooling and convolution act on Θ as on K."""
    x = cnn_input()
    X = x.numpy()
    N, C, L = X.shape
    K1 = conv_cov(np.einsum("acp,bcq->apbq", X, X) / C)
    T1 = K1.copy()
    flat = K1.reshape(N * L, -1)
    R = apply_pair(flat, relu_pair).reshape(K1.shape)
    T = (relu_k0(flat) * T1.reshape(N * L, -1)).reshape(K1.shape)
    K2 = conv_cov(avg_pool_cov(R))
    T2 = K2 + conv_cov(avg_pool_cov(T), bias=0.0)
    flat2 = K2.reshape(N * (L // 2), -1)
    R2 = apply_pair(flat2, relu_pair).reshape(K2.shape)
    T2r = (relu_k0(flat2) * T2.reshape(N * (L // 2), -1)).reshape(K2.shape)
    K3 = SW2 * R2.mean(axis=(1, 3)) + SB2
    expected = K3 + SW2 * T2r.mean(axis=(1, 3))
    theta = tp.infinite_width(SmallCNN, x).ntk(x).numpy()
    np.testing.assert_allclose(theta, expected, rtol=1e-10, atol=0)
