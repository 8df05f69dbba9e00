"""Free multiplicative convolution: the law of a product of asymptotically free positive
matrices, from each factor's law (Voiculescu's S-transform).

Conventions. For a law μ on [0, ∞): moments ``m_k = ∫ λ^k dμ``; the moment generating
function ``ψ(z) = Σ_{k≥1} m_k z^k = ∫ zλ/(1 − zλ) dμ``; its compositional inverse ``χ``;
the S-transform ``S(z) = χ(z)(1 + z)/z``. If ``A_1, …, A_m`` are free,
``S_{A_1⋯A_m} = Π S_{A_i}`` (the law of ``A_1^{1/2} A_2 A_1^{1/2}`` and so on). The Stieltjes
transform is ``G(ζ) = ∫ dμ(λ)/(ζ − λ) = (1 + ψ(1/ζ))/ζ`` and the density
``ρ(x) = −Im G(x + i0)/π``.

Factors are described by :class:`Factor`: a discrete law (atoms and weights, e.g. the
quadrature nodes of ``φ'(h)²`` with ``h ~ N(0, q)``), Marchenko–Pastur (``WᵀW`` for an
n×n Gaussian W with entries of variance σ²/n: ``S(z) = 1/(σ²(1 + z))``), or a constant
(``σ²·I``, e.g. ``WᵀW`` for ``W = σ·O`` with O Haar-orthogonal: ``S = 1/σ²``).

Two routes: moments by power series (exact up to float64 rounding, any order), and the
density by solving ``χ(ψ) = 1/ζ`` with Newton's method in the unknowns ``(ψ, w_1, …)``
where ``ψ_{D_l}(w_l) = ψ`` for each discrete factor, continued along the grid from outside
the support at a small imaginary part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Factor:
    """One free factor of a product. ``kind`` is ``"discrete"`` (``atoms``, ``weights``),
    ``"marchenko_pastur"`` (``scale`` = σ², square aspect) or ``"constant"`` (``scale``)."""

    kind: str
    scale: float = 1.0
    atoms: np.ndarray | None = None
    weights: np.ndarray | None = None

    def moments(self, order: int) -> np.ndarray:
        """``[m_1, …, m_order]``."""
        k = np.arange(1, order + 1)
        if self.kind == "constant":
            return self.scale ** k.astype(float)
        if self.kind == "marchenko_pastur":
            return np.array([self.scale**j * math.comb(2 * j, j) / (j + 1) for j in k], dtype=float)
        return np.array([float(np.sum(self.weights * self.atoms**j)) for j in k])

    @property
    def is_point_mass(self) -> bool:
        if self.kind == "constant":
            return True
        if self.kind == "discrete":
            a = self.atoms[self.weights > 0]
            return bool(np.all(np.abs(a - a[0]) <= 1e-14 * max(1.0, abs(a[0]))))
        return False

    def point(self) -> float:
        return self.scale if self.kind == "constant" else float(self.atoms[self.weights > 0][0])


def discrete(atoms, weights) -> Factor:
    """A discrete law ``Σ_i weights_i δ_{atoms_i}`` on [0, ∞) (weights sum to 1)."""
    atoms, weights = np.asarray(atoms, dtype=float), np.asarray(weights, dtype=float)
    if atoms.shape != weights.shape or atoms.ndim != 1:
        raise ValueError("atoms and weights must be 1-d arrays of the same length")
    if (atoms < 0).any() or (weights < 0).any():
        raise ValueError("a positive matrix's law needs atoms >= 0 and weights >= 0")
    if not math.isclose(weights.sum(), 1.0, rel_tol=1e-9):
        raise ValueError(f"weights must sum to 1, got {weights.sum()}")
    return Factor("discrete", atoms=atoms, weights=weights)


# ----------------------------------------------------------------------------- power series
def _mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.convolve(a, b)[: len(a)]


def _inverse(a: np.ndarray) -> np.ndarray:
    """1/a as a power series (a[0] != 0)."""
    out = np.zeros_like(a)
    out[0] = 1.0 / a[0]
    for n in range(1, len(a)):
        out[n] = -np.dot(a[1 : n + 1], out[n - 1 :: -1][:n]) / a[0]
    return out


def _reversion(f: np.ndarray) -> np.ndarray:
    """Compositional inverse g of f (f[0] = 0, f[1] != 0): f(g(z)) = z, as series in z."""
    n = len(f)
    g = np.zeros(n)
    g[1] = 1.0 / f[1]
    for k in range(2, n):
        # coefficient k of f(g) with g[k] unknown: f[1] g[k] + (terms without g[k]) = 0
        comp, power = np.zeros(n), np.zeros(n)
        power[0] = 1.0
        for j in range(1, k + 1):
            power = _mul(power, g)
            comp += f[j] * power
        g[k] = -comp[k] / f[1]
    return g


def s_transform_series(moments: np.ndarray) -> np.ndarray:
    """Series of S(z) to order ``len(moments) - 1`` from ``[m_1, …, m_K]`` (m_1 > 0)."""
    psi = np.concatenate([[0.0], moments])
    chi = _reversion(psi)  # chi[0] = 0
    # S = χ(z)(1+z)/z
    chi_over_z = chi[1:]
    onepz = np.zeros(len(chi_over_z))
    onepz[0] = 1.0
    if len(onepz) > 1:
        onepz[1] = 1.0
    return _mul(chi_over_z, onepz)


def product_moments(factors: list[Factor], order: int) -> np.ndarray:
    """Moments ``[m_1, …, m_order]`` of the free product of the factors' laws."""
    if not factors:
        raise ValueError("a product needs at least one factor")
    s = None
    for f in factors:
        m = f.moments(order)
        if m[0] <= 0:
            raise ValueError("a factor with zero mean (the zero matrix) has no S-transform")
        sf = s_transform_series(m)
        s = sf if s is None else _mul(s, sf)
    # χ = S z/(1+z); ψ = χ^{-1}
    one_over = np.array([(-1.0) ** j for j in range(order)])
    chi = np.concatenate([[0.0], _mul(s, one_over)])
    psi = _reversion(chi)
    return psi[1:]


