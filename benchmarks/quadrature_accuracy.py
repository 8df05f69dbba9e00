"""Accuracy of Gauss–Hermite quadrature against closed forms, per dimension and order.

Prints the worst relative error over input pairs of several norms and correlations
(including ρ = 1, a vector with itself) for smooth (erf, sin, exp) and kinked (relu,
abs) functions. The engine's default orders (tensorprograms.master.rules.DEFAULT_ORDERS)
were picked from this table. Run: ``.venv/bin/python benchmarks/quadrature_accuracy.py``.
"""

from __future__ import annotations

import time

import torch

import tensorprograms as tp
from tensorprograms import functions as F

torch.manual_seed(0)
X = torch.randn(6, 5) * torch.tensor([0.3, 0.7, 1.0, 1.5, 2.0, 3.0])[:, None]
X[5] = X[4] * -0.5  # an exactly (anti-)correlated pair


def error_2d(fn, order: int) -> float:
    """E[f(u) f(v)] over all pairs: a 2-D integral per pair."""
    P = tp.Program()
    h = P.input_layer(X, 1.0, 0.1)
    y = P.nonlin(fn, h)
    exact = tp.master_theorem(P, backend="closed_form").second_moment(y)
    quad = tp.master_theorem(P, backend="quadrature", quadrature_orders={2: order}).second_moment(y)
    return float(((quad - exact).abs() / exact.abs().clamp_min(1e-300)).max())


def self_error_2d(fn, order: int, reference: int = 160) -> float:
    """Functions with no closed form: distance to a much finer rule of the same kind."""
    P = tp.Program()
    h = P.input_layer(X, 1.0, 0.1)
    y = P.nonlin(fn, h)
    ref = tp.master_theorem(P, quadrature_orders={2: reference}).second_moment(y)
    quad = tp.master_theorem(P, quadrature_orders={2: order}).second_moment(y)
    return float(((quad - ref).abs() / ref.abs()).max())


def error_1d(fn, order: int) -> float:
    P = tp.Program()
    h = P.input_layer(X, 1.0, 0.1)
    theta = P.moment(fn, h)
    exact = tp.master_theorem(P, backend="closed_form").value(theta)
    quad = tp.master_theorem(P, backend="quadrature", quadrature_orders={1: order}).value(theta)
    return float(((quad - exact).abs() / exact.abs().clamp_min(1e-12)).max())


def error_3d(order: int) -> float:
    """E[relu(u) relu(v + w)] with v, w independent pieces: a 3-D integral vs the 2-D closed form."""
    P = tp.Program()
    h = P.input_layer(X, 1.0, 0.1)
    b = P.vector("b", variance=0.5)
    W = P.matrix("W")
    g = W @ P.nonlin(F.relu, h)
    s = g + b
    y3 = P.nonlin(lambda u, v: torch.relu(u + v), g, b)
    y = P.nonlin(F.relu, s)
    L = tp.master_theorem(P, backend="quadrature", quadrature_orders={3: order})
    exact = tp.master_theorem(P).second_moment(y)
    quad = L.second_moment(y3, y)
    return float(((quad - exact).abs() / exact.abs()).max())


def main() -> None:
    print("2-D second moments E[f(u)f(v)], worst relative error over pairs")
    print(f"{'order':>6} " + " ".join(f"{n:>10}" for n in ("erf", "sin", "exp", "relu", "abs")))
    for order in (8, 16, 24, 32, 48, 64):
        errs = [error_2d(fn, order) for fn in (F.erf, F.sin, F.exp, F.relu, F.abs)]
        print(f"{order:>6} " + " ".join(f"{e:10.1e}" for e in errs))
    print("\nno closed form: tanh, gelu, elu (vs order 160 of the same rule)")
    print(f"{'order':>6} " + " ".join(f"{n:>10}" for n in ("tanh", "gelu", "elu")))
    for order in (16, 32, 48, 64):
        fns = (torch.tanh, torch.nn.functional.gelu, torch.nn.functional.elu)
        errs = [self_error_2d(fn, order) for fn in fns]
        print(f"{order:>6} " + " ".join(f"{e:10.1e}" for e in errs))
    print("\n1-D moments E[f(u)]")
    print(f"{'order':>6} " + " ".join(f"{n:>10}" for n in ("cos", "exp", "relu", "abs")))
    for order in (8, 16, 32, 64, 96, 128):
        errs = [error_1d(fn, order) for fn in (F.cos, F.exp, F.relu, F.abs)]
        print(f"{order:>6} " + " ".join(f"{e:10.1e}" for e in errs))
    print("\n3-D: E[relu(u + w) relu(v)], relative error and time")
    for order in (12, 16, 20, 28, 36):
        t = time.perf_counter()
        e = error_3d(order)
        print(f"{order:>6} {e:10.1e} {time.perf_counter() - t:8.2f}s")


if __name__ == "__main__":
    main()
