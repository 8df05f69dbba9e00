"""Jacobian laws of MLPs: the free-probability limit against the real PyTorch model's
finite-width Jacobians (exact, torch.func), closed forms where they exist, and the
Master Theorem on a Netsor⊤ program."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from tensorprograms import matrix_laws as ml

from .nets import ACTS, MLP, critical, input_with_q1

ALPHA = 1e-3  # two-sided level of each moment's check against its extrapolated limit


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


def _check_against_finite_width(act, depth, sw2, widths, seeds, ks_widths=None):
    """KS falls along ``ks_widths`` (default: all widths; the same number of nets at each, the
    fewest any width has, so the pool of eigenvalues grows with n only) and each of the first
    four moments' n → ∞ extrapolation (a + b/n over the widths, :func:`ml.extrapolate_moment`)
    agrees with the law within Student's t at two-sided level ALPHA on its
    Welch–Satterthwaite degrees of freedom (the widths' standard errors are estimated from
    few seeds)."""
    factory, x = _setup(act, depth, sw2)
    law = ml.jacobian_spectrum(factory, x)
    spectra = ml.empirical(factory, x, widths, seeds=seeds, law=law, progress=False)
    nets = min(sp.seeds for sp in spectra)
    by_width = {sp.width: ml.EmpiricalSpectrum(sp.width, sp.eigenvalues[:nets]) for sp in spectra}
    ks = [by_width[n].ks(law) for n in (ks_widths or widths)]
    print(f"{act} depth {depth} σ_w²={sw2}: widths {ks_widths or widths} KS {[round(k, 5) for k in ks]}")
    assert all(b < a for a, b in zip(ks, ks[1:])), ks
    for k in range(1, 5):
        fit = ml.extrapolate_moment(spectra, k)
        z = (fit.limit - law.moment(k)) / fit.stderr
        bound = stats.t.ppf(1 - ALPHA / 2, fit.stderr_dof)
        print(f"  m{k}: limit {law.moment(k):.6g}, fit {fit.limit:.6g} ± {fit.stderr:.2g} (z {z:+.2f}, "
              f"bound {bound:.2f}), b/n at n={widths[-1]}: {fit.slope / widths[-1]:+.3g}, "
              f"χ² {fit.chi2:.2f} on {fit.dof}")
        assert abs(z) < bound, (k, fit, law.moment(k))
    return law, ks


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_critical_mlp_spectrum_matches_finite_width(act):
    """Depth 3 on the critical line (χ = 1): m_1 = Π χ_l = 1 exactly; the KS distance falls
    from n = 64 to 256 and the first four moments' extrapolations agree with the law."""
    law, _ = _check_against_finite_width(act, 3, None, [64, 128, 256], seeds=[16, 8, 8])
    assert law.moment(1) == pytest.approx(1.0, rel=1e-10)


def test_erf_off_critical_spectrum_matches_finite_width():
    _check_against_finite_width("erf", 3, 2.5, [64, 128, 256], seeds=[16, 8, 8])


def test_relu_law_has_half_its_mass_at_zero():
    factory, x = _setup("relu", 3)
    law = ml.jacobian_spectrum(factory, x)
    # free product: the largest kernel, D²'s (φ' = 0 half the time); the quadrature weights of
    # a half-line sum to 1/2 up to rounding
    assert law.atom[0] == 0.0 and law.atom[1] == pytest.approx(0.5, abs=1e-15)


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


@pytest.mark.parametrize("act, depth, start, sw2", [
    ("tanh", 3, 1, 1.5),  # one layer (J = D W), the case that was 2 % off at m₃
    ("tanh", 4, 0, None),  # three layers on the critical line
    ("erf", 3, 0, 2.5),  # two layers, far from criticality
    ("relu", 3, 0, None),  # D² = step: kinks through every Ż coefficient
])
def test_master_theorem_moments_equal_the_free_product(act, depth, start, sw2):
    """The Netsor⊤ program with the real forward pass (no freeness assumed; TP IV's Ż carries
    the D's dependence on the W's) gives the free product's moments m₁…m₆, deterministically
    (stderr 0): measured ≤ 1.1e-12 relative, so 1e-10 leaves room for rounding only."""
    factory, x = _setup(act, depth, sw2)
    law = ml.jacobian_spectrum(factory, x, start=start)
    values, stderr = ml.master_theorem_moments(law, 6)
    np.testing.assert_allclose(values, law.moments(6), rtol=1e-10)
    assert (stderr == 0).all()


def test_master_theorem_moments_monte_carlo_error_is_honest():
    """Forced Monte Carlo (every expectation, the Stein coefficients' too): the standard error
    is over independent solutions of the whole program, so it covers the noise that the
    engine's per-expectation errors leave out. 8 replicas: Student t with 7 degrees of
    freedom, two-sided 1e-3 level per moment (5.41)."""
    factory, x = _setup("tanh", 3, 1.5)
    law = ml.jacobian_spectrum(factory, x, start=1)
    values, stderr = ml.master_theorem_moments(law, 3, replicas=8, backend="monte_carlo")
    assert (stderr[2:] > 0).all()
    z = (values - law.moments(3)) / np.where(stderr > 0, stderr, 1.0)
    assert np.abs(z).max() < 5.41, (values, stderr, law.moments(3))
    with pytest.raises(ValueError, match="replicas must be at least 2"):
        ml.master_theorem_moments(law, 3, replicas=1, backend="monte_carlo")


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
    with pytest.raises(ValueError, match="one per width"):
        ml.empirical(factory, x, [16, 32], seeds=[2])
    spectra = [ml.EmpiricalSpectrum(n, np.ones((3, n))) for n in (16, 32)]
    with pytest.raises(ValueError, match="at least 3 widths"):
        ml.extrapolate_moment(spectra, 1)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        ml.extrapolate_moment(spectra + [ml.EmpiricalSpectrum(64, np.ones((1, 64)))], 1)


def test_extrapolate_moment_recovers_an_exact_a_plus_b_over_n():
    """Two nets per width whose first moments are a + b/n ± δ_n: the fit returns a and b to
    rounding, χ² = 0, and the intercept's standard error of numpy's weighted polyfit."""
    a, b = 1.7, -3.0
    widths, deltas = [100, 200, 400, 800], [0.3, 0.2, 0.1, 0.08]
    spectra = [ml.EmpiricalSpectrum(n, np.stack([np.full(n, a + b / n + d), np.full(n, a + b / n - d)]))
               for n, d in zip(widths, deltas)]
    fit = ml.extrapolate_moment(spectra, 1)
    assert fit.limit == pytest.approx(a, rel=1e-12) and fit.slope == pytest.approx(b, rel=1e-10)
    assert fit.chi2 == pytest.approx(0, abs=1e-20) and fit.dof == 2
    inv_n = 1 / np.array(widths, dtype=float)
    y = a + b * inv_n
    _, cov = np.polyfit(inv_n, y, 1, w=1 / np.array(deltas), cov="unscaled")
    assert fit.stderr == pytest.approx(np.sqrt(cov[1, 1]), rel=1e-10)
    assert 1 <= fit.stderr_dof <= 4  # one degree of freedom per width's error


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
    _check_against_finite_width(act, depth, sw2, [2**7, 2**8, 2**9, 2**10, 2**11], seeds=[32, 16, 16, 8, 6],
                                ks_widths=[2**7, 2**9, 2**11])