# ----------------------------------------------------------------------------- density
def _psi_discrete(f: Factor, w):
    lam = f.atoms[None, :]
    denom = 1.0 - w[:, None] * lam
    psi = np.sum(f.weights * w[:, None] * lam / denom, axis=1)
    dpsi = np.sum(f.weights * lam / denom**2, axis=1)
    return psi, dpsi


def _residuals(factors, u, zeta_inv):
    """F(u) and its Jacobian (analytic), u = [ψ, w_1, …, w_d] per grid point: shape [P, 1+d]."""
    psi = u[:, 0]
    disc = [f for f in factors if f.kind == "discrete"]
    P, d = u.shape[0], len(disc)
    F = np.zeros((P, 1 + d), dtype=complex)
    J = np.zeros((P, 1 + d, 1 + d), dtype=complex)
    # χ(ψ) = ψ/(1+ψ) Π_disc w_l (1+ψ)/ψ Π_mp 1/(σ²(1+ψ)) Π_const 1/σ²
    n_mp = sum(f.kind == "marchenko_pastur" for f in factors)
    const = 1.0
    for f in factors:
        if f.kind != "discrete":
            const /= f.scale
    w = u[:, 1:]
    chi = const * psi ** (1 - d) * (1 + psi) ** (d - 1 - n_mp) * np.prod(w, axis=1)
    F[:, 0] = chi - zeta_inv
    J[:, 0, 0] = chi * ((1 - d) / psi + (d - 1 - n_mp) / (1 + psi))
    for j in range(d):
        J[:, 0, 1 + j] = chi / w[:, j]
        pj, dpj = _psi_discrete(disc[j], w[:, j])
        F[:, 1 + j] = pj - psi
        J[:, 1 + j, 0] = -1.0
        J[:, 1 + j, 1 + j] = dpj
    return F, J


