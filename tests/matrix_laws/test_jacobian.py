"""Jacobian laws of MLPs: the free-probability limit against the real PyTorch model's
finite-width Jacobians (exact, torch.func), closed forms where they exist, and the
Master Theorem on a Netsor⊤ program."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tensorprograms import matrix_laws as ml

from .nets import ACTS, MLP, critical, input_with_q1

Z_MAX = 4.0  # four moments, each a z-score against its finite-width standard error


def _setup(act: str, depth: int, sw2: float | None = None, sb2: float = 0.05):
    """The factory and input: on the critical line (sw2=None, input at the fixed point q*)
    or at a given σ_w² (input with q_1 = 1)."""
    sb2 = 0.0 if act == "relu" else sb2
    if sw2 is None:
        sw2, q = critical(act, sb2)
        q = 1.0 if act == "relu" else q
    else:
        q = 1.0
    x = input_with_q1(q, sw2, sb2)
    return (lambda n: MLP(n, ACTS[act](), depth, sw2, sb2)), x


def _check_against_finite_width(act, depth, sw2, widths, seeds):
    factory, x = _setup(act, depth, sw2)
    law = ml.jacobian_spectrum(factory, x)
    spectra = ml.empirical(factory, x, widths, seeds=seeds, law=law, progress=False)
    ks = [sp.ks(law) for sp in spectra]
    print(f"{act} depth {depth} σ_w²={sw2}: widths {widths} KS {[round(k, 5) for k in ks]}")
    assert all(b < a for a, b in zip(ks, ks[1:])), ks
    big = spectra[-1]
    for k in range(1, 5):
        mean, se = big.moment(k)
        z = (mean - law.moment(k)) / se
        assert abs(z) < Z_MAX, (k, mean, law.moment(k), se)
    return law, ks


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_critical_mlp_spectrum_matches_finite_width(act):
    """Depth 3 on the critical line (χ = 1): m_1 = Π χ_l = 1 exactly; the KS distance falls
    from n = 64 to 256 and the first four moments agree within the standard error."""
    law, _ = _check_against_finite_width(act, 3, None, [64, 256], seeds=4)
    assert law.moment(1) == pytest.approx(1.0, rel=1e-10)


def test_erf_off_critical_spectrum_matches_finite_width():
    _check_against_finite_width("erf", 3, 2.5, [64, 256], seeds=4)


def test_relu_law_has_half_its_mass_at_zero():
    factory, x = _setup("relu", 3)
    law = ml.jacobian_spectrum(factory, x)
    assert law.atom == (0.0, 0.5)  # free product: the largest kernel, D²'s (φ' = 0 half the time)


def test_deep_linear_networks_gaussian_versus_orthogonal():
    """Identity activation, 4 hidden layers (3 width × width matrices between the first and
    last hidden layers). Orthogonal weights: every squared singular value is exactly σ_w^6
    (dynamical isometry at σ_w = 1). Gaussian weights: the Fuss–Catalan law with s = 3."""
    x = input_with_q1(1.0, 1.0, 0.0)
    ortho = lambda n: MLP(n, None, 4, 1.0, orthogonal=True)  # noqa: E731
    law = ml.jacobian_spectrum(ortho, x)
    assert law.weights == ["orthogonal"] * 3
    assert law.support() == (1.0, 1.0) and law.atom == (1.0, 1.0)
    (sp,) = ml.empirical(ortho, x, [96], seeds=2, law=law, progress=False)
    np.testing.assert_allclose(sp.eigenvalues, 1.0, rtol=1e-10)

    gauss = lambda n: MLP(n, None, 4, 1.0)  # noqa: E731
    law = ml.jacobian_spectrum(gauss, x)
    np.testing.assert_allclose(law.moments(8), [math.comb(4 * k, k) / (3 * k + 1) for k in range(1, 9)],
                               rtol=1e-10)
    assert law.support()[1] == pytest.approx(4**4 / 3**3, rel=1e-4)
    (sp,) = ml.empirical(gauss, x, [96], seeds=2, law=law, progress=False)
    assert sp.eigenvalues.std() > 1.0  # far from isometry: Fuss–Catalan variance is 12 − 1 = 11


def test_orthogonal_nonlinear_uses_the_constant_factor():
    """tanh with orthogonal weights: S_{WᵀW} = 1/σ_w², so m_1 = Π σ_w² E[φ'(h_l)²] as for
    Gaussian weights, but the variance is smaller (no Marchenko–Pastur spread)."""
    sw2, q = critical("tanh", 0.05)
    x = input_with_q1(q, sw2, 0.05)
    orth = ml.jacobian_spectrum(lambda n: MLP(n, torch.nn.Tanh(), 3, sw2, 0.05, orthogonal=True), x)
    gauss = ml.jacobian_spectrum(lambda n: MLP(n, torch.nn.Tanh(), 3, sw2, 0.05), x)
    assert orth.moment(1) == pytest.approx(gauss.moment(1), rel=1e-12)
    assert orth.moment(2) < gauss.moment(2)


def test_master_theorem_moments_cross_check():
    """The Netsor⊤ program with the real forward pass (no freeness assumed) gives the free
    product's first two moments (to the engine's quadrature error)."""
    factory, x = _setup("tanh", 3, 1.5)
    law = ml.jacobian_spectrum(factory, x, start=1)
    values, _ = ml.master_theorem_moments(law, 2)
    np.testing.assert_allclose(values, law.moments(2), rtol=2e-5)


def test_layer_selection_and_bad_inputs():
    factory, x = _setup("tanh", 3, 1.5)
    law = ml.jacobian_spectrum(factory, x, start=0, end=1)
    assert law.start == 0 and law.end == 1 and len(law.factors) == 2
    with pytest.raises(ValueError, match="start < end"):
        ml.jacobian_spectrum(factory, x, start=2, end=1)
    with pytest.raises(ValueError, match="one input"):
        ml.jacobian_spectrum(factory, torch.ones(2, 5))
    with pytest.raises(ValueError, match="weights must be one of"):
        ml.jacobian_spectrum(factory, x, weights="uniform")
    with pytest.raises(ValueError, match="at least two hidden layers"):
        ml.jacobian_spectrum(lambda n: MLP(n, torch.nn.Tanh(), 1, 1.5), x)
    with pytest.raises(ValueError, match="widths"):
        ml.empirical(factory, x, [], seeds=2)


class Skip(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(5, n), torch.nn.Linear(n, n), torch.nn.Linear(n, n)
        self.out = torch.nn.Linear(n, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        g = torch.tanh(self.b(h))
        return self.out(torch.tanh(self.c(g) + h))


def test_non_mlp_is_rejected_with_the_reason():
    with pytest.raises(ValueError, match="not an elementwise activation"):
        ml.jacobian_spectrum(Skip, torch.ones(1, 5))


@pytest.mark.slow
@pytest.mark.parametrize("act", ["tanh", "erf", "relu"])
@pytest.mark.parametrize("depth", [3, 5])
@pytest.mark.parametrize("sw2", [None, 2.5])
def test_spectrum_converges_from_2_7_to_2_11(act, depth, sw2):
    _check_against_finite_width(act, depth, sw2, [2**7, 2**9, 2**11], seeds=4)
