"""Textbook kernel formulas, written independently of the library (numpy, scipy)."""

from __future__ import annotations

import math

import numpy as np


def relu_pair(a: float, b: float, c: float) -> float:
    """E[relu(u) relu(v)], Var u = a, Var v = b, Cov = c (Cho & Saul 2009, order 1)."""
    rho = min(1.0, max(-1.0, c / math.sqrt(a * b)))
    t = math.acos(rho)
    return math.sqrt(a * b) / (2 * math.pi) * (math.sin(t) + (math.pi - t) * math.cos(t))


def erf_pair(a: float, b: float, c: float) -> float:
    """E[erf(u) erf(v)] (Williams 1997)."""
    return 2 / math.pi * math.asin(2 * c / math.sqrt((1 + 2 * a) * (1 + 2 * b)))


def apply_pair(K: np.ndarray, pair) -> np.ndarray:
    out = np.empty_like(K)
    for i in range(len(K)):
        for j in range(len(K)):
            out[i, j] = pair(K[i, i], K[j, j], K[i, j])
    return out
