"""The classical laws: Master-Theorem moments of hand-written Netsor⊤ programs equal the
closed forms (Catalan, Narayana, Fuss–Catalan) to order 10 in float64; the free-probability
solver reproduces the closed-form densities, edges and moments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tensorprograms import matrix_laws as ml
from tensorprograms.matrix_laws import examples, free

ORDER = 10
RTOL = 1e-10  # float64 Gram computations: rounding only


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("variance", [1.0, 0.7])
def test_wigner_program_moments_are_catalan_numbers(variance):
    P, x, powers = examples.wigner_program(ORDER, variance)
    want = [math.comb(k, k // 2) / (k // 2 + 1) * variance ** (k // 2) if k % 2 == 0 else 0.0
            for k in range(1, ORDER + 1)]
    _close(examples.program_moments(P, x, powers), want)
    _close(ml.semicircle(variance).moments(ORDER), want)


@pytest.mark.parametrize("ratio", [0.3, 1.0, 2.5])
def test_marchenko_pastur_program_moments_are_narayana_polynomials(ratio):
    variance = 1.3
    P, x, powers = examples.marchenko_pastur_program(ORDER, ratio, variance)
    # Σ_j N(k, j) c^j written out independently of the library's helper
    want = [variance**k * sum(math.comb(k, j) * math.comb(k, j - 1) / k * ratio**j
                              for j in range(1, k + 1)) for k in range(1, ORDER + 1)]
    _close(examples.program_moments(P, x, powers), want)
    _close(ml.marchenko_pastur(ratio, variance).moments(ORDER), want)


@pytest.mark.parametrize("s", [2, 3])
def test_product_program_moments_are_fuss_catalan_numbers(s):
    P, x, powers = examples.product_program(ORDER, s)
    want = [math.comb((s + 1) * k, k) / (s * k + 1) for k in range(1, ORDER + 1)]
    _close(examples.program_moments(P, x, powers), want)
    _close(ml.fuss_catalan_law(s).moments(ORDER), want)
    # the S-transform series of the free product of s MP laws gives the same numbers
    _close(free.product_moments([free.Factor("marchenko_pastur", 1.0)] * s, ORDER), want)


def test_free_solver_density_is_the_marchenko_pastur_density():
    x = np.linspace(0.05, 3.95, 40)
    solved = ml.free_product([free.Factor("marchenko_pastur", 1.0)]).density(x)
    np.testing.assert_allclose(solved, ml.marchenko_pastur(1.0).density(x), rtol=1e-7)


def test_fuss_catalan_edge_and_moments_from_the_density():
    law = ml.free_product([free.Factor("marchenko_pastur", 1.0)] * 2)
    lo, hi = law.support()
    assert lo == 0.0
    assert abs(hi - 27 / 4) < 1e-5 * 27 / 4  # (s+1)^(s+1)/s^s; scan resolution ~1e-6
    t = np.linspace(0, hi, 20001)[1:]
    rho = law.density(t)
    for k, want in ((1, 1.0), (2, 3.0)):  # x^k kills the x^(-2/3) singularity at 0
        got = np.trapezoid(rho * t**k, t)
        assert abs(got - want) < 1e-4 * want, (k, got)


def test_marchenko_pastur_atom_and_edges():
    law = ml.marchenko_pastur(0.25)
    assert law.atom == (0.0, 0.75)
    lo, hi = law.support()
    assert (lo, hi) == pytest.approx((0.25, 2.25), rel=1e-15)
    assert law.cdf(np.array([hi + 1]))[0] == pytest.approx(1.0)
    assert law.cdf(np.array([1e-9]))[0] == pytest.approx(0.75)


def test_finite_wishart_spectra_approach_marchenko_pastur():
    """Eigenvalues of WᵀW at n = 100 and 800 (ratio 0.5, 4 draws each): the KS distance
    falls (it is O(1/n) for rigid eigenvalues)."""
    law = ml.marchenko_pastur(0.5)
    gen = np.random.default_rng(0)
    ks = []
    for n in (100, 800):
        lam = []
        for _ in range(4):
            W = gen.standard_normal((n // 2, n)) / math.sqrt(n)
            lam.append(np.linalg.eigvalsh(W.T @ W))
        lam = np.array(lam)
        lam[lam < 1e-10] = 0.0
        ks.append(ml.EmpiricalSpectrum(n, lam).ks(law))
    assert ks[1] < ks[0] / 3, ks


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="ratio"):
        ml.marchenko_pastur(0.0)
    with pytest.raises(ValueError, match="variance"):
        ml.semicircle(-1.0)
    with pytest.raises(ValueError, match="order"):
        examples.wigner_program(0)
    with pytest.raises(ValueError, match="factors"):
        examples.product_program(3, 0)
    with pytest.raises(ValueError, match="s .the number of factors"):
        ml.fuss_catalan_law(0)
    with pytest.raises(ValueError, match="moment order"):
        ml.semicircle().moment(-1)
    with pytest.raises(ValueError, match="weights must sum to 1"):
        free.discrete([1.0, 2.0], [0.5, 0.6])
