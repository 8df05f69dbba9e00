"""tp.gpytorch: the limit kernel inside GPyTorch; its σ² train by the exact marginal
likelihood (which increases), with gradients equal to central finite differences."""

from __future__ import annotations

import math

import pytest
import torch

gpytorch = pytest.importorskip("gpytorch")

import tensorprograms as tp  # noqa: E402
from frontend.models import MLP  # noqa: E402
from tensorprograms.gpytorch import InfiniteWidthKernel  # noqa: E402


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean = gpytorch.means.ZeroMean()
        self.kernel = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean(x), self.kernel(x))


@pytest.fixture(scope="module")
def setup():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(12, generator=gen, dtype=torch.float64)
    y = torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1] ** 2 + 0.05 * eps
    limit = tp.infinite_width(lambda w: MLP(w, torch.erf, d=4, k=1, depth=2), x)
    return x, y, limit


def mll_of(x, y, kernel):
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = 1e-2
    likelihood.raw_noise.requires_grad_(False)
    model = GP(x, y, likelihood, kernel).double()
    model.train()
    likelihood.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    return model, lambda: mll(model(x), y)


def test_kernel_is_the_limit_nngp(setup):
    x, _, limit = setup
    k = InfiniteWidthKernel(limit)
    assert set(k.names) == {n for n, v in limit.hyperparameters.items() if float(v.detach()) > 0}
    torch.testing.assert_close(k(x).to_dense(), limit.nngp(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(k(x[:5], x[5:]).to_dense(), limit.nngp(x[:5], x[5:]), rtol=0, atol=1e-12)
    torch.testing.assert_close(k(x, diag=True), limit.nngp(x).diagonal(), rtol=0, atol=1e-12)


def test_marginal_likelihood_gradient_matches_finite_differences(setup):
    x, y, limit = setup
    kernel = InfiniteWidthKernel(limit)
    model, mll = mll_of(x, y, kernel)
    raws = [getattr(kernel, "raw_" + n.replace(".", "__")) for n in kernel.names]
    value = mll()
    grads = torch.autograd.grad(value, raws)
    h = 1e-5
    for raw, g in zip(raws, grads):
        with torch.no_grad():
            raw += h
            up = mll().item()
            raw -= 2 * h
            down = mll().item()
            raw += h
        fd = (up - down) / (2 * h)
        # central differences: error O(h²·f''') + rounding O(eps·|f|/h) ≈ 1e-9 here
        assert abs(fd - g.item()) < 1e-6 * max(1.0, abs(fd)), (raw, fd, g.item())


def test_marginal_likelihood_training_increases_it(setup):
    x, y, limit = setup
    kernel = InfiniteWidthKernel(limit)
    model, mll = mll_of(x, y, kernel)
    before = mll().item()
    opt = torch.optim.Adam(kernel.parameters(), lr=0.1)
    for _ in range(15):
        opt.zero_grad()
        loss = -mll()
        loss.backward()
        opt.step()
    after = mll().item()
    assert after > before + 0.05, (before, after)
    assert all(math.isfinite(v.item()) and v.item() > 0 for v in kernel.variances.values())


def test_bad_inputs(setup):
    x, _, limit = setup
    with pytest.raises(TypeError, match="InfiniteWidthLimit"):
        InfiniteWidthKernel(object())
    with pytest.raises(ValueError, match="kind"):
        InfiniteWidthKernel(limit, kind="rbf")
    with pytest.raises(ValueError, match="batch dimensions"):
        InfiniteWidthKernel(limit)(x[None]).to_dense()
