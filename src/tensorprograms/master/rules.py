"""Integration rules for E[f(z)], z ~ N(0, I_k): Gauss–Hermite grids and Monte Carlo."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import torch

# Orders per dimension, from benchmarks/quadrature_accuracy.py (see docs/engine.md): smooth
# functions reach float64 rounding well below these; ReLU-like kinks converge like order^-1.5.
DEFAULT_ORDERS = {1: 200, 2: 80, 3: 28}


@functools.lru_cache(maxsize=32)
def gauss_hermite(order: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor-product Gauss–Hermite rule for the standard normal: nodes ``[Q, dim]``, weights ``[Q]``."""
    x, w = np.polynomial.hermite_e.hermegauss(order)
    w = w / w.sum()
    nodes = np.array(list(itertools.product(x, repeat=dim)), dtype=np.float64).reshape(-1, dim)
    weights = np.prod(np.array(list(itertools.product(w, repeat=dim))), axis=1)
    return torch.from_numpy(nodes), torch.from_numpy(weights)


def monte_carlo(samples: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` standard normal draws ``[S, dim]`` with equal weights."""
    gen = torch.Generator().manual_seed(seed)
    nodes = torch.randn(samples, dim, generator=gen, dtype=torch.float64)
    return nodes, torch.full((samples,), 1.0 / samples, dtype=torch.float64)


def psd_cholesky(cov: torch.Tensor) -> torch.Tensor:
    """Lower-triangular L with L Lᵀ = cov for batched PSD ``[..., k, k]``, singular allowed.

    Unlike ``torch.linalg.cholesky`` it accepts rank-deficient matrices (a vector paired
    with itself), and unlike an eigendecomposition it keeps the first variable on the
    first node axis, which keeps a ReLU's kink on the grid lines.
    """
    k = cov.shape[-1]
    L = torch.zeros_like(cov)
    scale = cov.diagonal(dim1=-2, dim2=-1).abs().amax(-1, keepdim=True).clamp_min(1e-300)
    for j in range(k):
        d = cov[..., j, j] - (L[..., j, :j] ** 2).sum(-1)
        ok = d > 1e-13 * scale[..., 0]
        root = torch.where(ok, d.clamp_min(0).sqrt(), 0.0)
        L[..., j, j] = root
        for i in range(j + 1, k):
            num = cov[..., i, j] - (L[..., i, :j] * L[..., j, :j]).sum(-1)
            L[..., i, j] = torch.where(ok, num / torch.where(ok, root, 1.0), 0.0)
    return L


def psd_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """A square root A with A Aᵀ = cov for a large PSD matrix (eigendecomposition)."""
    lam, vec = torch.linalg.eigh(cov)
    return vec * lam.clamp_min(0).sqrt()
