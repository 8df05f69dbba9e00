"""Density of the infinite-width Jacobian law over finite-width histograms: a deep tanh MLP
at criticality (χ = σ_w² E[tanh'(h)²] = 1 at the fixed point q*).

    python examples/jacobian_spectrum.py --out out/spectrum

writes ``out/spectrum/tanh_critical.png`` (one panel per width) and prints the KS distance
and the first four moments (finite-width mean ± standard error vs the limit) per width, and
their n → ∞ extrapolations (a + b/n over the widths).
"""

from __future__ import annotations

import argparse
import math
import pathlib

import numpy as np
import torch
from scipy import optimize
from torch import nn

from tensorprograms import matrix_laws as ml

SB2 = 0.05
_T, _W = np.polynomial.hermite_e.hermegauss(200)
_W = _W / _W.sum()


def critical_point(sb2: float) -> tuple[float, float]:
    """(σ_w², q*) on tanh's critical line at bias variance sb2."""
    def gauss(f, q):
        return float(np.sum(_W * f(math.sqrt(q) * _T)))

    def chi_minus_one(q):
        sw2 = (q - sb2) / gauss(lambda h: np.tanh(h) ** 2, q)
        return sw2 * gauss(lambda h: np.cosh(h) ** -4, q) - 1

    q = optimize.brentq(chi_minus_one, sb2 + 1e-9, 50.0, xtol=1e-14)
    return (q - sb2) / gauss(lambda h: np.tanh(h) ** 2, q), q


class MLP(nn.Module):
    def __init__(self, n: int, depth: int, sw2: float, sb2: float, d: int = 5):
        super().__init__()
        sizes = [d] + [n] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.readout = nn.Linear(n, 1)
        for m in self.layers:
            nn.init.normal_(m.weight, std=math.sqrt(sw2 / m.in_features))
            nn.init.normal_(m.bias, std=math.sqrt(sb2))

    def forward(self, x):
        for m in self.layers:
            x = torch.tanh(m(x))
        return self.readout(x)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/spectrum")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    sw2, q = critical_point(SB2)
    x = torch.full((1, 5), math.sqrt((q - SB2) / sw2), dtype=torch.float64)  # q_1 = q*

    def factory(n):
        return MLP(n, args.depth, sw2, SB2)

    law = ml.jacobian_spectrum(factory, x)
    print(f"σ_w² = {sw2:.6f}, σ_b² = {SB2}, q* = {q:.6f}; {law}")
    spectra = ml.empirical(factory, x, args.widths, seeds=args.seeds, law=law)
    for sp in spectra:
        moments = ", ".join(f"m{k} {sp.moment(k)[0]:.4g}±{sp.moment(k)[1]:.2g} (limit {law.moment(k):.4g})"
                            for k in range(1, 5))
        print(f"n = {sp.width:5d}: KS {sp.ks(law):.4f}; {moments}")
    if len(spectra) >= 3 and args.seeds >= 2:  # the O(1/n) bias removed: a + b/n over the widths
        for k in range(1, 5):
            fit = ml.extrapolate_moment(spectra, k)
            print(f"m{k}: n → ∞ fit {fit.limit:.4g} ± {fit.stderr:.2g} (limit {law.moment(k):.4g})")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tanh_critical.png"
    title = f"tanh MLP at criticality, depth {args.depth}: JJᵀ from hidden layer 1 to {args.depth}"
    ml.plot_spectrum(law, spectra, path, title=title)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