def _newton(factors, u, zeta_inv, steps=50):
    """Damped Newton per point; points stop once their step is below 1e-15 relative."""
    u = u.copy()
    active = np.arange(len(u))
    for _ in range(steps):
        F, J = _residuals(factors, u[active], zeta_inv[active])
        try:
            du = np.linalg.solve(J, F[..., None])[..., 0]
        except np.linalg.LinAlgError:  # a point where the system degenerates (x → 0 at an atom)
            du = (np.linalg.pinv(J) @ F[..., None])[..., 0]
        du = np.nan_to_num(du)
        size = np.abs(u[active]).max(axis=1) + 1e-300
        # damp steps that would jump far (keeps the branch)
        scale = np.maximum(1.0, np.abs(du).max(axis=1) / (0.5 * size))
        u[active] = u[active] - du / scale[:, None]
        done = np.abs(du).max(axis=1) <= 1e-15 * size
        active = active[~done]
        if len(active) == 0:
            break
    return u


def _initial(factors, zeta_inv: complex):
    """A start from the first term of the moment series, valid where |ζ| is large
    (ψ ≈ m_1/ζ and w_l ≈ ψ/m_1(D_l))."""
    disc = [f for f in factors if f.kind == "discrete"]
    psi = zeta_inv * product_moments(factors, 1)[0]
    u = [psi] + [psi / f.moments(1)[0] for f in disc]
    return np.array(u, dtype=complex)[None, :]


def product_stieltjes(factors: list[Factor], x: np.ndarray, eta) -> np.ndarray:
    """``G(x + iη)`` of the free product at real points x.

    Continuation in the imaginary part, all points at once: at ``η₀`` far above the
    support every unknown is small and the moment series is a good start; η is then
    halved level by level down to ``eta``, each level's Newton solve starting from the
    previous level's solution. Off the real axis G is analytic, so small steps in η keep
    the physical branch (``Im G < 0``)."""
    x = np.asarray(x, dtype=float)
    scale = max(norm_bound(factors), float(np.abs(x).max()), 1e-300)
    eta0 = 4.0 * scale
    zeta = x + 1j * eta0
    u = np.repeat(_initial(factors, 1.0), len(x), axis=0)
    u = u * (1.0 / zeta)[:, None]
    eta = np.broadcast_to(np.asarray(eta, dtype=float), x.shape)
    levels = max(1, int(math.ceil(math.log2(eta0 / float(eta.min())))))
    e_prev = np.full(x.shape, np.inf)
    for level in range(levels + 1):
        e = np.maximum(eta0 * 2.0**-level, eta)
        moving = e < e_prev  # points already at their own η are done
        if level > 0 and not moving.any():
            break
        idx = np.nonzero(moving)[0] if level > 0 else np.arange(len(x))
        u[idx] = _newton(factors, u[idx], 1.0 / (x[idx] + 1j * e[idx]))
        e_prev = e
    zeta = x + 1j * e_prev
    return (1 + u[:, 0]) / zeta


def product_density(factors: list[Factor], x: np.ndarray, eta: float | None = None) -> np.ndarray:
    """Density of the free product's law at the points ``x`` (its absolutely continuous
    part): ``−Im G(x + iη)/π`` with η = 1e-10 × the support's bound, and at most 1e-6·x
    (so the density of laws singular at 0 is resolved down to tiny x)."""
    x = np.asarray(x, dtype=float)
    if eta is None:
        eta = np.minimum(1e-10 * norm_bound(factors), 1e-6 * np.abs(x) + 1e-300)
    G = product_stieltjes(factors, x, eta)
    return np.clip(-G.imag / math.pi, 0.0, None)


def norm_bound(factors: list[Factor]) -> float:
    """``Π ‖A_i‖``, an upper bound on the product's support."""
    out = 1.0
    for f in factors:
        if f.kind == "constant":
            out *= f.scale
        elif f.kind == "marchenko_pastur":
            out *= 4.0 * f.scale
        else:
            out *= float(f.atoms[f.weights > 0].max())
    return out


def mass_at_zero(factors: list[Factor]) -> float:
    """The atom at 0 of a free product of positive elements: the largest of the factors'
    (the kernel of a product of free elements is as large as the largest kernel).

    Masses below ``_NEGLIGIBLE`` are dropped: Gauss–Hermite nodes far in the tails can
    round φ'(h)² to exactly 0 (tanh' at |h| > 20) with weights ~1e-80; that is no atom."""
    out = 0.0
    for f in factors:
        if f.kind == "discrete":
            out = max(out, float(f.weights[f.atoms == 0].sum()))
    return out if out > _NEGLIGIBLE else 0.0


_NEGLIGIBLE = 1e-12
