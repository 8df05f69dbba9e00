"""Jacobian moments three ways: the Master Theorem on a Netsor⊤ program (no freeness assumed),
the free product (TP III's freeness), and finite-width networks extrapolated to n → ∞.

    python examples/jacobian_master_theorem.py            # Master Theorem vs free product
    python examples/jacobian_master_theorem.py --finite   # + finite width, 2^7 … 2^11

For tanh, erf and ReLU MLPs (depth 3 and 4, on the critical line and at σ_w² = 2.5) it prints
m₁…m₆ of JᵀJ from ``ml.master_theorem_moments`` and the relative difference to the free
product's; with ``--finite``, for the one-layer tanh Jacobian at σ_w² = 1.5 (``start=1`` of
a depth-3 model), the first four moments fitted as a + b/n over widths 2^7 … 2^11
(``ml.extrapolate_moment``) against both.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from scipy import optimize
from torch import nn

from tensorprograms import matrix_laws as ml

D_IN = 5
_T, _W = np.polynomial.hermite_e.hermegauss(200)
_W = _W / _W.sum()
PHI = {
    "tanh": (nn.Tanh, np.tanh, lambda h: np.cosh(h) ** -2),
    "erf": (None, np.vectorize(math.erf), lambda h: 2 / math.sqrt(math.pi) * np.exp(-h * h)),
    "relu": (nn.ReLU, None, None),
}


class Erf(nn.Module):
    def forward(self, x):
        return torch.erf(x)


class MLP(nn.Module):
    def __init__(self, n: int, act: str, depth: int, sw2: float, sb2: float):
        super().__init__()
        self.act = Erf() if act == "erf" else PHI[act][0]()
        sizes = [D_IN] + [n] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.readout = nn.Linear(n, 1)
        for m in self.layers:
            nn.init.normal_(m.weight, std=math.sqrt(sw2 / m.in_features))
            nn.init.normal_(m.bias, std=math.sqrt(sb2)) if sb2 > 0 else nn.init.zeros_(m.bias)

    def forward(self, x):
        for m in self.layers:
            x = self.act(m(x))
        return self.readout(x)


def critical(act: str, sb2: float) -> tuple[float, float]:
    """(σ_w², q*) with χ = σ_w² E[φ'(h)²] = 1 at the fixed point q* (ReLU: σ_w² = 2, q = 1)."""
    if act == "relu":
        return 2.0, 1.0
    _, phi, dphi = PHI[act]

    def gauss(f, q):
        return float(np.sum(_W * f(math.sqrt(q) * _T)))

    def chi_minus_one(q):
        return (q - sb2) / gauss(lambda h: phi(h) ** 2, q) * gauss(lambda h: dphi(h) ** 2, q) - 1

    q = optimize.brentq(chi_minus_one, sb2 + 1e-9, 50.0, xtol=1e-14)
    return (q - sb2) / gauss(lambda h: phi(h) ** 2, q), q


def setup(act: str, depth: int, sw2: float | None):
    """The factory and an input whose first preactivation variance is q* (critical) or 1."""
    sb2 = 0.0 if act == "relu" else 0.05
    sw2, q = critical(act, sb2) if sw2 is None else (sw2, 1.0)
    x = torch.full((1, D_IN), math.sqrt((q - sb2) / sw2), dtype=torch.float64)
    return (lambda n: MLP(n, act, depth, sw2, sb2)), x


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--order", type=int, default=6)
    parser.add_argument("--finite", action="store_true", help="also the finite-width extrapolation")
    args = parser.parse_args()
    print(f"{'model':34} {'time':>5}  max |MT/free − 1| over m1…m{args.order}   m{args.order} (MT)")
    for act in ("tanh", "erf", "relu"):
        for sw2 in (None, 2.5):
            for depth, start in ((3, 1), (3, 0), (4, 0)):
                factory, x = setup(act, depth, sw2)
                law = ml.jacobian_spectrum(factory, x, start=start)
                t = time.perf_counter()
                values, stderr = ml.master_theorem_moments(law, args.order)
                dt = time.perf_counter() - t
                rel = np.abs(values / law.moments(args.order) - 1).max()
                name = f"{act} σ_w²={'crit' if sw2 is None else sw2} {law.end - law.start} layer(s)"
                print(f"{name:34} {dt:5.1f}s  {rel:.1e} (stderr {stderr.max():.0e})"
                      f"{'':14}{values[-1]:.10g}")
    if args.finite:
        factory, x = setup("tanh", 3, 1.5)
        law = ml.jacobian_spectrum(factory, x, start=1)
        values, _ = ml.master_theorem_moments(law, 4)
        widths, seeds = [2**7, 2**8, 2**9, 2**10, 2**11], [32, 16, 16, 8, 6]
        spectra = ml.empirical(factory, x, widths, seeds=seeds, start=1, law=law)
        print("\ntanh σ_w² = 1.5, one layer (start=1 of depth 3): finite width fitted as a + b/n over "
              f"n = {widths} ({seeds} nets)")
        for k in range(1, 5):
            fit = ml.extrapolate_moment(spectra, k)
            big = spectra[-1].moment(k)
            z = (fit.limit - law.moment(k)) / fit.stderr
            print(f"m{k}: Master Theorem {values[k - 1]:.6f}, free product {law.moment(k):.6f}, "
                  f"n → ∞ fit {fit.limit:.4f} ± {fit.stderr:.4f} (z {z:+.2f}, {fit.stderr_dof:.0f} dof), "
                  f"n = 2048 alone {big[0]:.4f} ± {big[1]:.4f}")


if __name__ == "__main__":
    main()
