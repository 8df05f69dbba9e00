"""Closed-form Gaussian expectations for the functions that have them.

A recognised function is written as ``Σ_i c_i · base_i(z) + const`` over the bases
``id, relu, step, erf, gauss, sin, cos, exp`` (``gauss(x) = exp(-x²)``, so erf' is one; leaky
ReLU, abs and affine maps come for free). For jointly Gaussian ``(u, v)`` with variances
``s1², s2²`` and covariance ``c``, ``E[f(u) g(v)]`` expands bilinearly into base pairs, each a formula below
(arc-cosine kernels of Cho & Saul for relu/step, Williams' arcsine for erf,
characteristic functions for sin/cos/exp, Gaussian integrals for gauss, Stein's lemma for
id × anything).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..program import functions as F

SQRT_2PI = math.sqrt(2 * math.pi)
Terms = tuple[tuple[tuple[float, str], ...], float]  # ((coef, base), ...), const

_aten = torch.ops.aten
# torch functions and the core ATen ops the frontend captures stand for the same bases
_BASE_OF: dict[object, str] = {
    torch.relu: "relu",
    torch.nn.functional.relu: "relu",
    _aten.relu.default: "relu",
    torch.erf: "erf",
    torch.special.erf: "erf",
    _aten.erf.default: "erf",
    torch.sin: "sin",
    _aten.sin.default: "sin",
    torch.cos: "cos",
    _aten.cos.default: "cos",
    torch.exp: "exp",
    _aten.exp.default: "exp",
}


def terms_of(fn: Callable | None) -> Terms | None:
    """The basis expansion of ``fn``, or None if no closed form is known (None = identity)."""
    if fn is None or fn is F.identity:
        return (((1.0, "id"),), 0.0)
    if fn is F.relu:
        return (((1.0, "relu"),), 0.0)
    if fn is F.step:
        return (((1.0, "step"),), 0.0)
    if fn is F.erf:
        return (((1.0, "erf"),), 0.0)
    if fn is F.sin:
        return (((1.0, "sin"),), 0.0)
    if fn is F.cos:
        return (((1.0, "cos"),), 0.0)
    if fn is F.exp:
        return (((1.0, "exp"),), 0.0)
    if fn is F.abs or fn is torch.abs or fn is _aten.abs.default:
        return (((2.0, "relu"), (-1.0, "id")), 0.0)
    if isinstance(fn, F.LeakyReLU):
        return (((fn.slope, "id"), (1.0 - fn.slope, "relu")), 0.0)
    if isinstance(fn, F.Affine):
        return (((fn.scale, "id"),), fn.shift)
    if isinstance(fn, Combination):
        return fn.terms
    base = _BASE_OF.get(fn)
    if base is not None:
        return (((1.0, base),), 0.0)
    return None


_BASE_FN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "id": lambda x: x, "relu": torch.relu, "step": F.step, "erf": torch.erf,
    "gauss": lambda x: torch.exp(-x * x),
    "sin": torch.sin, "cos": torch.cos, "exp": torch.exp,
}


class Combination(F.Elementwise):
    """``Σ_i c_i · base_i(x) + const``: a function given by its basis expansion (so the
    closed forms apply to it), e.g. the derivative of a recognised activation."""

    def __init__(self, terms: Terms):
        self.terms = terms
        parts = [f"{c:g}·{b}" for c, b in terms[0]] + ([f"{terms[1]:g}"] if terms[1] or not terms[0] else [])
        self.name = " + ".join(parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.full_like(x, self.terms[1])
        for coef, base in self.terms[0]:
            total = total + coef * _BASE_FN[base](x)
        return total


# d/dx of each base as (coef, base) pairs plus a constant; step' is a delta (no entry)
_DERIVATIVE: dict[str, tuple[tuple[tuple[float, str], ...], float]] = {
    "id": ((), 1.0), "relu": (((1.0, "step"),), 0.0), "sin": (((1.0, "cos"),), 0.0),
    "cos": (((-1.0, "sin"),), 0.0), "exp": (((1.0, "exp"),), 0.0),
    "erf": (((2 / math.sqrt(math.pi), "gauss"),), 0.0),
}


def derivative(fn: Callable | None) -> Combination | None:
    """``φ'`` as a :class:`Combination` when ``φ`` has a basis expansion whose bases all have
    derivatives in the basis (relu → step, sin → cos, …), else None. The NTK's backward pass
    uses it so that E[φ'(u) φ'(v)] gets a closed form instead of quadrature."""
    terms = terms_of(fn)
    if terms is None:
        return None
    out: dict[str, float] = {}
    const = 0.0
    for coef, base in terms[0]:
        d = _DERIVATIVE.get(base)
        if d is None:
            return None
        const += coef * d[1]
        for c, b in d[0]:
            out[b] = out.get(b, 0.0) + coef * c
    return Combination((tuple((c, b) for b, c in out.items() if c != 0.0), const))


def _mean_base(base: str, v: torch.Tensor) -> torch.Tensor | None:
    s = _safe_sqrt(v)
    if base in ("id", "erf", "sin"):
        return torch.zeros_like(v)
    if base == "relu":
        return s / SQRT_2PI
    if base == "step":
        return torch.where(v > 0, 0.5, 0.0).to(v.dtype)
    if base == "cos":
        return torch.exp(-v / 2)
    if base == "exp":
        return torch.exp(v / 2)
    if base == "gauss":
        return 1 / torch.sqrt(1 + 2 * v)
    return None


_SNAP = 1.0 - 4 * torch.finfo(torch.float64).eps


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b > 0, a / torch.where(b > 0, b, 1.0), 0.0)


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt with a finite gradient at 0 (the gradient there is taken as 0)."""
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, 1.0).sqrt(), 0.0)


