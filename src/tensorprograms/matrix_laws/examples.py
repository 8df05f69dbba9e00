"""The classical random-matrix laws as hand-written Tensor Programs (Netsor⊤).

Each program starts from an initial vector ``x`` (iid N(0, 1) coordinates) and applies a
random matrix A repeatedly; the Master Theorem's ``E[Z^x Z^{A^k x}]`` is the limit of
``xᵀA^k x / n``, i.e. the k-th moment of A's spectral law (x is independent of A). The
programs use W and Wᵀ together, so they are Netsor⊤ and go through TP IV's
``Z = Ẑ + Ż`` rule; being linear, the limit is an exact Gram computation.
"""

from __future__ import annotations

import numpy as np

from ..master import master_theorem
from ..program.program import Program
from ..program.variables import Vector


def wigner_program(order: int, variance: float = 1.0) -> tuple[Program, Vector, list[Vector]]:
    """``A = (W + Wᵀ)/√2`` (W n×n, entries N(0, σ²/n)) applied ``order`` times to x.

    Returns ``(P, x, [A x, A² x, …])``; moments: the semicircle's."""
    _check_order(order)
    P = Program()
    x = P.vector("x")
    W = P.matrix("W", variance=variance)
    powers, v = [], x
    for k in range(1, order + 1):
        v = P.lincomb([2**-0.5, 2**-0.5], [W @ v, W.T @ v], name=f"A{k}x")
        powers.append(v)
    return P, x, powers


def marchenko_pastur_program(
    order: int, ratio: float = 1.0, variance: float = 1.0
) -> tuple[Program, Vector, list[Vector]]:
    """``A = WᵀW`` for W of shape (ratio·n)×n, entries N(0, σ²/n), applied ``order`` times."""
    _check_order(order)
    P = Program()
    x = P.vector("x")
    W = P.matrix("W", variance=variance, out_ratio=ratio)
    powers, v = [], x
    for _ in range(order):
        v = W.T @ (W @ v)
        powers.append(v)
    return P, x, powers


def product_program(
    order: int, factors: int, variance: float = 1.0
) -> tuple[Program, Vector, list[Vector]]:
    """``A = MᵀM`` for ``M = W_s ⋯ W_1`` (s = ``factors`` square Gaussian matrices, entries
    N(0, σ²/n)), applied ``order`` times: moments are Fuss–Catalan numbers."""
    _check_order(order)
    if not isinstance(factors, int) or factors < 1:
        raise ValueError(f"factors must be a positive integer, got {factors!r}")
    P = Program()
    x = P.vector("x")
    Ws = [P.matrix(f"W{i + 1}", variance=variance) for i in range(factors)]
    powers, v = [], x
    for _ in range(order):
        for W in Ws:
            v = W @ v
        for W in reversed(Ws):
            v = W.T @ v
        powers.append(v)
    return P, x, powers


def program_moments(program: Program, x: Vector, powers: list[Vector]) -> np.ndarray:
    """``[E[Z^x Z^{A x}], E[Z^x Z^{A² x}], …]`` by the Master Theorem."""
    limit = master_theorem(program)
    return np.array([float(limit.second_moment(x, v)) for v in powers])


def _check_order(order: int) -> None:
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be a positive integer, got {order!r}")
