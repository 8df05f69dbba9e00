"""Run a Tensor Program at a finite width n: the object the limit describes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .calling import call_full
from .instructions import InitMatrix, InitVector, LinComb, MatMul, Moment, Nonlin
from .program import Program
from .variables import Scalar, Var


def width_of(ratio: float, n: int) -> int:
    return max(1, int(round(ratio * n)))


@dataclass
class FiniteWidthRun:
    """Values of every variable at width ``n``.

    ``values[v]`` is ``[αn, *F]`` for a vector, ``[*F]`` for a scalar and the matrix itself
    for a matrix (only if ``keep_matrices``).
    """

    n: int
    values: dict[Var, torch.Tensor]

    def __getitem__(self, v: Var) -> torch.Tensor:
        return self.values[v]

    def second_moment(self, x: Var, y: Var | None = None) -> torch.Tensor:
        """``(1/n) Σ_α x_α ⊗ y_α`` with shape ``[*F_x, *F_y]``: converges to E[Z^x Z^y]."""
        y = x if y is None else y
        a, b = self.values[x], self.values[y]
        m = a.shape[0]
        return (a.reshape(m, -1).T @ b.reshape(m, -1) / m).reshape(x.shape + y.shape)


def _sqrt_psd(cov: torch.Tensor) -> torch.Tensor:
    v = cov[0, 0]
    if torch.equal(cov, v * torch.eye(cov.shape[0], dtype=cov.dtype)):
        # an iid vector (the common case, e.g. an input layer's columns): the same root
        # eigh returns for v·I, without an O(k³) eigendecomposition
        return v.clamp_min(0).sqrt() * torch.eye(cov.shape[0], dtype=cov.dtype)
    lam, vec = torch.linalg.eigh(cov)
    return vec * lam.clamp_min(0).sqrt()


def simulate(
    program: Program,
    n: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    keep_matrices: bool = False,
    requires_grad: bool = False,
) -> FiniteWidthRun:
    """Sample every initial matrix and vector at width ``n`` and run the program.

    Matrices ``W`` of shape ``(out_ratio·n) × (in_ratio·n)`` get iid N(0, σ²/fan_in)
    entries; initial vectors get iid coordinates with their finite-index covariance.
    ``requires_grad``: the samples require gradients, so (under grad mode) every value is
    differentiable with respect to them and to each other.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"width n must be a positive integer, got {n!r}")
    gen = torch.Generator().manual_seed(int(seed))
    vals: dict[Var, torch.Tensor] = {}
    for ins in program.instructions:
        out = ins.out
        if isinstance(ins, InitMatrix):
            rows, cols = width_of(out.out_ratio, n), width_of(out.in_ratio, n)
            std = math.sqrt(out.variance / cols)
            w = torch.randn(rows, cols, generator=gen, dtype=dtype) * std
            vals[out] = w.requires_grad_(requires_grad)
        elif isinstance(ins, InitVector):
            m, k = width_of(out.ratio, n), out.numel
            root = _sqrt_psd(ins.cov.reshape(k, k)).to(dtype)
            vals[out] = (torch.randn(m, k, generator=gen, dtype=dtype) @ root.T).reshape(
                m, *out.shape
            ).requires_grad_(requires_grad)
        elif isinstance(ins, MatMul):
            w, x = vals[ins.matrix], vals[ins.x]
            w = w.T if ins.transpose else w
            vals[out] = (w @ x.reshape(x.shape[0], -1)).reshape(w.shape[0], *ins.x.shape)
        elif isinstance(ins, LinComb):
            params = [vals[p] if isinstance(p, Scalar) else p for p in ins.params]
            vals[out] = call_full(ins.fn, [vals[x] for x in ins.xs], [x.shape for x in ins.xs], params, 1)
        elif isinstance(ins, (Nonlin, Moment)):
            params = [vals[p] if isinstance(p, Scalar) else p for p in ins.params]
            y = call_full(ins.fn, [vals[x] for x in ins.xs], [x.shape for x in ins.xs], params, 1)
            vals[out] = y.mean(0) if isinstance(ins, Moment) else y
        else:  # pragma: no cover - every instruction type is handled above
            raise TypeError(f"unknown instruction {ins!r}")
    if not keep_matrices:
        vals = {v: t for v, t in vals.items() if v.kind != "A"}
    return FiniteWidthRun(n, vals)
