"""Integration rules for E[f(z)], z ~ N(0, I_k): Gauss–Hermite grids and Monte Carlo."""

from __future__ import annotations

import functools
import itertools
import math

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
    if dim == 0:  # the integral of a constant: one node
        return torch.zeros(1, 0, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    x, w = np.polynomial.hermite_e.hermegauss(order)
    w = w / w.sum()
    nodes = np.array(list(itertools.product(x, repeat=dim)), dtype=np.float64).reshape(-1, dim)
    weights = np.prod(np.array(list(itertools.product(w, repeat=dim))), axis=1)
    return torch.from_numpy(nodes), torch.from_numpy(weights)


def exact_polynomial_rule(degree: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``[Q, dim]`` and weights ``[Q]`` integrating every polynomial of total degree
    ≤ ``degree`` exactly against N(0, I_dim): the origin for degree ≤ 1, the 2·dim points
    ±√dim·e_i (weights 1/(2 dim), Stroud's degree-3 rule) for degree ≤ 3, a tensor
    Gauss–Hermite grid of ⌊degree/2⌋ + 1 nodes per dimension above."""
    if dim == 0 or degree <= 1:
        return torch.zeros(1, dim, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    if degree <= 3:
        eye = torch.eye(dim, dtype=torch.float64) * math.sqrt(dim)
        return torch.cat([eye, -eye]), torch.full((2 * dim,), 0.5 / dim, dtype=torch.float64)
    return gauss_hermite(degree // 2 + 1, dim)


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
    for j in range(k):
        d = cov[..., j, j] - sum((L[j][m] ** 2 for m in range(j)), zero)
        # dependent on the earlier coordinates up to rounding of its *own* variance (not the
        # largest one: the leaves of a repeated Jacobian span many orders of magnitude)
        ok = d > 1e-13 * cov[..., j, j].abs()
        root = torch.where(ok, torch.where(ok, d, 1.0).sqrt(), 0.0)  # finite gradient when d = 0
        L[j][j] = root
        for i in range(j + 1, k):
            num = cov[..., i, j] - sum((L[i][m] * L[j][m] for m in range(j)), zero)
            L[i][j] = torch.where(ok, num / torch.where(ok, root, 1.0), 0.0)
    return torch.stack([torch.stack(row, -1) for row in L], -2)


def psd_sqrt(cov: torch.Tensor, rtol: float = 0.0) -> torch.Tensor:
    """A square root A with A Aᵀ = cov for a large PSD matrix (eigendecomposition); eigenvalues
    at most ``rtol`` times the largest are taken as 0 (exact zero columns)."""
    lam, vec = torch.linalg.eigh(cov)
    lam = torch.where(lam > rtol * lam.amax(-1, keepdim=True), lam, 0.0)
    return vec * lam.sqrt().unsqueeze(-2)


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


def polar_nodes(L: torch.Tensor, order: int):
    """The polar rule's nodes in (u, v) ~ N(0, I): radius ``[R]`` with weights ``[R]``, and
    angles ``[..., T]`` with weights ``[..., T]``, the angular sectors cut where some row of
    ``L`` (``[..., k, 2]``) vanishes: ``L_i · (cos θ, sin θ) = 0``.

    The angle is split at those 2k rays (each through the origin), Gauss–Legendre on each
    sector (``max(8, order // 2)`` nodes) and on the radius (``order`` nodes), so a kink of
    relu/abs/step in any coordinate z_i = L_i · (u, v) lies on a sector edge."""
    xr, wr = _legendre(order)
    r = (xr + 1) / 2 * RADIUS
    wr = wr * RADIUS / 2 * r * torch.exp(-r * r / 2) / (2 * np.pi)
    xt, wt = _legendre(max(8, order // 2))
    ray = torch.atan2(-L[..., 0], L[..., 1]) % np.pi  # [..., k]: z_i = 0 along ray and ray + π
    cuts = torch.sort(torch.cat([ray, ray + np.pi], -1), -1).values
    ends = torch.cat([cuts[..., 1:], cuts[..., :1] + 2 * np.pi], -1)  # [..., 2k]
    width = ends - cuts
    theta = (cuts[..., :, None] + (xt + 1) / 2 * width[..., :, None]).flatten(-2)
    wtheta = (wt * width[..., :, None] / 2).flatten(-2)  # [..., 2k·mt]
    return r, wr, theta, wtheta


def polar_points(L: torch.Tensor, order: int):
    """2-D rule for z = L·(u, v), (u, v) ~ N(0, I), in polar coordinates (:func:`polar_nodes`).

    ``L``: ``[..., k, 2]``, one row per coordinate z_i (k ≥ 1; for k = 2 usually lower
    triangular; k > 2 after :func:`drop_null_columns`, coordinates that are combinations of
    two independent ones). Every row's kink is a cut, so relu/abs/step integrands are
    smooth on every cell.

    Returns ``[z_1, …, z_k]`` (each ``[..., order, 2k·max(8, order//2)]``: radius × angle)
    and a function summing a tensor of that shape against the weights (the weights are an
    outer product, so they are never materialized at full size).
    """
    r, wr, theta, wtheta = polar_nodes(L, order)
    cos, sin = torch.cos(theta), torch.sin(theta)
    zs = []
    for i in range(L.shape[-2]):
        a = L[..., i, 0, None] * cos + L[..., i, 1, None] * sin
        zs.append(r[:, None] * a[..., None, :])

    def reduce(values: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...ij,i,...j->...", values, wr, wtheta)

    reduce.weights = lambda: wr[:, None] * wtheta[..., None, :]  # type: ignore[attr-defined]
    return zs, reduce


def drop_null_columns(L: torch.Tensor) -> torch.Tensor:
    """``L`` (``[..., k, m]``, z = L·ξ) without the columns that are zero for every batch
    entry: ``[..., k, r]``, the same law of z from r ≤ m independent normals.

    A PSD Cholesky (:func:`psd_cholesky`) leaves a zero column for each coordinate that is
    a linear combination of earlier ones (a vector met twice, ``c·y`` next to ``y``): the
    integral is really r-dimensional, and the rule must be chosen for r, not m (a
    3-argument integrand of rank 2 gets the exact polar rule instead of a Gauss–Hermite
    grid blind to kinks).
    """
    if L.shape[-1] == 0:
        return L
    keep = (L.detach().reshape(-1, *L.shape[-2:]) != 0).any(0).any(0)  # [m]
    if bool(keep.all()):
        return L
    return L[..., keep.nonzero().reshape(-1)]


def standard_nodes(L: torch.Tensor, rule: str, order: int = 0, samples: int = 0, seed: int = 0):
    """The rule of :func:`points` for one ``[d, k]`` root as nodes ξ ``[Q, k]`` of N(0, I_k)
    and weights ``[Q]`` (the polar rule's cuts come from L's rows)."""
    k = L.shape[-1]
    if rule == "monte_carlo":
        return monte_carlo(samples, k, seed)
    if k == 1:
        return split_line(order)
    if k == 2:
        r, wr, theta, wtheta = polar_nodes(L, order)
        xi = torch.stack([r[:, None] * torch.cos(theta), r[:, None] * torch.sin(theta)], -1)
        return xi.reshape(-1, 2), (wr[:, None] * wtheta).reshape(-1)
    return gauss_hermite(order, k)


def points(L: torch.Tensor, rule: str, order: int = 0, samples: int = 0, seed: int = 0):
    """Integration points z = L·ξ for ξ ~ N(0, I_k) and their weights.

    ``L``: ``[..., d, k]`` (d coordinates from k independent normals; square as a rule,
    fewer columns after :func:`drop_null_columns`). Returns the d coordinates
    ``[z_1, …, z_d]`` (each ``[..., *Q]``, Q one or two trailing node dims) and ``reduce``,
    which sums a ``[..., *Q]`` tensor against the weights. Rules, by k: ``"quadrature"``
    (split 1-D, polar 2-D, Gauss–Hermite grid otherwise, one node for k = 0) and
    ``"monte_carlo"``.
    """
    if rule != "monte_carlo" and L.shape[-1] == 2:
        return polar_points(L, order)  # its angles depend on L (batched), unlike the other rules
    nodes, weights = standard_nodes(L, rule, order, samples, seed)
    z = torch.einsum("...ij,qj->...iq", L, nodes)
    return [z[..., i, :] for i in range(L.shape[-2])], lambda values: values @ weights


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
