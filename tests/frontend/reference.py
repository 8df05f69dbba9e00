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


def erf_rnn_nngp(X: np.ndarray, sw2: float, su2: float, sb2: float, sv2: float, svb2: float) -> np.ndarray:
    """NNGP of h_t = erf(W h_{t-1} + U x_t + b), h_0 = 0, read out from h_T (TP I's RNN
    example): a recursion over pairs of (example, time).

    X: [N, T, d]. Var(W_ij) = sw2/n, Var(U_ij) = su2/d, Var(b_i) = sb2, readout
    Var(V_ij) = sv2/n with bias variance svb2. Returns [N, N].
    """
    N, T, d = X.shape
    # E[h_t^i h_t^j]: g_t = W h_{t-1} + U x_t + b depends on h_{t-1} alone, so a readout of
    # h_T needs only equal-time pairs (unequal-time ones enter a mean-over-time readout).
    H = np.zeros((N, N))
    for t in range(T):
        G = sw2 * H + su2 / d * X[:, t] @ X[:, t].T + sb2
        H = apply_pair(G, erf_pair)
    return sv2 * H + svb2
