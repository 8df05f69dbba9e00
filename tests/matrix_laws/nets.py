"""MLPs for the Jacobian-law tests, initializations stated in code, and the critical line."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import optimize
from torch import nn

D_IN = 5


class MLP(nn.Module):
    """``depth`` hidden layers of width n; weights N(0, σ_w²/fan_in) (or σ_w·Haar-orthogonal
    between hidden layers), biases N(0, σ_b²); scalar readout."""

    def __init__(self, n: int, act: nn.Module | None, depth: int, sw2: float, sb2: float = 0.0,
                 orthogonal: bool = False):
        super().__init__()
        self.act = act if act is not None else nn.Identity()
        sizes = [D_IN] + [n] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.readout = nn.Linear(n, 1)
        for i, m in enumerate(self.layers):
            if orthogonal and i > 0:
                nn.init.orthogonal_(m.weight, gain=math.sqrt(sw2))
            else:
                nn.init.normal_(m.weight, std=math.sqrt(sw2 / m.in_features))
            if sb2 > 0:
                nn.init.normal_(m.bias, std=math.sqrt(sb2))
            else:
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.readout.weight, std=1 / math.sqrt(n))
        nn.init.zeros_(self.readout.bias)

    def forward(self, x):
        for m in self.layers:
            x = self.act(m(x))
        return self.readout(x)


class Erf(nn.Module):
    def forward(self, x):
        return torch.erf(x)


ACTS = {"tanh": nn.Tanh, "erf": Erf, "relu": nn.ReLU}

_T, _W = np.polynomial.hermite_e.hermegauss(200)
_W = _W / _W.sum()


def _gauss(f, q: float) -> float:
    return float(np.sum(_W * f(math.sqrt(q) * _T)))


_NP = {
    "tanh": (np.tanh, lambda h: 1 / np.cosh(h) ** 2),
    "erf": (lambda h: np.vectorize(math.erf)(h), lambda h: 2 / math.sqrt(math.pi) * np.exp(-h * h)),
}


def critical(act: str, sb2: float) -> tuple[float, float]:
    """``(σ_w², q*)`` on the critical line at bias variance σ_b²: the fixed point
    ``q* = σ_w² E[φ(√q* z)²] + σ_b²`` with ``χ = σ_w² E[φ'(√q* z)²] = 1`` (independent
    quadrature here, not the library's)."""
    if act == "relu":
        return 2.0, float("nan")
    phi, dphi = _NP[act]

    def chi_minus_one(q):
        sw2 = (q - sb2) / _gauss(lambda h: phi(h) ** 2, q)
        return sw2 * _gauss(lambda h: dphi(h) ** 2, q) - 1

    q = optimize.brentq(chi_minus_one, sb2 + 1e-9, 50.0, xtol=1e-14)
    return (q - sb2) / _gauss(lambda h: phi(h) ** 2, q), q


def input_with_q1(q1: float, sw2: float, sb2: float) -> torch.Tensor:
    """An input whose first preactivation variance is ``σ_w²|x|²/d + σ_b² = q1``."""
    x = torch.ones(1, D_IN, dtype=torch.float64)
    return x * math.sqrt((q1 - sb2) / sw2)
