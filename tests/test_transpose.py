"""Netsor⊤ (TP IV): Z^{Wx} = Ẑ^{Wx} + Ż^{Wx}. Linear programs are Gram computations, so the
random-matrix laws come out exactly; nonlinear ones are checked against finite width."""

from __future__ import annotations

import math
from math import comb

import pytest
import torch

import tensorprograms as tp


def catalan(k: int) -> int:
    return comb(2 * k, k) // (k + 1)


def narayana_moment(k: int, c: float) -> float:
    """k-th moment of Marchenko–Pastur for WᵀW, W of shape cn × n with N(0, 1/n) entries."""
    return sum(comb(k, j) * comb(k, j - 1) // k * c**j for j in range(1, k + 1))


def test_semicircle_moments_are_catalan_numbers():
    """A = (W + Wᵀ)/√2 is a Wigner matrix: E[Z^x Z^{A^k x}] = Catalan(k/2), 0 for odd k."""
    P = tp.Program()
    x = P.vector("x")
    W = P.matrix("W")
    powers, v = [], x
    for k in range(1, 11):
        v = P.lincomb([2**-0.5, 2**-0.5], [W @ v, W.T @ v], name=f"A{k}x")
        powers.append(v)
    assert P.language == "netsor_transpose"
    L = tp.master_theorem(P)
    for k, v in enumerate(powers, 1):
        expected = catalan(k // 2) if k % 2 == 0 else 0.0
        assert math.isclose(L.second_moment(x, v).item(), expected, rel_tol=1e-10, abs_tol=1e-10)


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_marchenko_pastur_moments_are_narayana_polynomials(c):
    P = tp.Program()
    x = P.vector("x")
    W = P.matrix("W", out_ratio=c)  # cn × n, entries N(0, 1/n)
    powers, v = [], x
    for _ in range(6):
        v = W.T @ (W @ v)
        powers.append(v)
    L = tp.master_theorem(P)
    for k, v in enumerate(powers, 1):
        assert math.isclose(L.second_moment(x, v).item(), narayana_moment(k, c), rel_tol=1e-10)


def test_nonlinear_netsor_transpose_matches_finite_width():
    """h = Wx, u = Wᵀ tanh(h), g = W relu(u): W and Wᵀ correlated (no gradient
    independence), a Moment mixing g and h. Finite-width average over seeds vs the limit,
    tolerance from both standard errors (the limit's Monte Carlo and the seeds')."""
    P = tp.Program()
    x = P.vector("x", shape=(2,), cov=torch.tensor([[1.0, 0.4], [0.4, 1.5]]))
    W = P.matrix("W", variance=1.5)
    h = W @ x
    u = W.T @ P.nonlin(torch.tanh, h)
    g = W @ P.nonlin(torch.relu, u)
    t = P.moment(lambda a, b: a * b, g, h, name="t")
    L = tp.master_theorem(P, mc_samples=2**18, seed=3)
    K, se_K = L.second_moment(g), L.stderr(g)
    T, se_T = L.value(t), L.stderr(t)
    seeds = 48
    runs = [tp.simulate(P, 2048, seed=s) for s in range(seeds)]
    Ks = torch.stack([r.second_moment(g) for r in runs])
    Ts = torch.stack([r[t] for r in runs])
    zK = (Ks.mean(0) - K).abs() / (se_K**2 + Ks.var(0) / seeds).sqrt()
    zT = (Ts.mean(0) - T).abs() / (se_T**2 + Ts.var(0) / seeds).sqrt()
    assert zK.max() < 4.5 and zT.max() < 4.5, (zK.max(), zT.max())
    # and W, Wᵀ are not independent here: gradient independence would give another value
    P2 = tp.Program()
    x2 = P2.vector("x", shape=(2,), cov=torch.tensor([[1.0, 0.4], [0.4, 1.5]]))
    W2, V2 = P2.matrix("W", variance=1.5), P2.matrix("V", variance=1.5)
    g2 = W2 @ P2.nonlin(torch.relu, V2.T @ P2.nonlin(torch.tanh, W2 @ x2))
    t2 = P2.moment(lambda a, b: a * b, g2, W2 @ x2)
    independent = tp.master_theorem(P2).value(t2)
    assert ((independent - T).abs() > 10 * se_T).any()


def test_transposed_program_limits_are_reported_on_the_original_variables():
    P = tp.Program()
    x = P.vector("x")
    W = P.matrix("W")
    y = W.T @ (W @ x)
    L = tp.master_theorem(P)
    assert L.source is P
    torch.testing.assert_close(L.cov(y), torch.tensor(2.0), rtol=1e-12, atol=0)  # 1 + c, c = 1
    assert L.sample(y, 10).shape == (10,)
