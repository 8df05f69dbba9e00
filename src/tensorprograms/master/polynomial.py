"""Expectations of integrands that are polynomials in some of their Gaussian leaves.

TP IV's rewrite of a Netsor⊤ program (transpose.py) produces vectors such as
``φ'(g)·(Ẑ_1 + c·φ'(g)·Ẑ_2 + …)``: a general function of a few G-vars times a polynomial,
usually linear, in many others (a Jacobian applied again and again to a vector). Their
expectations look high-dimensional, so they would go to Monte Carlo, whose noise then
enters Stein's lemma, the next covariances, and every later order. But in the directions
where the integrand is a polynomial a handful of nodes is exact (the origin for degree 1,
Stroud's 2·d points for degree ≤ 3, a small Gauss–Hermite grid above:
``rules.exact_polynomial_rule``), and only the other directions need a real rule, the
engine's usual choice for their dimension (split line, polar, Gauss–Hermite grid, or Monte
Carlo, which then averages exact conditional expectations).

The same structure gives ``E[∂f/∂z]`` for the polynomial leaves by integrating the
derivative itself (:func:`gradient`), which TP IV's Ż coefficients need (transpose.py).

The structure is read from the program, not probed: a G-var leaf has degree 1; a Nonlin
linear in its vectors (``Nonlin.linear``, a LinComb function with ``coefficients``) has the
largest degree of its inputs; ``tp.functions.product`` the sum; any other function is a
*general* function of every leaf below it, whose degree is not counted (those leaves get
the real rule).
"""

from __future__ import annotations

import math

import torch

from ..program import functions as F
from ..program.instructions import Moment, Nonlin
from ..program.variables import Vector
from . import rules
from .expectations import Estimate
from .factors import Factor

# At most this many nodes over the polynomial directions of degree > 3 (else the caller's rule)
MAX_POLY_NODES = 1 << 12
# The element-by-element PSD Cholesky up to this many coordinates (O(d³) small tensor ops)
CHOLESKY_MAX = 24


def _kind(target) -> tuple[str, tuple]:
    """``("leaf" | "linear" | "product" | "general", inputs)`` of a vector or Moment."""
    if isinstance(target, Vector) and target.is_gaussian:
        return "leaf", ()
    ins = target if isinstance(target, Moment) else target.instruction
    if isinstance(ins, Nonlin) and not ins.params:
        if ins.linear or getattr(ins.fn, "coefficients", None) is not None:
            return "linear", ins.xs
        if ins.fn is F.product:
            return "product", ins.xs
    return "general", ins.xs


class Structure:
    """Polynomial structure of vectors (memoized per vector)."""

    def __init__(self):
        self._leaves: dict = {}
        self._general: dict = {}

    def leaves(self, v) -> frozenset:
        if v not in self._leaves:
            kind, xs = _kind(v)
            self._leaves[v] = frozenset([v]) if kind == "leaf" else frozenset().union(
                *(self.leaves(x) for x in xs))
        return self._leaves[v]

    def general(self, v) -> frozenset:
        """The leaves that reach v through a general (non-polynomial) function."""
        if v not in self._general:
            kind, xs = _kind(v)
            if kind == "leaf":
                out = frozenset()
            elif kind == "general":
                out = self.leaves(v)
            else:
                out = frozenset().union(*(self.general(x) for x in xs))
            self._general[v] = out
        return self._general[v]

    def degree(self, v, general: frozenset, memo: dict) -> int:
        """Total degree of v as a polynomial in the leaves outside ``general`` (whose
        functions are the polynomial's coefficients)."""
        if v in memo:
            return memo[v]
        kind, xs = _kind(v)
        if kind == "leaf":
            out = 0 if v in general else 1
        elif kind == "general":
            out = 0
        elif kind == "linear":
            out = max(self.degree(x, general, memo) for x in xs)
        else:
            out = sum(self.degree(x, general, memo) for x in xs)
        memo[v] = out
        return out


def _split(structure: Structure, fs: list[Factor], leaves: list[Vector]):
    """(general leaves, polynomial leaves, total degree of Π_f f in the polynomial ones)."""
    general = frozenset().union(*(structure.general(f.target) for f in fs))
    memo: dict = {}
    degree = sum(structure.degree(f.target, general, memo) for f in fs)
    return general, [v for v in leaves if v not in general], degree


