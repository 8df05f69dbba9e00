"""The engine beyond MLPs: finite-index mixing, scalars as parameters, joint Monte Carlo,
samples, width ratios, and the errors a user can hit."""

import math

import pytest
import torch

import tensorprograms as tp
from tensorprograms import functions as F
from tensorprograms.errors import ExpectationError


def conv_shift(u):
    """A 1-D 'convolution' over 5 positions: zero-padded neighbours, fixed weights."""
    left = torch.nn.functional.pad(u[..., :-1], (1, 0))
    right = torch.nn.functional.pad(u[..., 1:], (0, 1))
    return 0.5 * left + u - 0.25 * right


def conv_matrix(k=5):
    A = torch.eye(k)
    for i in range(1, k):
        A[i, i - 1] = 0.5
        A[i - 1, i] = -0.25
    return A


def test_lincomb_mixing_finite_indices_is_exact():
    cov = torch.tensor([[1.0, 0.3], [0.3, 2.0]])
    cov5 = torch.block_diag(cov, cov, torch.tensor([[1.5]]))
    P = tp.Program()
    x = P.vector("x", shape=(5,), cov=cov5)
    W = P.matrix("W", variance=2.0)
    g = W @ P.nonlin(F.relu, x)
    c = P.linear(conv_shift, g, name="conv")
    pooled = P.linear(lambda u: u.mean(-1, keepdim=True), c, name="pool")
    L = tp.master_theorem(P)
    A = conv_matrix()
    expected = A @ L.cov(g) @ A.T
    torch.testing.assert_close(L.cov(c), expected, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(L.cov(pooled), expected.mean().reshape(1, 1), rtol=1e-13, atol=0)
    assert c.kind == "G" and pooled.shape == (1,)


def test_scalar_parameters_layernorm_like():
    """y = h / sqrt(mean_α h_α²): in the limit the correlation matrix of h."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, generator=gen)
    P = tp.Program()
    h = P.input_layer(x, 1.3, 0.2)
    norm2 = P.moment(lambda u: u**2, h, name="norm2")
    y = P.nonlin(lambda u, s: u / s.sqrt(), h, params=(norm2,))
    L = tp.master_theorem(P)
    K = 1.3 * x @ x.T / 3 + 0.2
    torch.testing.assert_close(L.value(norm2), K.diagonal(), rtol=1e-13, atol=0)
    corr = K / torch.sqrt(K.diagonal()[:, None] * K.diagonal()[None, :])
    torch.testing.assert_close(L.second_moment(y), corr, rtol=1e-12, atol=0)
    assert y.instruction.elementwise


def test_joint_monte_carlo_softmax_matches_finite_width():
    """Softmax over 4 positions mixes finite indices: a 4-D (joint) Monte Carlo expectation."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, generator=gen)
    P = tp.Program()
    h = P.input_layer(x, 3.0, 0.0)
    s = P.nonlin(lambda u: torch.softmax(u, -1), h)
    W = P.matrix("W")
    g = W @ s
    L = tp.master_theorem(P, mc_samples=2**18, seed=5)
    lim, se_lim = L.second_moment(s), L.stderr(s)
    assert any(r.backend == "monte_carlo" and r.dim == 4 for r in L.records)
    torch.testing.assert_close(L.cov(g), lim, rtol=1e-15, atol=0)  # σ_W² = 1
    runs = torch.stack([tp.simulate(P, 4096, seed=k).second_moment(s) for k in range(16)])
    se_fin = runs.std(0) / math.sqrt(len(runs))
    z = (runs.mean(0) - lim).abs() / (se_lim**2 + se_fin**2).sqrt()
    assert z.max() < 5, z.max()


def test_deep_elementwise_chain_and_mixed_inputs():
    """φ(ψ(g1) + g2) with two G-vars: a 4-D pair integral, Monte Carlo; vs quadrature of the
    same quantity written with g1 + g2 pre-combined where possible."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, generator=gen)
    P = tp.Program()
    g1 = P.input_layer(x, 1.0, 0.1)
    # b differs across the 3 inputs (a shared b would make each pair integral rank 3: quadrature)
    g2 = P.vector("b", shape=(3,), cov=0.2 * torch.eye(3) + 0.3)
    y = P.nonlin(lambda a, b: torch.tanh(a + b), g1, g2)
    s = g1 + g2
    y_ref = P.nonlin(torch.tanh, s)
    L = tp.master_theorem(P, mc_samples=2**17, seed=11)
    mc, se = L.second_moment(y), L.stderr(y)
    assert L.records[-1].backend == "monte_carlo" and L.records[-1].dim == 4
    ref = L.second_moment(y_ref)
    assert L.records[-1].backend == "quadrature"
    assert ((mc - ref).abs() <= 5 * se).all()
    # same quantity from quadrature in 3 dims when the cap allows 4 → forced quadrature works
    quad = tp.master_theorem(P, backend="quadrature", quadrature_orders={4: 12}).second_moment(y)
    assert (quad - ref).abs().max() < 1e-3 * ref.abs().max()  # Gauss–Hermite 12⁴ on tanh


def test_samples_have_the_limit_law():
    P = tp.Program()
    h = P.vector("h", shape=(2,), cov=torch.tensor([[1.0, 0.6], [0.6, 2.0]]))
    y = P.nonlin(F.relu, h)
    L = tp.master_theorem(P)
    z = L.sample(y, 200_000, seed=4)
    assert z.shape == (200_000, 2) and (z >= 0).all()
    se = z.std(0) / math.sqrt(len(z))
    assert ((z.mean(0) - L.mean(y)).abs() < 5 * se).all()
    zh = L.sample(h, 200_000, seed=5)
    emp = zh.T @ zh / len(zh)
    assert (emp - torch.tensor([[1.0, 0.6], [0.6, 2.0]])).abs().max() < 0.03


def test_mean_and_cov_of_hvars():
    P = tp.Program()
    h = P.vector("h", shape=(3,), variance=2.0)
    y = P.nonlin(F.relu, h)
    L = tp.master_theorem(P)
    torch.testing.assert_close(L.mean(y), torch.full((3,), math.sqrt(2.0 / (2 * math.pi))))
    # independent finite indices: off-diagonal covariance is 0, diagonal Var relu = σ²(1/2 - 1/2π)
    expected = torch.eye(3) * 2.0 * (0.5 - 1 / (2 * math.pi))
    torch.testing.assert_close(L.cov(y), expected, rtol=1e-12, atol=1e-15)


def test_report_lists_backends():
    P = tp.Program()
    h = P.vector("h", shape=(2,))
    y = P.nonlin(torch.tanh, h)
    L = tp.master_theorem(P)
    L.second_moment(y)
    text = L.report()
    assert "quadrature" in text and "E[" in text
    assert "scalar" not in L.summary()


def test_master_theorem_errors():
    P2 = tp.Program()
    h2 = P2.vector("h")
    y2 = P2.nonlin(torch.tanh, h2)
    with pytest.raises(ExpectationError, match="no closed form"):
        tp.master_theorem(P2, backend="closed_form").second_moment(y2)
    with pytest.raises(ValueError, match="unknown backend"):
        tp.master_theorem(P2, backend="magic")
    with pytest.raises(ValueError, match="mc_samples must be at least 2"):
        tp.master_theorem(P2, mc_samples=1)
    with pytest.raises(ValueError, match="num_samples must be positive"):
        tp.master_theorem(P2).sample(y2, 0)
    L = tp.master_theorem(P2)
    other = tp.Program()
    h = other.vector("h")
    with pytest.raises(tp.ProgramError, match="not a variable of this program"):
        L.second_moment(h)
    with pytest.raises(tp.ProgramError, match="not a scalar"):
        L.value(y2)
    with pytest.raises(TypeError, match="tp.Program"):
        tp.master_theorem("not a program")


@pytest.mark.parametrize("c", [1.0, 0.5, -2.0])
def test_collinear_arguments_are_integrated_in_their_true_dimension(c):
    """E[relu(y)·tanh(y') · relu(z)] with y' = c·y a different G-var: three arguments, rank 2.
    The rule is chosen after dropping the exactly dependent direction, so the kinks of relu(y)
    and relu(z) stay on the polar rule's cuts (a 3-D Gauss–Hermite grid was 4e-4 off); the
    reference writes y' as c·y inside a function of y alone (2-D from the start)."""
    P = tp.Program()
    x1, x2 = P.vector("x1"), P.vector("x2", variance=1.3)
    W = P.matrix("W", variance=1.7)
    y = W @ x1
    z = P.lincomb([0.6, 0.8], [y, W @ x2])
    y2 = P.lincomb([c], [y])
    a = P.nonlin(lambda u, v: torch.relu(u) * torch.tanh(v), y, y2)
    a_ref = P.nonlin(lambda u: torch.relu(u) * torch.tanh(c * u), y)
    b = P.nonlin(torch.relu, z)
    t = P.nonlin(lambda u, v, w: torch.relu(u) * torch.tanh(v) * torch.relu(w), y, y2, z)
    t_ref = P.nonlin(lambda u, w: torch.relu(u) * torch.tanh(c * u) * torch.relu(w), y, z)
    L = tp.master_theorem(P)
    ref = L.second_moment(a_ref, b)
    torch.testing.assert_close(L.second_moment(a, b), ref, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(L.mean(t), L.mean(t_ref), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(L.mean(t), ref, rtol=1e-13, atol=1e-15)  # the same integrand


def test_shared_leaf_makes_a_four_argument_pair_integral_three_dimensional():
    """tanh(g1 + b) at two inputs with one shared b: the pair integral has 4 arguments but
    rank 3, so it is quadrature (deterministic), not Monte Carlo."""
    gen = torch.Generator().manual_seed(3)
    P = tp.Program()
    g1 = P.input_layer(torch.randn(3, 4, generator=gen), 1.0, 0.1)
    b = P.vector("b", variance=0.5)
    y = P.nonlin(lambda u, v: torch.tanh(u + v), g1, b)
    y_ref = P.nonlin(torch.tanh, g1 + b)
    L = tp.master_theorem(P)
    got = L.second_moment(y)
    assert L.records[-1].backend == "quadrature" and L.stderr(y).abs().max() == 0
    # 3-D Gauss–Hermite (order 28) on tanh against the 2-D polar rule
    torch.testing.assert_close(got, L.second_moment(y_ref), rtol=0, atol=1e-7)


@pytest.mark.parametrize("d, da", [(30, 2), (30, 0), (40, 7), (12, 3)])
def test_block_root_of_general_and_polynomial_coordinates(d, da):
    """The root the polynomial rule integrates with (master/polynomial.py): L_A L_Aᵀ + L_B L_Bᵀ
    = Σ, the first da (general) coordinates free of ξ_B, rank-deficient Σ without null columns;
    large Σ by blocks (eigen-roots), small by the PSD Cholesky."""
    from tensorprograms.master.polynomial import _block_root

    A = torch.randn(d, d - 5, generator=torch.Generator().manual_seed(d + da), dtype=torch.float64)
    sigma = A @ A.T
    la, lb = _block_root(sigma, da)
    torch.testing.assert_close(la @ la.T + lb @ lb.T, sigma, rtol=0, atol=1e-12 * sigma.abs().max().item())
    assert (lb[:da] == 0).all() and la.shape[1] + lb.shape[1] == d - 5