class _Pair:
    """Var u = v1, Var v = v2, Cov = c, and the quantities derived from them, computed once
    per cross moment and shared by all its base pairs (ρ and θ are full-size passes; abs =
    2·relu − id alone has four base pairs)."""

    def __init__(self, v1, v2, c, shared: dict | None = None):
        self.v1, self.v2, self.c = v1, v2, c
        self.shared = {} if shared is None else shared

    def flipped(self) -> _Pair:
        return _Pair(self.v2, self.v1, self.c, self.shared)  # ρ and θ are symmetric in (u, v)

    @property
    def s1(self):
        return self.v1.clamp_min(0).sqrt()

    @property
    def s2(self):
        return self.v2.clamp_min(0).sqrt()

    @property
    def grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.v1, self.v2, self.c))

    @property
    def rho(self):
        if "rho" not in self.shared:
            # sqrt(v1·v2), not s1·s2: a vector paired with itself then gets ρ = 1 exactly,
            # which matters because arccos amplifies rounding near ±1.
            if self.grad:
                rho = _safe_div(self.c, _safe_sqrt(self.v1 * self.v2)).clamp(-1.0, 1.0)
            else:  # the same values with fewer full-size passes
                den = (self.v1 * self.v2).clamp_min_(0).sqrt_()
                rho = torch.where(den > 0, self.c / den, 0.0).clamp_(-1.0, 1.0)
                # within 4 ulps of ±1: ±1 (a copy of an example whose covariance and
                # variances were summed differently; see kernels/fused.py)
                rho = torch.where(rho.abs() >= _SNAP, rho.sign(), rho)
            self.shared["rho"] = rho
        return self.shared["rho"]

    @property
    def theta(self):
        if "theta" not in self.shared:
            rho = self.rho
            if self.grad:
                # arccos' is infinite at ±1, where a vector meets itself (ρ ≡ 1, dρ = 0):
                # take the gradient from ρ clamped just inside ±1 and the value from ρ
                # itself, so values stay exact and gradients w.r.t. hyperparameters finite.
                inside = rho.clamp(-1.0 + 1e-15, 1.0 - 1e-15)
                theta = torch.arccos(inside) + (torch.arccos(rho) - torch.arccos(inside)).detach()
            else:
                theta = torch.arccos(rho)
            self.shared["theta"] = theta
        return self.shared["theta"]


