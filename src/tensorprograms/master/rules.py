"""Integration rules for E[f(z)], z ~ N(0, I_k): Gauss–Hermite grids and Monte Carlo."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import torch

# Orders per dimension, from benchmarks/quadrature_accuracy.py (see docs/engine.md). In 1-D and
# 2-D the rules are split at the kinks of ReLU-like functions (z_i = 0), so these reach float64
# rounding for relu/abs/step as for smooth functions; 3-D is a plain Gauss–Hermite grid.
DEFAULT_ORDERS = {1: 64, 2: 64, 3: 28}
RADIUS = 13.0  # truncation of the standard normal in the split rules: e^{-13²/2} ≈ 1e-37


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
    # built entry by entry without in-place writes, so autograd can differentiate it
    zero = torch.zeros_like(cov[..., 0, 0])
    L = [[zero] * k for _ in range(k)]
    scale = cov.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1e-300)
    for j in range(k):
        d = cov[..., j, j] - sum((L[j][m] ** 2 for m in range(j)), zero)
        ok = d > 1e-13 * scale
        root = torch.where(ok, torch.where(ok, d, 1.0).sqrt(), 0.0)  # finite gradient when d = 0
        L[j][j] = root
        for i in range(j + 1, k):
            num = cov[..., i, j] - sum((L[i][m] * L[j][m] for m in range(j)), zero)
            L[i][j] = torch.where(ok, num / torch.where(ok, root, 1.0), 0.0)
    return torch.stack([torch.stack(row, -1) for row in L], -2)


def psd_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """A square root A with A Aᵀ = cov for a large PSD matrix (eigendecomposition)."""
    lam, vec = torch.linalg.eigh(cov)
    return vec * lam.clamp_min(0).sqrt().unsqueeze(-2)


@functools.lru_cache(maxsize=32)
def _legendre(order: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = np.polynomial.legendre.leggauss(order)
    return torch.from_numpy(x), torch.from_numpy(w)


@functools.lru_cache(maxsize=32)
def split_line(order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D rule for N(0, 1) split at 0: Gauss–Legendre on [-R, 0] and [0, R], ``order`` nodes each.

    Exact to rounding for functions smooth on each half-line (relu, abs, step, …),
    where Gauss–Hermite converges only algebraically.
    """
    x, w = _legendre(order)
    half = (x + 1) / 2 * RADIUS
    wh = w * RADIUS / 2 * torch.exp(-half**2 / 2) / np.sqrt(2 * np.pi)
    nodes = torch.cat([-half.flip(0), half])[:, None]
    return nodes, torch.cat([wh.flip(0), wh])


def polar_points(L: torch.Tensor, order: int):
    """2-D rule for z = L·(u, v), (u, v) ~ N(0, I), in polar coordinates.

    The angle is split at the four rays where z_1 = 0 or z_2 = 0 (both pass through the
    origin), Gauss–Legendre on each sector (``order // 2`` nodes) and on the radius
    (``order`` nodes). Kinks of relu/abs/step on either coordinate fall on sector edges,
    so these integrands are smooth on every cell. ``L``: ``[..., 2, 2]`` lower triangular.

    Returns ``[z_1, z_2]`` (each ``[..., order, 4·order//2]``: radius × angle) and a
    function summing a tensor of that shape against the weights (the weights are an outer
    product, so they are never materialized at full size).
    """
    xr, wr = _legendre(order)
    r = (xr + 1) / 2 * RADIUS
    wr = wr * RADIUS / 2 * r * torch.exp(-r * r / 2) / (2 * np.pi)
    xt, wt = _legendre(max(8, order // 2))
    two_pi = 2 * np.pi
    ray = torch.atan2(-L[..., 1, 0], L[..., 1, 1]) % np.pi  # z_2 = 0 along ray and ray + π
    fixed = torch.tensor([np.pi / 2, 3 * np.pi / 2], dtype=L.dtype).expand(*L.shape[:-2], 2)
    cuts = torch.sort(torch.cat([fixed, ray[..., None], ray[..., None] + np.pi], -1), -1).values
    ends = torch.cat([cuts[..., 1:], cuts[..., :1] + two_pi], -1)  # [..., 4]
    width = ends - cuts
    theta = (cuts[..., :, None] + (xt + 1) / 2 * width[..., :, None]).flatten(-2)
    wtheta = (wt * width[..., :, None] / 2).flatten(-2)  # [..., 4·mt]
    cos, sin = torch.cos(theta), torch.sin(theta)
    a1 = L[..., 0, 0, None] * cos
    a2 = L[..., 1, 0, None] * cos + L[..., 1, 1, None] * sin
    z1 = r[:, None] * a1[..., None, :]
    z2 = r[:, None] * a2[..., None, :]

    def reduce(values: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...ij,i,...j->...", values, wr, wtheta)

    reduce.weights = lambda: wr[:, None] * wtheta[..., None, :]  # type: ignore[attr-defined]
    return [z1, z2], reduce


def points(L: torch.Tensor, rule: str, order: int = 0, samples: int = 0, seed: int = 0):
    """Integration points z = L·ξ for ξ ~ N(0, I_k) and their weights.

    ``L``: ``[..., k, k]``. Returns the k coordinates ``[z_1, …, z_k]`` (each ``[..., *Q]``,
    Q one or two trailing node dims) and ``reduce``, which sums a ``[..., *Q]`` tensor
    against the weights. Rules: ``"quadrature"`` (split 1-D, polar 2-D, Gauss–Hermite grid
    otherwise) and ``"monte_carlo"``.
    """
    k = L.shape[-1]
    if rule == "monte_carlo":
        nodes, weights = monte_carlo(samples, k, seed)
    elif k == 1:
        nodes, weights = split_line(order)
    elif k == 2:
        return polar_points(L, order)
    else:
        nodes, weights = gauss_hermite(order, k)
    z = torch.einsum("...ij,qj->...iq", L, nodes)
    return [z[..., i, :] for i in range(k)], lambda values: values @ weights


def flat_points(root: torch.Tensor, rule: str, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`points` for one ``[D, D]`` factor: points ``[Q, D]`` and weights ``[Q]``."""
    zs, reduce = points(root, rule, **settings)
    z = torch.stack([t.reshape(-1) for t in zs], -1)
    if hasattr(reduce, "weights"):
        return z, reduce.weights().reshape(-1)
    q = z.shape[0]
    if rule == "monte_carlo":
        return z, torch.full((q,), 1.0 / q, dtype=z.dtype)
    order = settings["order"]
    return z, (split_line(order)[1] if root.shape[-1] == 1 else gauss_hermite(order, root.shape[-1])[1])
