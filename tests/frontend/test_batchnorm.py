"""BatchNorm1d/2d: training mode (batch statistics, the limit depends on the batch) and
eval mode (running statistics, affine) vs finite-width Monte Carlo of the same module.

Convention under test: ``limit.nngp(x)`` normalizes over the batch ``x``;
``limit.nngp(x1, x2)`` is the cross block of the kernel of the concatenated batch.
Tolerance Z·√(SE² + SE_engine²) as in test_recurrent.py (the engine integrates the
normalization over the batch by Monte Carlo; SE_engine from independent engine seeds).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tensorprograms as tp
from tensorprograms.empirical import ntk_mean

from .models import SB2, SW2, init_
from .reference import apply_pair, relu_pair

Z = 4.5


class BNMLP(nn.Module):
    def __init__(self, width: int, eval_mode: bool = False):
        super().__init__()
        self.l1, self.b1 = nn.Linear(4, width), nn.BatchNorm1d(width)
        self.l2, self.b2 = nn.Linear(width, width), nn.BatchNorm1d(width)
        self.out = nn.Linear(width, 32)
        init_(self)
        if eval_mode:
            self.eval()  # running statistics

    def forward(self, x):
        return self.out(torch.relu(self.b2(self.l2(torch.relu(self.b1(self.l1(x)))))))


class BNCNN(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, width, 3, padding=1), nn.BatchNorm2d(width)
        self.out = nn.Linear(width, 32)
        init_(self)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def check(factory, x):
    L = tp.infinite_width(factory, x)
    K, engine_se = L.nngp(x, stderr=True, seeds=4)
    emp = tp.empirical.nngp(factory, 1024, x, samples=24, seed=2)
    assert (engine_se < emp.stderr).all(), (engine_se, emp.stderr)
    z = ((K - emp.mean).abs() / (emp.stderr**2 + engine_se**2).sqrt()).max().item()
    assert z < Z, f"max |MC − limit| / SE = {z:.2f}\nlimit {K}\nMC {emp.mean}"
    return L, K


@pytest.fixture
def x():
    return torch.randn(4, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_batchnorm1d_training_mode_matches_monte_carlo(x):
    check(BNMLP, x)


@pytest.mark.slow
def test_batchnorm2d_training_mode_matches_monte_carlo():
    check(BNCNN, torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0)))


def test_batchnorm_limit_depends_on_the_batch(x):
    """Batch statistics: the kernel of x[:2] differs when the batch is x[:2] (nngp(x[:2]))
    and when it is all of x (the [:2, :2] block of nngp(x)). With a batch of 2 the two
    inputs' normalized pre-activations are exact negatives of each other, and their law is
    symmetric, so both have the same variance."""
    L = tp.infinite_width(BNMLP, x)
    Kall = L.nngp(x)
    Kpair = L.nngp(x[:2])
    assert (Kall[:2, :2] - Kpair).abs().max() > 0.05
    assert abs(Kpair[0, 0] - Kpair[1, 1]) < 1e-9


def test_batchnorm_eval_mode_is_affine(x):
    """Running statistics at init (mean 0, variance 1): BN(u) = u/√(1 + eps) exactly, so the
    eval-mode limit equals the limit without BatchNorm with each BN's input scaled."""

    class Scaled(BNMLP):
        def forward(self, x):
            s = (1 + 1e-5) ** -0.5
            return self.out(torch.relu(s * self.l2(torch.relu(s * self.l1(x)))))

    K = tp.infinite_width(lambda n: BNMLP(n, eval_mode=True), x).nngp(x)
    ref = tp.infinite_width(Scaled, x).nngp(x)
    torch.testing.assert_close(K, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_batchnorm_ntk_is_rejected(x):
    """Batch statistics couple the examples: the NTK is not per-example and is rejected."""
    with pytest.raises(tp.UnsupportedOperation, match="shared across the batch"):
        tp.infinite_width(BNMLP, x).ntk(x)


def test_random_batchnorm_gain_is_rejected(x):
    def factory(n):
        m = BNMLP(n)
        nn.init.normal_(m.b1.weight)
        return m

    with pytest.raises(tp.UnsupportedOperation, match="b1.weight is randomly initialized"):
        tp.infinite_width(factory, x)


# ---------------------------------------------------------------------- eval-mode NTK

def _affine_only(only: tuple[str, ...] = ("b1.", "b2.")):
    """BNMLP in eval mode with only the BatchNorm affine parameters (names starting with
    ``only``) trainable: their NTK terms alone, which the NTK parametrization weights by
    their (zero) init variance and the standard one counts."""

    def factory(n):
        m = BNMLP(n, eval_mode=True)
        for name, p in m.named_parameters():
            p.requires_grad_(name.startswith(only))
        return m

    return factory


def test_batchnorm_eval_gain_ntk_closed_form(x):
    """The second BatchNorm's gain γ (init 1) in eval mode: ∂f/∂γ_i = W_i relu'(y_i) ŷ_i with
    y = ŷ = s·u (s = 1/√(1 + eps), u its input), so its standard-parametrization NTK term is
    σ_w² E[relu(y) relu(y')]: the arc-cosine kernel of K_y = s²(σ_w² E[relu(h)relu(h')] + σ_b²),
    K_h = s²(σ_w² xxᵀ/4 + σ_b²). The same expectation holds at every width, so this is also
    the finite-width mean."""
    s2 = 1.0 / (1.0 + 1e-5)
    X = x.double().numpy()
    Kh = s2 * (SW2 * X @ X.T / 4 + SB2)
    Ky = s2 * (SW2 * apply_pair(Kh, relu_pair) + SB2)
    expected = SW2 * apply_pair(Ky, relu_pair)
    theta = tp.infinite_width(_affine_only(("b2.weight",)), x, parametrization="standard",
                              nominal_width=64).ntk(x)
    np.testing.assert_allclose(theta.numpy(), expected, rtol=1e-10, atol=0)


def test_batchnorm_eval_affine_ntk_matches_monte_carlo(x):
    """Both BatchNorms' gains and shifts (standard parametrization, the only trainable
    parameters) vs the mean empirical NTK of the module at width 1024."""
    width = 1024
    factory = _affine_only()
    theta = tp.infinite_width(factory, x, parametrization="standard", nominal_width=width).ntk(x)
    emp = ntk_mean(factory, width, x, samples=64, seed=7, parametrization="standard")
    z = ((emp.mean - theta).abs() / emp.stderr).max().item()
    assert z < Z, f"max |MC − limit| / SE = {z:.2f}\nlimit {theta}\nMC {emp.mean}"


@pytest.mark.slow
def test_batchnorm_eval_ntk_matches_monte_carlo(x):
    """The whole eval-mode model's NTK (NTK parametrization) vs the mean empirical NTK."""
    factory = _affine_only(("l1.", "l2.", "out.", "b1.", "b2."))
    theta = tp.infinite_width(factory, x).ntk(x)
    emp = ntk_mean(factory, 512, x, samples=16, seed=5, parametrization="ntk")
    z = ((emp.mean - theta).abs() / emp.stderr).max().item()
    assert z < Z, f"max |MC − limit| / SE = {z:.2f}\nlimit {theta}\nMC {emp.mean}"
