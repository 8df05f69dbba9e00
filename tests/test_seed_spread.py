"""Standard errors of whole limits by independent Monte Carlo seeds (tp.master.over_seeds,
``limit.nngp(x, stderr=True)``): a program whose last expectation is quadrature on top of
a Monte Carlo one, with a known answer; the engine's per-expectation error misses the
propagated error, the seed spread does not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tensorprograms as tp
from tensorprograms.master import over_seeds

Z = 4.5


def _program():
    """y = a·b·c·d of four independent N(0, 1) vectors (a 4-D expectation: Monte Carlo,
    E[y²] = 1 exactly), then z = tanh(W y) with σ_W² = 2: E[z²] = E[tanh(g)²], g ~ N(0, 2),
    a 1-D quadrature whose own error is 0 but whose input covariance is Monte Carlo."""
    P = tp.Program()
    xs = [P.vector(name) for name in "abcd"]
    y = P.nonlin(lambda a, b, c, d: a * b * c * d, *xs)
    W = P.matrix("W", variance=2.0)
    z = P.nonlin(torch.tanh, W @ y)
    return P, z


def _tanh_second_moment(variance: float) -> float:
    """E[tanh(g)²], g ~ N(0, variance), by 150-point Gauss–Hermite (numpy, independent)."""
    t, w = np.polynomial.hermite.hermgauss(150)
    return float((w * np.tanh(np.sqrt(2 * variance) * t) ** 2).sum() / math.sqrt(math.pi))


def test_seed_spread_covers_the_propagated_error():
    P, z = _program()
    truth = _tanh_second_moment(2.0)

    def compute(engine):
        return engine(P).second_moment(z)

    engine = tp.master_theorem(P, mc_samples=2**10)
    engine.second_moment(z)
    assert tp.master.used_monte_carlo(engine)
    assert float(engine.stderr(z)) == 0.0  # the last expectation is quadrature: no error of its own
    zs = []
    for block in range(12):  # disjoint blocks of 8 seeds: 12 independent (mean, SE) pairs
        mean, se = over_seeds(compute, 8, start=8 * block, mc_samples=2**10)
        assert se > 0
        zs.append(float((mean - truth) / se))
    zs = np.array(zs)
    assert np.abs(zs).max() < Z, zs
    # calibrated: a t-statistic with 7 d.o.f. has E[t²] = 1.4; an SE too small by 3× would
    # give an RMS ≈ 3.5, one too large by 3× ≈ 0.4 (the bounds hold with prob. > 0.99)
    rms = float(np.sqrt((zs**2).mean()))
    assert 0.45 < rms < 2.2, zs


def test_limit_without_monte_carlo_has_zero_stderr():
    def mlp(n):
        return tp.init.normal_(torch.nn.Sequential(torch.nn.Linear(6, n), torch.nn.ReLU(),
                                                   torch.nn.Linear(n, 4)), 2.0, 0.1)

    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    limit = tp.infinite_width(mlp, x)
    K, se = limit.nngp(x, stderr=True)
    torch.testing.assert_close(K, limit.nngp(x), rtol=0, atol=0)
    assert torch.equal(se, torch.zeros_like(se))
    (K2, theta), (se_k, se_t) = limit.kernels(x, stderr=True, seeds=3)
    torch.testing.assert_close(theta, limit.ntk(x), rtol=0, atol=0)
    assert torch.equal(se_t, torch.zeros_like(se_t))


def test_over_seeds_argument_errors():
    P, z = _program()
    with pytest.raises(ValueError, match="seeds must be an integer ≥ 2"):
        over_seeds(lambda e: e(P).second_moment(z), 1)
    with pytest.raises(ValueError, match="start="):
        over_seeds(lambda e: e(P).second_moment(z), 4, seed=3)


def test_limit_seeds_without_stderr_is_an_error():
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    limit = tp.infinite_width(lambda n: torch.nn.Sequential(torch.nn.Linear(6, n), torch.nn.Tanh(),
                                                            torch.nn.Linear(n, 1)), x)
    for call in (limit.nngp, limit.ntk, limit.kernels):
        with pytest.raises(ValueError, match="only applies with stderr=True"):
            call(x, seeds=4)
    with pytest.raises(ValueError, match="seeds must be an integer ≥ 2"):
        limit.nngp(x, stderr=True, seeds=0)
