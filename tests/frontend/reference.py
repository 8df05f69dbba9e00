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



def infinite_heads_attention(Kh: np.ndarray, positions: int, head_dim: int, sqk2: float, sv2: float,
                             so2: float, causal: bool = False, samples: int = 200_000, seed: int = 0,
                             chunk: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """Covariance of ``nn.MultiheadAttention(n, n // head_dim)`` self-attention outputs as
    n → ∞ with the head dimension fixed (Hron et al. 2020), by Monte Carlo over one head.

    Kh: ``[N·T, N·T]`` covariance of the attention input over (example, position) pairs,
    example-major (``T = positions``). Per head the query and key coordinates are
    ``head_dim`` iid draws of ``N(0, sqk2·Kh)`` (independent W_Q, W_K with entry variance
    ``sqk2/n``); logits ``q·kᵀ/√head_dim``; softmax over the keys of the same example
    (causal: keys ≤ query). Values are independent of the logits, so
    ``E[o o'] = E_logits[a K_v a'ᵀ]`` with ``K_v = sv2·Kh``; the output projection (entry
    variance ``so2/n``) averages over the n/head_dim iid heads, so the result is ``so2``
    times that expectation. Returns ``(mean, stderr)``, both ``[N·T, N·T]``; stderr over the
    iid heads sampled.
    """
    M = Kh.shape[0]
    N, T = M // positions, positions
    L = np.linalg.cholesky(sqk2 * Kh + 1e-12 * np.eye(M))
    Kv = (sv2 * Kh).reshape(N, T, N, T)
    mask = np.triu(np.ones((T, T), dtype=bool), 1)
    rng = np.random.default_rng(seed)
    total = np.zeros((M, M))
    total2 = np.zeros((M, M))
    for _ in range(samples // chunk):
        q, k = (np.einsum("ij,sjc->sic", L, rng.standard_normal((chunk, M, head_dim)))
                .reshape(chunk, N, T, head_dim) for _ in range(2))
        logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)  # [S, N, T, T]
        if causal:
            logits = np.where(mask, -np.inf, logits)
        a = np.exp(logits - logits.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        k_s = so2 * np.einsum("sxta,xayb,syub->sxtyu", a, Kv, a, optimize=True).reshape(chunk, M, M)
        total += k_s.sum(0)
        total2 += (k_s ** 2).sum(0)
    count = (samples // chunk) * chunk
    mean = total / count
    return mean, np.sqrt(np.maximum(total2 / count - mean ** 2, 0.0) / count)