def _coords(leaves: list[Vector], general: frozenset) -> tuple[list[int], list[int]]:
    """Flat coordinate indices of the general leaves and of the polynomial ones."""
    a_idx, b_idx, start = [], [], 0
    for v in leaves:
        (a_idx if v in general else b_idx).extend(range(start, start + v.numel))
        start += v.numel
    return a_idx, b_idx


def integrate(ex, structure: Structure, fs: list[Factor], key: str, leaves: list[Vector],
              joint: torch.Tensor) -> Estimate | None:
    """``E[Π_f f(Z)]`` (one or two joint factors over ``leaves``, covariance ``joint``) with the
    polynomial leaves on a small exact rule, or None when no leaf is polynomial or the rule
    would be too large (the caller's rule then applies). Shape ``[*F_f, *F_g]``."""
    if any(f.target is None for f in fs):
        return None
    general, poly, degree = _split(structure, fs, leaves)
    if not poly:
        return None

    def product(vals: list[torch.Tensor]) -> torch.Tensor:
        ys = [f.run([vals[leaves.index(v)] for v in f.leaves]).reshape(vals[0].shape[0], -1) for f in fs]
        return ys[0] if len(ys) == 1 else (ys[0][:, :, None] * ys[1][:, None, :]).flatten(1)

    shape = tuple(s for f in fs for s in f.shape)
    return _integrate(ex, key, leaves, joint, general, degree, product, shape)


def gradient(ex, structure: Structure, f: Factor, key: str, leaves: list[Vector],
             joint: torch.Tensor):
    """``E[∂f/∂z_B]`` for the polynomial coordinates z_B of f's leaves, by integrating the
    derivative itself (autograd through f's linear maps and products, which are all that
    depend on z_B), with no covariance inverted: ``(a_idx, b_idx, [|B|, |F_f|])`` with the flat
    coordinate indices of the general and the polynomial leaves, or None (no polynomial
    leaf, a forced Monte Carlo backend, or f not differentiable there).

    Stein's lemma over all leaves, ``Cov⁺ E[z f]``, would invert the polynomial leaves'
    covariance: for a Jacobian applied k times these are Krylov Gram matrices, whose
    condition number grows geometrically with k (rounding became O(1) errors by order 6).
    Only the general leaves then need Stein:
    ``E[∇_A f] = Σ_AA⁺ (E[z_A f] − Σ_AB E[∇_B f])``."""
    if ex.backend not in ("auto", "quadrature") or f.target is None:
        return None
    general, poly, degree = _split(structure, [f], leaves)
    if not poly:
        return None
    a_idx, b_idx = _coords(leaves, general)
    sizes = [v.numel for v in leaves]
    which = [i for i, v in enumerate(leaves) if v not in general]

    def derivative(vals: list[torch.Tensor]) -> torch.Tensor:
        q = vals[0].shape[0]
        with torch.enable_grad():
            xs = [t.detach().requires_grad_(i in which) for i, t in enumerate(vals)]
            y = f.run(xs).reshape(q, -1)
            rows = []
            for a in range(y.shape[1]):
                gs = torch.autograd.grad(y[:, a].sum(), [xs[i] for i in which], retain_graph=True,
                                         allow_unused=True)
                rows.append(torch.cat([torch.zeros(q, sizes[i], dtype=y.dtype) if g is None
                                       else g.reshape(q, -1) for g, i in zip(gs, which, strict=True)], 1))
        return torch.stack(rows, 2).flatten(1).detach()  # [q, |B|·|F_f|]

    try:
        est = _integrate(ex, key, leaves, joint, general, max(degree - 1, 0), derivative,
                         (len(b_idx), f.numel))
    except RuntimeError:  # a function on the polynomial path that autograd cannot follow
        return None
    if est is None:
        return None
    return a_idx, b_idx, est.value


