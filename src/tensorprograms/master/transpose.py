"""Netsor⊤ (TP IV): programs that use a matrix and its transpose.

TP IV's Master Theorem: for ``W`` with entries N(0, σ²/fan_in),

    Z^{Wx} = Ẑ^{Wx} + Ż^{Wx},   Ż^{Wx} = σ² Σ_y Z^y · E[∂Z^x / ∂Ẑ^{Wᵀy}],

the sum over the ``Wᵀy`` computed before ``Wx``, and symmetrically for ``Wᵀu`` (with
σ²·out_ratio/in_ratio, the transpose's own normalization). The Ẑ's are Gaussian with the
covariances of the Netsor rule, the forward and transposed ones independent.

This module turns a Netsor⊤ program P into a Netsor program Q with the same limit:
each ``W @ x`` becomes a MatMul by a forward copy of W (its Ẑ) plus the linear correction
Ż, each ``W.T @ u`` a MatMul by an independent backward copy plus its Ż. The
coefficients ``E[∂Z^x/∂Ẑ]`` come from the chain rule through the G-vars x's Nonlins read
(exact coefficient matrices) and ``E[∂Z^x/∂G]`` (:func:`leaf_gradients`): integrated
directly in the G's where Z^x is a polynomial (polynomial.py), Stein's lemma
``Σ_AA⁺ E[G_A Z^x]`` (corrected for the polynomial part) in the others. Linear programs
need no expectation at all (exact to rounding at any order); nonlinear ones use closed
forms, quadrature or, past three general dimensions, Monte Carlo.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..program.instructions import InitMatrix, InitVector, LinComb, MatMul, Moment, Nonlin
from ..program.program import Program
from ..program.variables import Matrix, Scalar, Var, Vector

# Ż coefficients below this fraction of the largest one are rounding, not structure.
_ZERO = 1e-13


def stein_gradient(limit, x: Vector, atom: Vector) -> torch.Tensor:
    """``E[∂Z^x_a / ∂Z^{atom}_b]`` as a ``[|F_x|, |F_atom|]`` matrix (zero if x does not depend
    on the atom).

    The chain rule through the G-vars ``G_j`` that x's Nonlins read (its factor's leaves):
    ``∂Z^x/∂Z^{atom} = Σ_j ∂Z^x/∂Z^{G_j} · M_{G_j, atom}`` with ``M`` the exact coefficient
    matrices of the Gaussian basis. A Gaussian x is its own leaf (the gradient is its
    coefficient, no expectation at all), so linear programs stay exact Gram computations
    at every order. For a nonlinear x, ``E[∂Z^x/∂Z^G]`` comes from :func:`leaf_gradients`.
    """
    basis = limit._basis
    if x.is_gaussian:
        m = basis.coefficients(x).get(atom)
        return torch.zeros(x.numel, atom.numel, dtype=torch.float64) if m is None else m
    all_leaves = limit._joint_factor(x).leaves
    if not any(atom in basis.coefficients(g) for g in all_leaves):
        return torch.zeros(x.numel, atom.numel, dtype=torch.float64)
    grad = leaf_gradients(limit, x)  # [D, |F_x|]
    total = torch.zeros(x.numel, atom.numel, dtype=torch.float64)
    start = 0
    for g in all_leaves:
        m = basis.coefficients(g).get(atom)
        if m is not None:
            total = total + grad[start:start + g.numel].T @ m
        start += g.numel
    return total


def leaf_gradients(limit, x: Vector) -> torch.Tensor:
    """``E[∂Z^x/∂Z^G]`` over the flattened leaves G of x's factor: ``[D, |F_x|]`` (cached).

    Where x is a polynomial in some leaves (linear maps and products of them, as every
    vector of a Jacobian applied repeatedly is), those derivatives are integrated directly
    (``polynomial.gradient``, exact quadrature, no inverse); Stein's lemma
    ``E[∇_G Z^x] = Cov(G)⁺ E[G Z^x]`` is used for the others only, over their own small
    covariance. Inverting the whole leaf covariance instead, a Krylov-type Gram matrix for
    repeated Jacobians, turned rounding into O(1) errors by the 6th power.
    """
    cache = limit.__dict__.setdefault("_leaf_gradients", {})
    if x in cache:
        return cache[x]
    from . import polynomial

    factor = limit._joint_factor(x)
    leaves = factor.leaves
    sigma = limit._basis.joint_cov(leaves)
    ex = limit._ex
    if ex._structure is None:
        ex._structure = polynomial.Structure()
    split = polynomial.gradient(ex, ex._structure, factor, f"E[∇{x.name}]", leaves, sigma)
    a_leaves = leaves if split is None else [g for g in leaves if g in ex._structure.general(x)]
    cross = [limit.second_moment(g, x).reshape(g.numel, x.numel) for g in a_leaves]
    if split is None:
        grad = torch.linalg.pinv(sigma, hermitian=True, rtol=1e-12) @ torch.cat(cross, 0)
    else:
        a_idx, b_idx, grad_b = split
        grad = torch.zeros(sigma.shape[0], x.numel, dtype=torch.float64)
        grad[b_idx] = grad_b
        if a_idx:
            rhs = torch.cat(cross, 0) - sigma[a_idx][:, b_idx] @ grad_b
            saa = sigma[a_idx][:, a_idx]
            grad[a_idx] = torch.linalg.pinv(saa, hermitian=True, rtol=1e-12) @ rhs
    cache[x] = grad
    return grad


def _correction(kappas: list[torch.Tensor], shapes: list[tuple[int, ...]], out_shape) -> Callable:
    def add(g, *us, _k=kappas, _s=shapes, _o=tuple(out_shape)):
        total = g
        for k, u, s in zip(_k, us, _s):
            batch = u.shape[: u.ndim - len(s)]
            flat = u.reshape(*batch, -1) @ k.T  # [*batch, |F_out|]
            total = total + flat.reshape(*batch, *_o)
        return total

    add.__name__ = "Ẑ+Ż"
    return add


def to_netsor(P: Program, limit_factory) -> tuple[Program, dict[Var, Var], object]:
    """The Netsor program Q with P's limit, the map P-var → Q-var, and Q's limit.

    For NetsorT programs (transposes only as in backpropagation, see
    ``program.languages``) TP II's gradient-independence theorem says the Ż terms do not
    change the limit; they are skipped (they would be zero up to quadrature/Monte Carlo
    noise, and cost a Stein computation per MatMul).
    """
    from ..program import languages

    independent = languages.infer(P) == "netsorT"
    Q = Program()
    limit = limit_factory(Q)
    m: dict[Var, Var] = {}
    fwd: dict[Matrix, Matrix] = {}
    bwd: dict[Matrix, Matrix] = {}
    hats: dict[Matrix, list[tuple[bool, Vector, Vector]]] = {}
    for ins in P.instructions:
        out = ins.out
        if isinstance(ins, InitMatrix):
            hats[out] = []
        elif isinstance(ins, InitVector):
            # a copy of an already validated vector: Q.vector would redo the O(|F|³) PSD check
            v = Vector(Q, Q._fresh(out.name, "v"), out.shape, out.ratio, "init")
            m[out] = Q._append(InitVector(v, ins.cov, ins.description))
        elif isinstance(ins, MatMul):
            W, x = ins.matrix, m[ins.x]
            if not ins.transpose:
                if W not in fwd:
                    fwd[W] = Q.matrix(W.name, W.variance, W.out_ratio, W.in_ratio)
                M, scale = fwd[W], W.variance
            else:
                if W not in bwd:
                    bwd[W] = Q.matrix(
                        f"{W.name}ᵀ", W.variance * W.out_ratio / W.in_ratio, W.in_ratio, W.out_ratio
                    )
                M, scale = bwd[W], W.variance * W.out_ratio / W.in_ratio
            g = Q.matmul(M, x, name=f"{out.name}^")
            kappas, us = [], []
            for transposed, hat, u in hats[W]:
                if transposed == ins.transpose or independent:
                    continue
                k = scale * stein_gradient(limit, x, hat)
                if k.abs().max() > _ZERO * max(1.0, float(k.detach().abs().max())) and k.abs().max() > _ZERO:
                    kappas.append(k)
                    us.append(u)
            hats[W].append((ins.transpose, g, x))
            if not kappas:
                m[out] = g
                continue
            fn = _correction(kappas, [u.shape for u in us], out.shape)
            if all(u.is_gaussian for u in us):
                m[out] = Q.linear(fn, g, *us, name=out.name, label=f"{g.name} + Ż")
            else:
                m[out] = Q.nonlin(fn, g, *us, name=out.name, elementwise=False)
        elif isinstance(ins, LinComb):
            xs = [m[x] for x in ins.xs]
            params = tuple(m[p] if isinstance(p, Scalar) else p for p in ins.params)
            if all(x.is_gaussian for x in xs):
                m[out] = Q.linear(ins.fn, *xs, name=out.name, label=ins.label, params=params)
            else:  # a LinComb of P's G-vars that carry a nonlinear Ż is an H-var here
                m[out] = Q.nonlin(ins.fn, *xs, name=out.name, params=params)
        elif isinstance(ins, Nonlin):
            params = tuple(m[p] if isinstance(p, Scalar) else p for p in ins.params)
            m[out] = Q.nonlin(ins.fn, *[m[x] for x in ins.xs], params=params, name=out.name,
                              elementwise=ins.elementwise)
        elif isinstance(ins, Moment):
            params = tuple(m[p] if isinstance(p, Scalar) else p for p in ins.params)
            m[out] = Q.moment(ins.fn, *[m[x] for x in ins.xs], params=params, name=out.name,
                              elementwise=ins.elementwise)
    for W in P.matrices:
        if W in fwd:
            m[W] = fwd[W]
    return Q, m, limit
