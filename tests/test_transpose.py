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


def noncrossing_partitions(k: int) -> list[list[list[int]]]:
    """The non-crossing partitions of {0, …, k−1} (enumerated, then filtered)."""

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for p in partitions(rest):
            for i in range(len(p)):
                yield p[:i] + [[first] + p[i]] + p[i + 1:]
            yield [[first]] + p

    def crossing(p):
        for a in p:
            for b in p:
                if a is not b and any(i < j < m < l for i in a for m in a for j in b for l in b):
                    return True
        return False

    return [p for p in partitions(list(range(k))) if not crossing(p)]


def free_poisson_moment(k: int, sigma2: float, d_moment) -> float:
    """``(1/n) tr (Wᵀ D W)^k`` for W with iid N(0, σ²/n) entries and D free from W with
    moments ``d_moment(j)``: ``σ^{2k} Σ_{π ∈ NC(k)} Π_{V ∈ π} m_{|V|}(D)`` (free cumulants of
    the free Poisson law are all 1)."""
    return sigma2**k * sum(math.prod(d_moment(len(b)) for b in p) for p in noncrossing_partitions(k))


def _jacobian_program(order: int, sigma2: float, square):
    """v ↦ (Wᵀ D² W)^k v with D² = square(P, g) a function of g = W x0: the same W in the forward
    pass and in both directions of the Jacobian (TP IV's Ż carries every correlation)."""
    P = tp.Program()
    x0 = P.vector("x0", variance=1.2)
    W = P.matrix("W", variance=sigma2)
    g = W @ x0
    d2 = square(P, g)
    v = P.vector("v")
    powers, y = [], v
    for _ in range(order):
        y = W.T @ P.nonlin(tp.functions.product, d2, W @ y)
        powers.append(y)
    return P, v, powers


def test_jacobian_with_a_kinked_derivative_of_the_same_matrix_is_exact():
    """D² = step(W x0) (ReLU's φ'², a function of the same W): D² is Bernoulli(1/2) and free
    from W (TP III), so m_k = σ^{2k} Σ_j N(k, j) 2^{-j} (Narayana). The Ż coefficients pass
    through the kink; every expectation is quadrature over the kinked G-var times an exact
    rule over the Jacobian's Gaussian directions (by order 8, 9 of them). Monte Carlo over
    those directions was 2 % off by order 3 with a standard error that ignored the Stein
    coefficients' noise."""
    P, v, powers = _jacobian_program(8, 1.3, lambda P, g: P.nonlin(tp.functions.step, g))
    L = tp.master_theorem(P)
    for k, y in enumerate(powers, 1):
        expected = free_poisson_moment(k, 1.3, lambda j: 0.5)
        assert math.isclose(L.second_moment(v, y).item(), expected, rel_tol=1e-11), k
        assert L.stderr(v, y).item() == 0.0
        # the partition sum is the Narayana polynomial at 1/2 (a check of the enumeration)
        assert math.isclose(expected, 1.3**k * narayana_moment(k, 0.5), rel_tol=1e-14)


def test_jacobian_with_a_polynomial_derivative_of_the_same_matrix_is_exact():
    """D² = g² for g = W x0 (φ(h) = h²/2): Z^x depends polynomially on the Ẑ of the forward
    pass through D, and the moments are the free Poisson ones with D²'s Gaussian moments
    E[g^{2j}] = (2j−1)!! s^j, s = σ²·1.2."""
    sigma2 = 0.8
    s = sigma2 * 1.2
    P, v, powers = _jacobian_program(3, sigma2, lambda P, g: P.nonlin(tp.functions.product, g, g))
    L = tp.master_theorem(P)
    for k, y in enumerate(powers, 1):
        expected = free_poisson_moment(k, sigma2, lambda j: math.prod(range(1, 2 * j, 2)) * s**j)
        assert math.isclose(L.second_moment(v, y).item(), expected, rel_tol=1e-11), k


def test_nonlinear_jacobian_power_matches_finite_width():
    """tanh: D² = tanh'(W x0 + b)², (JᵀJ)³ v. The limit against tp.simulate (which runs W and
    W.T literally) at n = 128, 512, 2048: the error is within the seeds' standard error at
    the largest width and falls with n."""
    P = tp.Program()
    x0, b = P.vector("x0"), P.vector("b", variance=0.05)
    W = P.matrix("W", variance=1.5)
    g = P.lincomb([1.0, 1.0], [W @ x0, b])
    d2 = P.nonlin(lambda u: (1 - torch.tanh(u) ** 2) ** 2, g)
    v = P.vector("v")
    y = v
    for _ in range(3):
        y = W.T @ P.nonlin(tp.functions.product, d2, W @ y)
    m3 = P.moment(lambda a, c: a * c, v, y, name="m3")
    limit = tp.master_theorem(P).value(m3).item()
    seeds = 16
    errors = []
    for n in (128, 512, 2048):
        runs = torch.tensor([tp.simulate(P, n, seed=s)[m3].item() for s in range(seeds)])
        errors.append((runs.mean().item() - limit, runs.std().item() / math.sqrt(seeds)))
    (_, se_small), _, (err, se) = errors
    assert abs(err) < 4 * se, errors
    assert se < se_small / 2.5, errors  # the spread falls like n^(-1/2): 4× here
