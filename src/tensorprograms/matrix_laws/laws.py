"""Spectral laws: the semicircle, Marchenko–Pastur, Fuss–Catalan, and free products.

A :class:`SpectralLaw` is a probability law on the real line given by an absolutely
continuous density plus at most one atom (at 0 for the laws here): ``law.density(x)``
(the continuous part, on any grid), ``law.moment(k)`` (exact: closed form or power
series), ``law.support()`` (the edges of the continuous part), ``law.atom`` (location,
mass) and ``law.cdf(x)`` (for Kolmogorov–Smirnov distances).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from . import free

# Grid sizes for locating support edges: a coarse scan, then a refinement of the
# bracketing cells (relative resolution ≈ 1/(_SCAN·_REFINE)).
_SCAN, _REFINE = 1000, 1000


class SpectralLaw:
    """A law on ℝ: a density plus an optional atom.

    Args:
        name: a readable description.
        density: ``x -> ρ(x)`` for a numpy array (the continuous part, 0 outside).
        moments: ``order -> [m_1, …, m_order]`` (moments of the whole law, atom included).
        support: ``(lo, hi)`` edges of the continuous part, or None to locate them
            numerically from the density (the scan starts from ``bound``).
        atom: ``(location, mass)`` of the law's atom (mass 0 if none).
        bound: ``(lo, hi)`` guaranteed to contain the support (for the numerical scan).
    """

    def __init__(
        self,
        name: str,
        density: Callable[[np.ndarray], np.ndarray],
        moments: Callable[[int], np.ndarray],
        support: tuple[float, float] | None = None,
        atom: tuple[float, float] = (0.0, 0.0),
        bound: tuple[float, float] | None = None,
    ):
        self.name = name
        self._density = density
        self._moments = moments
        self._support = support
        self.atom = atom
        self._bound = bound

    def __repr__(self) -> str:
        lo, hi = self.support()
        extra = f", atom {self.atom[1]:.4g} at {self.atom[0]:g}" if self.atom[1] > 0 else ""
        return f"<SpectralLaw {self.name}: support [{lo:.6g}, {hi:.6g}]{extra}>"

    def moment(self, k: int) -> float:
        """``∫ λ^k dμ`` (k ≥ 0), the atom included."""
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"moment order must be a non-negative integer, got {k!r}")
        return 1.0 if k == 0 else float(self._moments(k)[k - 1])

    def moments(self, order: int) -> np.ndarray:
        """``[m_1, …, m_order]``."""
        return np.asarray(self._moments(order), dtype=float)

    def density(self, x) -> np.ndarray:
        """The density of the continuous part at the points ``x`` (numpy array)."""
        x = np.asarray(x, dtype=float)
        return np.asarray(self._density(x), dtype=float)

    def support(self) -> tuple[float, float]:
        """``(lo, hi)``: the smallest and largest points of the continuous part's support."""
        if self._support is None:
            self._support = _locate_edges(self._density, self._bound)
        return self._support

    def grid(self, num: int = 400) -> np.ndarray:
        """``num`` points spanning the support (endpoints excluded, where densities can be 0
        or singular)."""
        lo, hi = self.support()
        return lo + (hi - lo) * (np.arange(num) + 0.5) / num

    def cdf(self, x, num: int = 1500) -> np.ndarray:
        """``μ((-∞, x])`` at the points ``x``: the atom plus ``1 − atom − ∫_x^{hi} ρ``.

        Integrated from the top edge down (trapezoid rule), so an integrable singularity
        at the lower edge costs accuracy only below the grid. When the continuous part
        reaches 0 (a hard edge, where products of Gaussian matrices and of D²'s with mass
        near 0 have ``ρ ~ C x^(−α)``), the grid is geometric down to ``1e-20·hi`` and the
        mass below it is the power law fitted to the two lowest points."""
        x = np.asarray(x, dtype=float)
        if getattr(self, "_cdf_table", None) is None or self._cdf_table[0] != num:
            self._cdf_table = (num, *self._cdf_grid(num))
        _, t, cont = self._cdf_table
        out = np.interp(x, t, cont, left=0.0, right=1.0 - self.atom[1])
        return out + self.atom[1] * (x >= self.atom[0])

    def _cdf_grid(self, num: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.support()
        if lo > 0 or hi == lo:
            t = lo + (hi - lo) * np.linspace(0.0, 1.0, num) ** 2
            below = 0.0
        else:
            t = np.unique(np.concatenate([np.geomspace(1e-20 * hi, 1e-3 * hi, num // 3),
                                          np.linspace(1e-3 * hi, hi, num)]))
        rho = self.density(t)
        if lo <= 0 < hi:
            alpha = -math.log(max(rho[1], 1e-300) / max(rho[0], 1e-300)) / math.log(t[1] / t[0])
            below = rho[0] * t[0] / (1 - alpha) if alpha < 1 else 0.0
        seg = (rho[1:] + rho[:-1]) / 2 * np.diff(t)
        above = np.concatenate([np.cumsum(seg[::-1])[::-1], [0.0]])  # ∫_{t_i}^{hi} ρ
        cont = np.clip((1.0 - self.atom[1]) - above, 0.0, None)
        if hi > lo:
            t = np.concatenate([[lo], t]) if t[0] > lo else t
            cont = np.concatenate([[max(cont[0] - below, 0.0)], cont]) if len(cont) < len(t) else cont
        return t, cont


def _locate_edges(density, bound) -> tuple[float, float]:
    lo, hi = bound
    x = np.linspace(lo, hi, _SCAN + 1)[1:]
    rho = density(x)
    tol = 1e-7 * rho.max()
    inside = np.nonzero(rho > tol)[0]
    if len(inside) == 0:
        raise ValueError("the law has no continuous part")
    edges = []
    for i, step in ((inside[0], -1), (inside[-1], +1)):
        j = i + step
        if j < 0:
            edges.append(lo)
            continue
        if j >= len(x):
            edges.append(hi)
            continue
        a, b = sorted((x[i], x[j]))
        t = np.linspace(a, b, _REFINE)
        r = density(t)
        ins = np.nonzero(r > tol)[0]
        edges.append(t[ins[0]] if step < 0 else t[ins[-1]])
    return float(edges[0]), float(edges[1])


# ----------------------------------------------------------------------------- classical laws
def catalan(k: int) -> int:
    return math.comb(2 * k, k) // (k + 1)


def narayana_polynomial(k: int, c: float) -> float:
    """``Σ_j N(k, j) c^j`` with the Narayana numbers ``N(k, j) = C(k,j) C(k,j−1)/k``."""
    return sum(math.comb(k, j) * math.comb(k, j - 1) // k * c**j for j in range(1, k + 1))


def fuss_catalan(k: int, s: int) -> int:
    """``C((s+1)k, k)/(sk + 1)``: the k-th moment of the product of s free MP(1) laws."""
    return math.comb((s + 1) * k, k) // (s * k + 1)


def semicircle(variance: float = 1.0) -> SpectralLaw:
    """Wigner's semicircle of variance σ² (the limit of ``(W + Wᵀ)/√2`` with entries of
    variance σ²/n): density ``√(4σ² − x²)/(2πσ²)`` on ``[−2σ, 2σ]``, moments
    ``m_{2k} = Catalan(k) σ^{2k}``, odd moments 0."""
    _positive(variance, "variance")
    r = 2 * math.sqrt(variance)

    def density(x):
        return np.sqrt(np.clip(r * r - x * x, 0.0, None)) / (2 * math.pi * variance)

    def moments(order):
        return np.array([catalan(k // 2) * variance ** (k // 2) if k % 2 == 0 else 0.0
                         for k in range(1, order + 1)])

    return SpectralLaw(f"semicircle(σ²={variance:g})", density, moments, (-r, r))


def marchenko_pastur(ratio: float = 1.0, variance: float = 1.0) -> SpectralLaw:
    """The law of ``WᵀW`` (n×n) for W of shape ``(ratio·n)×n`` with entries N(0, σ²/n).

    Density ``√((λ₊ − x)(x − λ₋))/(2πσ²x)`` on ``[λ₋, λ₊]``, ``λ± = σ²(1 ± √ratio)²``, plus an
    atom ``1 − ratio`` at 0 when ratio < 1 (the rank is ratio·n); moments
    ``m_k = σ^{2k} Σ_j N(k, j) ratio^j`` (Narayana polynomials).
    """
    _positive(ratio, "ratio")
    _positive(variance, "variance")
    lo, hi = variance * (1 - math.sqrt(ratio)) ** 2, variance * (1 + math.sqrt(ratio)) ** 2

    def density(x):
        x = np.asarray(x, dtype=float)
        inside = (x > lo) & (x < hi)
        safe = np.where(inside, x, 1.0)
        return np.where(inside, np.sqrt(np.clip((hi - safe) * (safe - lo), 0, None))
                        / (2 * math.pi * variance * safe), 0.0)

    def moments(order):
        return np.array([variance**k * narayana_polynomial(k, ratio) for k in range(1, order + 1)])

    atom = (0.0, max(0.0, 1.0 - ratio))
    return SpectralLaw(f"marchenko_pastur(ratio={ratio:g}, σ²={variance:g})", density, moments,
                       (lo, hi), atom)


def free_product(factors: list[free.Factor], name: str = "free product") -> SpectralLaw:
    """The law of a product of free positive elements with the given laws (see free.py)."""
    if not factors:
        raise ValueError("free_product needs at least one factor")
    if all(f.is_point_mass for f in factors):
        value = math.prod(f.point() for f in factors)

        def moments_pm(order):
            return np.array([value**k for k in range(1, order + 1)])

        return SpectralLaw(f"{name} (point mass)", lambda x: np.zeros_like(np.asarray(x, float)),
                           moments_pm, (value, value), (value, 1.0))
    bound = free.norm_bound(factors)

    def density(x):
        x = np.asarray(x, dtype=float)
        out = np.zeros_like(x)
        pos = x > 0
        if pos.any():
            out[pos] = free.product_density(factors, x[pos])
        return out

    return SpectralLaw(name, density, lambda order: free.product_moments(factors, order),
                       None, (0.0, free.mass_at_zero(factors)), (0.0, bound * 1.0001))


def fuss_catalan_law(s: int, variance: float = 1.0) -> SpectralLaw:
    """The law of ``MᵀM`` for ``M = W_s ⋯ W_1``, square W's with entries N(0, σ²/n):
    moments ``σ^{2sk} C((s+1)k, k)/(sk + 1)``, support ``[0, σ^{2s}(s+1)^{s+1}/s^s]``."""
    if not isinstance(s, int) or s < 1:
        raise ValueError(f"s (the number of factors) must be a positive integer, got {s!r}")
    _positive(variance, "variance")
    law = free_product([free.Factor("marchenko_pastur", variance)] * s,
                       f"fuss_catalan(s={s}, σ²={variance:g})")
    law._moments = lambda order: np.array(
        [variance ** (s * k) * fuss_catalan(k, s) for k in range(1, order + 1)], dtype=float)
    law._support = (0.0, variance**s * (s + 1) ** (s + 1) / s**s)
    return law


def _positive(value, what: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