def _block_root(sigma: torch.Tensor, da: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_A, L_B)`` with ``L_A L_Aᵀ + L_B L_Bᵀ = sigma`` and ``L_B``'s first ``da`` rows zero
    (the first ``da`` coordinates depend on ξ_A only), without null columns.

    Small: the PSD Cholesky (a coordinate dependent on earlier ones up to its own variance's
    rounding is dropped). Large (> CHOLESKY_MAX coordinates, e.g. many positions): a root of
    Σ_AA, ``L_BA = Σ_BA L_AA⁺ᵀ`` and an eigen-root of the Schur complement."""
    d = sigma.shape[0]
    if d <= CHOLESKY_MAX:
        L = rules.psd_cholesky(sigma)
        return rules.drop_null_columns(L[:, :da]), rules.drop_null_columns(L[:, da:])
    saa, sab, sbb = sigma[:da, :da], sigma[:da, da:], sigma[da:, da:]
    if da == 0:
        laa = sigma.new_zeros(0, 0)
    else:
        laa = rules.drop_null_columns(rules.psd_cholesky(saa) if da <= 6 else rules.psd_sqrt(saa, 1e-13))
    lba = sab.T @ torch.linalg.pinv(laa).T  # [d_B, r_A]
    schur = sbb - lba @ lba.T
    lbb = rules.drop_null_columns(rules.psd_sqrt((schur + schur.T) / 2, 1e-13))
    la = torch.cat([laa, lba], 0)
    lb = torch.cat([torch.zeros(da, lbb.shape[1], dtype=sigma.dtype), lbb], 0)
    return la, lb


def _integrate(ex, key: str, leaves: list[Vector], joint: torch.Tensor, general: frozenset,
               degree: int, fn, shape: tuple[int, ...]) -> Estimate | None:
    """``E[fn(Z)]`` for ``fn``: leaf values ``[Q, *F_leaf]`` (in ``leaves`` order) → ``[Q, |shape|]``,
    a polynomial of total ``degree`` in the leaves outside ``general`` for fixed general ones.

    Coordinates: the general leaves' first, then the polynomial ones, in a pivoted Cholesky
    ``z = L ξ``, so ``z_A = L_AA ξ_A`` and ``z_B = L_BA ξ_A + L_BB ξ_B``: for fixed ξ_A the
    integrand is a polynomial of that degree in ξ_B, integrated exactly
    (:func:`rules.exact_polynomial_rule`); ξ_A gets the engine's rule for its dimension
    (Monte Carlo then averages exact conditional expectations: its standard error is over
    ξ_A draws only)."""
    a_idx, b_idx = _coords(leaves, general)
    perm = torch.tensor(a_idx + b_idx)
    da = len(a_idx)
    la, lb = _block_root(joint[perm][:, perm], da)  # [D, r_A], [D, r_B]
    ra, rb = la.shape[-1], lb.shape[-1]
    if degree > 3 and (degree // 2 + 1) ** rb > MAX_POLY_NODES:
        return None
    xb, wb = rules.exact_polynomial_rule(degree, rb)  # [QB, r_B], [QB]
    backend, settings = ex._rule(ra, key, False, joint.diagonal()[a_idx])
    xa, wa = rules.standard_nodes(la[:da], backend, **settings)  # [QA, r_A], [QA]
    za = xa @ la.T  # [QA, D]: every coordinate's part from ξ_A
    zb = xb @ lb.T  # [QB, D]
    inverse = torch.argsort(perm)
    sizes = [v.numel for v in leaves]
    width = math.prod(shape)
    per = max(1, ex.memory_budget // max(1, xb.shape[0] * (2 * width + len(perm))))
    m1 = m2 = None
    for start in range(0, za.shape[0], per):
        z = (za[start:start + per, None, :] + zb[None, :, :])  # [q, QB, D] in permuted order
        qa = z.shape[0]
        parts = torch.split(z.reshape(-1, len(perm))[:, inverse], sizes, dim=1)
        vals = [p.reshape(-1, *v.shape) for v, p in zip(leaves, parts, strict=True)]
        inner = fn(vals).reshape(qa, xb.shape[0], width)
        inner = torch.einsum("qbw,b->qw", inner, wb)  # exact over ξ_B
        w = wa[start:start + per]
        t1, t2 = w @ inner, w @ inner**2
        m1 = t1 if m1 is None else m1 + t1
        m2 = t2 if m2 is None else m2 + t2
    est = ex._finish(m1, m2, settings, backend, shape, sum(sizes))
    est.backend = f"{backend}+polynomial(dim {rb}, degree {degree})"
    return est
