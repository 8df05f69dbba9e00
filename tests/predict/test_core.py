"""tp.predict against closed forms: the linear ODE of the linearized network solved by
scipy's matrix exponential, the GP posterior by direct inversion, and the numerics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

import tensorprograms as tp
from tensorprograms.predict import KernelNotPSDError, PSDSolver, gp_posterior, gradient_flow, one_hot


def kernel(x1, x2):
    """An arccos (relu NNGP-like) kernel plus a constant: PSD, float64."""
    n1, n2 = x1.norm(dim=1), x2.norm(dim=1)
    c = (x1 @ x2.T / (n1[:, None] * n2[None, :])).clamp(-1, 1)
    th = torch.arccos(c)
    return 0.1 + n1[:, None] * n2[None, :] * (torch.sin(th) + (math.pi - th) * c) / (2 * math.pi)


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    Xt = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    Y = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    return X, Xt, Y


def ode_solution(theta_all, n, Y, f0, lr, t):
    """Closed form of d f/dt = −(lr/N) Θ(·, X) (f(X) − Y) on all points [train; test], by the
    matrix exponential of the (train + test) linear system."""
    m = theta_all.shape[0]
    # state z = (f(all) − f0(all)); dz/dt = −(lr/N) Θ[:, X] (z_X + f0_X − Y): affine, so
    # augment with a constant coordinate and take expm of the block matrix.
    M = np.zeros((m + 1, m + 1))
    M[:m, :n] = -(lr / n) * theta_all[:, :n]
    out = []
    for col in range(Y.shape[1]):
        M[:m, m] = -(lr / n) * theta_all[:, :n] @ (f0[:n, col] - Y[:, col])
        z = scipy.linalg.expm(M * t) @ np.r_[np.zeros(m), 1.0]
        out.append(f0[:, col] + z[:m])
    return np.stack(out, 1)


@pytest.mark.parametrize("t", [0.0, 3.0, 40.0, 1e4])
def test_gradient_flow_matches_matrix_exponential(data, t):
    X, Xt, Y = data
    XA = torch.cat([X, Xt])
    theta = kernel(XA, XA)
    gen = torch.Generator().manual_seed(1)
    f0 = torch.randn(11, 2, generator=gen, dtype=torch.float64)
    lr, n = 0.7, 7
    ref = ode_solution(theta.numpy(), n, Y.numpy(), f0.numpy(), lr, t)
    test = gradient_flow(theta[:n, :n], Y, theta[n:, :n], t=t, lr=lr, f0_train=f0[:n], f0_test=f0[n:])
    train = gradient_flow(theta[:n, :n], Y, t=t, lr=lr, f0_train=f0[:n])
    np.testing.assert_allclose(test.mean.numpy(), ref[n:], rtol=0, atol=1e-10)
    np.testing.assert_allclose(train.mean.numpy(), ref[:n], rtol=0, atol=1e-10)


def test_ensemble_covariance_matches_sampling_identity(data):
    """Cov[f_t] = Cov[f_0(x) − A f_0(X)] computed as an explicit linear map of the NNGP."""
    X, Xt, Y = data
    XA = torch.cat([X, Xt])
    theta, K = kernel(XA, XA), kernel(XA, XA) ** 2 / 3 + 0.05  # two different PSD kernels
    n, lr, t = 7, 0.5, 12.0
    expm = torch.tensor(scipy.linalg.expm(-(lr / n) * t * theta[:n, :n].numpy()))
    A = theta[n:, :n] @ torch.linalg.solve(theta[:n, :n], torch.eye(n, dtype=torch.float64) - expm)
    L = torch.cat([-A, torch.eye(4, dtype=torch.float64)], 1)  # f_t − mean = L f_0(all)
    pred = gradient_flow(theta[:n, :n], Y, theta[n:, :n], t=t, lr=lr,
                         nngp_train=K[:n, :n], nngp_test_train=K[n:, :n], nngp_test=K[n:, n:])
    torch.testing.assert_close(pred.mean, A @ Y, rtol=0, atol=1e-10)
    torch.testing.assert_close(pred.cov, L @ K @ L.T, rtol=0, atol=1e-10)
    diag = gradient_flow(theta[:n, :n], Y, theta[n:, :n], t=t, lr=lr, nngp_train=K[:n, :n],
                         nngp_test_train=K[n:, :n], nngp_test=K[n:, n:].diagonal())
    torch.testing.assert_close(diag.cov, (L @ K @ L.T).diagonal(), rtol=0, atol=1e-10)
    # on the training inputs: f_t(X) − mean = e^{−lr t Θ/N} f_0(X)
    train = gradient_flow(theta[:n, :n], Y, t=t, lr=lr, nngp_train=K[:n, :n])
    torch.testing.assert_close(train.cov, expm @ K[:n, :n] @ expm.T, rtol=0, atol=1e-10)


def test_infinite_time_is_kernel_regression_and_gp_mean(data):
    X, Xt, Y = data
    Kxx, Ktx, Ktt = kernel(X, X), kernel(Xt, X), kernel(Xt, Xt)
    flow = gradient_flow(Kxx, Y, Ktx, t=math.inf)
    gp = gp_posterior(Kxx, Y, Ktx, Ktt)
    direct = Ktx @ torch.linalg.solve(Kxx, Y)
    torch.testing.assert_close(flow.mean, direct, rtol=0, atol=1e-10)
    torch.testing.assert_close(gp.mean, direct, rtol=0, atol=1e-10)
    torch.testing.assert_close(gp.cov, Ktt - Ktx @ torch.linalg.solve(Kxx, Ktx.T), rtol=0, atol=1e-10)
    # long finite time approaches t = ∞
    late = gradient_flow(Kxx, Y, Ktx, t=1e9)
    torch.testing.assert_close(late.mean, direct, rtol=0, atol=1e-8)
    # at the training inputs the noiseless GP interpolates and has zero variance
    at_train = gp_posterior(Kxx, Y)
    torch.testing.assert_close(at_train.mean, Y, rtol=0, atol=1e-10)
    assert at_train.cov.abs().max() < 1e-10


def test_noise_is_observation_noise(data):
    X, Xt, Y = data
    Kxx, Ktx = kernel(X, X), kernel(Xt, X)
    gp = gp_posterior(Kxx, Y[:, 0], Ktx, kernel(Xt, Xt).diagonal(), noise=0.3)
    A = Ktx @ torch.linalg.inv(Kxx + 0.3 * torch.eye(7, dtype=torch.float64))
    torch.testing.assert_close(gp.mean, A @ Y[:, 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(gp.variance, kernel(Xt, Xt).diagonal() - (A * Ktx).sum(1), rtol=0, atol=1e-12)


def test_singular_kernel_uses_eigendecomposition(data):
    """A duplicated training input makes K singular: Cholesky fails, the pseudo-inverse
    gives the minimum-norm interpolant (the same as dropping the duplicate)."""
    X, Xt, Y = data
    Xd = torch.cat([X, X[:1]])
    Yd = torch.cat([Y, Y[:1]])
    pred = gp_posterior(kernel(Xd, Xd), Yd, kernel(Xt, Xd))
    assert pred.method == "eigh"
    ref = gp_posterior(kernel(X, X), Y, kernel(Xt, X))
    assert ref.method == "cholesky"
    torch.testing.assert_close(pred.mean, ref.mean, rtol=0, atol=1e-7)
    flow = gradient_flow(kernel(Xd, Xd), Yd, kernel(Xt, Xd), t=math.inf)
    torch.testing.assert_close(flow.mean, ref.mean, rtol=0, atol=1e-7)


def test_not_psd_reports_smallest_eigenvalue():
    K = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # eigenvalues 3, −1
    with pytest.raises(KernelNotPSDError, match=r"smallest eigenvalue -1\b"):
        gp_posterior(K, torch.ones(2, dtype=torch.float64))
    with pytest.raises(KernelNotPSDError, match="noise/jitter"):
        PSDSolver(K)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda K, y: gp_posterior(K[:, :3], y), "square"),
        (lambda K, y: gp_posterior(K + torch.triu(torch.ones_like(K), 1), y), "not symmetric"),
        (lambda K, y: gp_posterior(K, y[:3]), r"y_train has shape \(3,\)"),
        (lambda K, y: gp_posterior(K, y, torch.ones(2, 3, dtype=torch.float64)), r"\[M, 4\]"),
        (lambda K, y: gp_posterior(K, y, noise=-1.0), "noise must be"),
        (lambda K, y: gp_posterior(K * float("nan"), y), "NaN"),
        (lambda K, y: gradient_flow(K, y, t=-1.0), "t must be"),
        (lambda K, y: gradient_flow(K, y, lr=0.0), "lr must be"),
        (lambda K, y: gradient_flow(K, y, torch.ones(2, 4, dtype=torch.float64)), "nngp_test_train"),
        (lambda K, y: gradient_flow(K, y, torch.ones(2, 4, dtype=torch.float64),
                                    f0_train=y), "both f0_train and f0_test"),
        (lambda K, y: gradient_flow(K, y, nngp_train=K, f0_train=y), "over initializations"),
    ],
)
def test_bad_inputs(call, match):
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    K, y = kernel(X, X), torch.randn(4, generator=gen, dtype=torch.float64)
    if match == "nngp_test_train":
        call = lambda K, y: gradient_flow(K, y, torch.ones(2, 4, dtype=torch.float64),  # noqa: E731
                                          nngp_train=K)
    with pytest.raises((ValueError, TypeError), match=match):
        call(K, y)


def test_one_hot_classification():
    labels = torch.tensor([2, 0, 1, 2])
    Y = one_hot(labels)
    assert Y.dtype == torch.float64 and Y.shape == (4, 3)
    K = torch.eye(4, dtype=torch.float64) + 0.1
    assert torch.equal(gp_posterior(K, Y).classes(), labels)
    with pytest.raises(ValueError, match="integer tensor"):
        one_hot(labels.double())
    with pytest.raises(ValueError, match="out of range"):
        one_hot(labels, classes=2)


def test_predict_from_limit_equals_kernel_functions():
    from frontend.models import MLP

    gen = torch.Generator().manual_seed(4)
    X, Xt = torch.randn(5, 6, generator=gen), torch.randn(3, 6, generator=gen)
    y = torch.randn(5, generator=gen, dtype=torch.float64)
    limit = tp.infinite_width(lambda w: MLP(w, torch.relu, k=2), X)
    blocks = tp.predict.limit_kernels(limit, X, Xt)
    nngp, ntk = limit.kernels(torch.cat([X, Xt]))
    torch.testing.assert_close(blocks["ntk"].test_train, ntk[5:, :5], rtol=0, atol=0)
    p = tp.predict.predict(limit, X, y, Xt, t=5.0, lr=0.5)
    q = gradient_flow(ntk[:5, :5], y, ntk[5:, :5], t=5.0, lr=0.5, nngp_train=nngp[:5, :5],
                      nngp_test_train=nngp[5:, :5], nngp_test=nngp[5:, 5:])
    torch.testing.assert_close(p.mean, q.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(p.cov, q.cov, rtol=0, atol=1e-12)
    g = tp.predict.predict(blocks, None, y, kernel="nngp", method="gp")
    torch.testing.assert_close(g.mean, gp_posterior(nngp[:5, :5], y, nngp[5:, :5]).mean, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="kernel must be"):
        tp.predict.predict(limit, X, y, Xt, kernel="rbf")
    with pytest.raises(TypeError, match="InfiniteWidthLimit"):
        tp.predict.limit_kernels(object(), X)
