"""The infinite-width NTK vs the mean empirical NTK (torch.func) of the same PyTorch module
in the NTK parametrization, tolerance from the Monte Carlo standard error; and a single
network's NTK approaching the limit like width^(-1/2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import tensorprograms as tp
from tensorprograms.empirical import ntk as empirical_ntk
from tensorprograms.empirical import ntk_mean
from tensorprograms.frontend import read_initialization

from .models import MLP
from .test_infinite_width import CNN, Concatenated, FlatReadout, Residual, Shared
from .test_ntk import LN

Z = 4.5


@pytest.fixture
def x():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(4, 6, generator=gen) * torch.linspace(0.5, 2.0, 4)[:, None]


def check(factory, x, width, samples):
    theta = tp.infinite_width(factory, x).ntk(x)
    emp = ntk_mean(factory, width, x, samples=samples, seed=5, parametrization="ntk")
    z = ((emp.mean - theta).abs() / emp.stderr).max()
    assert z < Z, f"max |MC - limit| / SE = {z:.2f}"


ARCHS = {
    "tanh-mlp": lambda w: MLP(w, torch.tanh),
    "gelu-mlp": lambda w: MLP(w, F.gelu),
    "residual": lambda w: Residual(w, 0.5, False),
    "gated-shared": lambda w: Residual(w, 1.0, True),
    "weight-sharing": Shared,
    "layernorm": LN,
    "concat": Concatenated,
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_ntk_matches_empirical(x, name):
    check(ARCHS[name], x, width=512, samples=16)


@pytest.mark.parametrize("kind", ["cnn1d-stride-avgpool", "cnn2d", "flatten"])
def test_cnn_ntk_matches_empirical(kind):
    gen = torch.Generator().manual_seed(3)
    if kind == "cnn1d-stride-avgpool":
        factory, x = (lambda w: CNN(w, dims=1, stride=2, pool="avg")), torch.randn(3, 2, 6, generator=gen)
    elif kind == "cnn2d":
        factory, x = (lambda w: CNN(w, dims=2)), torch.randn(3, 2, 4, 4, generator=gen)
    else:
        factory, x = FlatReadout, torch.randn(3, 2, 4, generator=gen)
    check(factory, x, width=256, samples=12)


def fit_slope(widths, errs):
    logn = np.log(widths)
    logr = np.array([0.5 * math.log(np.mean(e)) for e in errs])
    se = np.array([0.5 * np.std(e, ddof=1) / (np.mean(e) * math.sqrt(len(e))) for e in errs])
    w = 1 / se**2
    X = np.stack([np.ones_like(logn), logn], 1)
    cov = np.linalg.inv(X.T @ (w[:, None] * X))
    beta = cov @ X.T @ (w * logr)
    return beta[1], math.sqrt(cov[1, 1])


@pytest.mark.slow
def test_single_network_ntk_converges_like_inverse_sqrt_width(x):
    factory = lambda w: MLP(w, torch.tanh)  # noqa: E731
    theta = tp.infinite_width(factory, x).ntk(x)
    widths, errs = [128, 256, 512, 1024, 2048], []
    for n in widths:
        v = {k: p.variances[0] for k, p in read_initialization(factory, (n, 2 * n)).items()}
        e = []
        for s in range(24):
            torch.manual_seed(100 * n + s)
            e.append(((empirical_ntk(factory(n), x, parametrization="ntk", variances=v) - theta) ** 2)
                     .mean().item())
        errs.append(e)
    slope, se = fit_slope(widths, errs)
    print(f"single-network NTK error: log-log slope {slope:.3f} ± {se:.3f} (expected -0.5)")
    assert abs(slope + 0.5) < 3 * se
