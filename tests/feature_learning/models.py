"""Small MLPs and data for the μP-limit tests."""

from __future__ import annotations

import torch
from torch import nn


def deep_linear(n: int) -> nn.Module:
    m = nn.Sequential(nn.Linear(3, n, bias=False), nn.Linear(n, n, bias=False), nn.Linear(n, n, bias=False),
                      nn.Linear(n, 2, bias=False))
    for p in m.parameters():
        nn.init.normal_(p, std=p.shape[1] ** -0.5)
    return m


def linear1(n: int) -> nn.Module:
    m = nn.Sequential(nn.Linear(3, n, bias=False), nn.Linear(n, 2, bias=False))
    for p in m.parameters():
        nn.init.normal_(p, std=p.shape[1] ** -0.5)
    return m


def tanh2(n: int) -> nn.Module:
    """2 hidden layers, tanh, PyTorch's default (uniform) init, biases everywhere."""
    return nn.Sequential(nn.Linear(3, n), nn.Tanh(), nn.Linear(n, n), nn.Tanh(), nn.Linear(n, 2))


def tanh1(n: int) -> nn.Module:
    """1 hidden layer, tanh, PyTorch's default (uniform) init, biases (Adam's limit)."""
    return nn.Sequential(nn.Linear(3, n), nn.Tanh(), nn.Linear(n, 2))


def relu3(n: int) -> nn.Module:
    """3 hidden layers, ReLU, Gaussian init, no biases."""
    m = nn.Sequential(nn.Linear(3, n, bias=False), nn.ReLU(), nn.Linear(n, n, bias=False), nn.ReLU(),
                      nn.Linear(n, n, bias=False), nn.ReLU(), nn.Linear(n, 2, bias=False))
    for p in m.parameters():
        nn.init.normal_(p, std=(2.0 / p.shape[1]) ** 0.5)
    return m


def data(seed: int = 0, steps: int = 50, batch: int = 2):
    """8 training points in R^3 with 2 targets, cycled in batches; 5 held-out inputs."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(8, 3, generator=g, dtype=torch.float64)
    Y = torch.randn(8, 2, generator=g, dtype=torch.float64)
    Xt = torch.randn(5, 3, generator=g, dtype=torch.float64)
    batches = [(X[(batch * t) % 8:(batch * t) % 8 + batch], Y[(batch * t) % 8:(batch * t) % 8 + batch])
               for t in range(steps)]
    return X, batches, Xt