def _cross_base(b1: str, b2: str, p: _Pair) -> torch.Tensor | None:
    """E[b1(u) b2(v)], with Var u = p.v1, Var v = p.v2, Cov = p.c (broadcast shapes)."""
    v1, v2, c = p.v1, p.v2, p.c
    pair = (b1, b2)
    if pair == ("id", "id"):
        return c + 0 * (v1 + v2)
    if pair == ("id", "relu"):
        return c / 2 + 0 * v1
    if pair == ("id", "step"):
        return _safe_div(c, p.s2 * SQRT_2PI) + 0 * v1
    if pair == ("relu", "relu"):
        t = p.theta
        return p.s1 * p.s2 / (2 * math.pi) * (torch.sin(t) + (math.pi - t) * torch.cos(t))
    if pair == ("relu", "step"):
        return torch.where(p.s2 > 0, p.s1 * (1 + p.rho) / (2 * SQRT_2PI), 0.0)
    if pair == ("step", "step"):
        both = (p.s1 > 0) & (p.s2 > 0)
        return torch.where(both, (math.pi - p.theta) / (2 * math.pi), 0.0)
    if pair == ("id", "erf"):
        return c * (2 / math.sqrt(math.pi)) / torch.sqrt(1 + 2 * v2) + 0 * v1
    if pair == ("erf", "erf"):
        arg = 2 * c / torch.sqrt((1 + 2 * v1) * (1 + 2 * v2))
        return (2 / math.pi) * torch.arcsin(arg.clamp(-1.0, 1.0))
    if pair == ("gauss", "gauss"):  # E[exp(-u² - v²)] = det(I + 2Σ)^(-1/2)
        return 1 / torch.sqrt((1 + 2 * v1) * (1 + 2 * v2) - 4 * c * c)
    if pair in (("id", "gauss"), ("erf", "gauss")):  # odd × even
        return torch.zeros_like(c + v1 + v2)
    damp = torch.exp(-(v1 + v2) / 2)
    if pair == ("sin", "sin"):
        return damp * torch.sinh(c)
    if pair == ("cos", "cos"):
        return damp * torch.cosh(c)
    if pair in (("sin", "cos"), ("id", "cos")):
        return torch.zeros_like(c + v1 + v2)
    if pair == ("id", "sin"):
        return c * torch.exp(-v2 / 2) + 0 * v1
    if pair == ("id", "exp"):
        return c * torch.exp(v2 / 2) + 0 * v1
    if pair == ("exp", "exp"):
        return torch.exp((v1 + v2) / 2 + c)
    if pair == ("sin", "exp"):
        return torch.exp((v2 - v1) / 2) * torch.sin(c)
    if pair == ("cos", "exp"):
        return torch.exp((v2 - v1) / 2) * torch.cos(c)
    return None


def mean(terms: Terms, var: torch.Tensor) -> torch.Tensor | None:
    """E[f(u)] for u ~ N(0, var), or None if a base has no formula."""
    total = torch.full_like(var, terms[1])
    for coef, base in terms[0]:
        m = _mean_base(base, var)
        if m is None:
            return None
        total = total + coef * m
    return total


def cross(
    t1: Terms, t2: Terms, v1: torch.Tensor, v2: torch.Tensor, c: torch.Tensor, shared: dict | None = None
) -> torch.Tensor | None:
    """E[f(u) g(v)] (shapes of v1, v2, c broadcast), or None if some pair has no formula.

    ``shared``: a dict kept by the caller across calls with the same ``(v1, v2, c)`` (e.g.
    E[φφ] and E[φ'φ'] of one covariance), so that ρ and θ are computed once."""
    shape = torch.broadcast_shapes(v1.shape, v2.shape, c.shape)
    total = None  # not zeros + …: each full-size pass counts for kernels of many inputs
    pair = _Pair(v1, v2, c, shared)
    for coef1, b1 in t1[0]:
        for coef2, b2 in t2[0]:
            val = _cross_base(b1, b2, pair)
            if val is None:
                flipped = _cross_base(b2, b1, pair.flipped())
                if flipped is None:
                    return None
                val = flipped
            term = val if coef1 * coef2 == 1.0 else coef1 * coef2 * val
            total = term if total is None else total + term
    if total is None:
        total = torch.zeros(shape, dtype=c.dtype)
    elif total.shape != shape:
        total = total.expand(shape)
    if t1[1] != 0.0:
        m2 = mean(t2, v2)
        if m2 is None:
            return None
        total = total + t1[1] * m2
    if t2[1] != 0.0:
        m1 = mean(t1, v1)
        if m1 is None:
            return None
        total = total + t2[1] * m1
    # Both mean terms above include the constant product k1·k2; keep it once.
    return total - t1[1] * t2[1] if t1[1] * t2[1] != 0.0 else total
