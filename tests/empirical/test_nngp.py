"""empirical.nngp against closed forms that hold exactly at every finite width.

For the networks below the expected per-output kernel E[K_s] equals the limit at any
width (see each test), so the only error is Monte Carlo: each entry must lie within
4.5 of its own standard errors (with ~20 distinct entries, a false alarm has probability
< 1e-3 even allowing for the t-distribution's heavier tails at 200 samples). With 32
outputs and 1000 samples the ReLU test's standard error is about 1% of the kernel, so a
5% error in the kernel fails it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tensorprograms.empirical import EmpiricalKernel, nngp

D, K_OUT = 5, 32
S1, S2 = 2.0, 1.5  # σ_w² of the hidden and readout layers


def _inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, D, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 2.0, 6)[:, None]
    x[5] = -0.7 * x[1]  # an anti-parallel pair: θ = π
    return x


def _mlp(act: nn.Module, hidden_layers: int = 1):
    def factory(n: int) -> nn.Module:
        dims = [D] + [n] * hidden_layers
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            lin = nn.Linear(a, b, bias=False)
            nn.init.normal_(lin.weight, std=math.sqrt(S1 / a))
            layers += [lin, act]
        out = nn.Linear(n, K_OUT, bias=False)
        nn.init.normal_(out.weight, std=math.sqrt(S2 / n))
        return nn.Sequential(*layers, out)

    return factory


def _arccos1(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """σ2² E[relu(u) relu(u')] with (u, u') ~ N(0, σ1²/D · Gram): Cho & Saul's order-1
    arc-cosine kernel, (s s'/2π)(sin θ + (π-θ) cos θ) with s = σ1‖x‖/√D."""
    n1, n2 = x1.norm(dim=1)[:, None], x2.norm(dim=1)[None, :]
    cos = ((x1 @ x2.T) / (n1 * n2)).clamp(-1, 1)
    theta = torch.arccos(cos)
    scale = S1 * n1 * n2 / D
    return S2 * scale / (2 * math.pi) * (torch.sin(theta) + (math.pi - theta) * cos)


def _within(k: EmpiricalKernel, expected: torch.Tensor, z: float = 4.5) -> None:
    err = (k.mean - expected).abs()
    worst = float((err / k.stderr).max())
    assert bool((err <= z * k.stderr).all()), f"worst |error|/stderr = {worst:.2f}"


def test_relu_one_hidden_layer_matches_arccos_kernel():
    # Given x, the hidden pre-activations W1 x are exactly Gaussian (fan-in D is fixed)
    # and iid over the n units, and the readout is independent of them: E[K_s] is the
    # limit at every width, with no finite-width bias.
    x = _inputs()
    k = nngp(_mlp(nn.ReLU()), 1024, x, samples=1000, seed=0)
    assert k.mean.dtype == torch.float64 and k.mean.shape == (6, 6) and k.samples == 1000 and k.width == 1024
    _within(k, _arccos1(x, x))
    assert float(k.mean[1, 5]) < 0.05 * float(k.mean[1, 1])  # θ = π: arc-cosine kernel vanishes


def test_linear_network_exact_at_every_width():
    # f = W3 W2 W1 x with independent centred Gaussian matrices: E[f fᵀ]/k telescopes to
    # S2·S1·S1·x·x'/D at any width (E[Wᵀ W] = fan_out·σ²/fan_in · I at each layer).
    x1, x2 = _inputs(), _inputs()[:4] * 0.5
    expected = S2 * S1 * S1 * (x1 @ x2.T) / D
    for width in (8, 256):
        k = nngp(_mlp(nn.Identity(), hidden_layers=2), width, x1, x2, samples=200, seed=7)
        assert k.mean.shape == (6, 4)
        _within(k, expected)


def test_mean_and_stderr_are_the_per_sample_definition():
    # Recompute K_s = f(x1) f(x2)ᵀ / k here, network by network, and compare: this checks
    # the seeding (seed + s), the flattening of trailing output dims, the vmap path
    # against plain calls, and that stderr = sd over samples / √samples.
    class TwoDimOut(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.a = nn.Linear(D, n)
            self.b = nn.Linear(n, 6)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x))).reshape(-1, 2, 3)

    x1, x2 = _inputs(), _inputs()[:3]
    samples, seed, width = 5, 11, 32
    ks = []
    for s in range(samples):
        torch.manual_seed(seed + s)
        m = TwoDimOut(width).double()
        f1, f2 = m(x1).reshape(6, 6), m(x2).reshape(3, 6)
        ks.append(f1 @ f2.T / 6)
    ks = torch.stack(ks)
    for batch_size in (None, 2, 1):
        k = nngp(TwoDimOut, width, x1, x2, samples=samples, seed=seed, batch_size=batch_size)
        # float64 rounding, batched vs unbatched matmuls
        torch.testing.assert_close(k.mean, ks.mean(0), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(k.stderr, ks.std(0) / math.sqrt(samples), rtol=1e-8, atol=1e-13)


def test_stderr_shrinks_like_inverse_sqrt_samples():
    # With 64 iid outputs, K_s is close to Gaussian (kurtosis ≈ 3 + 12/64), so a standard
    # error estimated from S samples has relative s.d. ≈ √((κ-1)/(4S)): 0.15 at S = 25 and
    # 0.04 at S = 400. The expected ratio is √(400/25) = 4; allow 4 combined s.d. (±62%).
    def factory(n):
        lin1, lin2 = nn.Linear(D, n, bias=False), nn.Linear(n, 64, bias=False)
        nn.init.normal_(lin1.weight, std=math.sqrt(1 / D))
        nn.init.normal_(lin2.weight, std=math.sqrt(1 / n))
        return nn.Sequential(lin1, lin2)

    x = _inputs()[:3]
    small = nngp(factory, 64, x, samples=25, seed=0)
    large = nngp(factory, 64, x, samples=400, seed=1000)
    ratio = float((small.stderr / large.stderr).log().mean().exp())
    assert 4 / 1.62 < ratio < 4 * 1.62, ratio


def test_loop_fallback_for_models_vmap_cannot_run():
    class ItemModel(nn.Module):  # .item() is data-dependent: vmap refuses it
        def __init__(self, n):
            super().__init__()
            self.lin = nn.Linear(D, n, bias=False)

        def forward(self, x):
            h = self.lin(x)
            return h * (1.0 + 0.0 * h.abs().max().item())

    x = _inputs()
    k = nngp(ItemModel, 16, x, samples=3, seed=0)
    ks = []
    for s in range(3):
        torch.manual_seed(s)
        f = ItemModel(16).double()(x)
        ks.append(f @ f.T / 16)
    torch.testing.assert_close(k.mean, torch.stack(ks).mean(0), rtol=1e-12, atol=1e-14)


def test_unregistered_weights_are_not_shared_across_samples():
    # A weight stored as a plain attribute is invisible to functional_call; vmapping would
    # reuse the first model's copy. The check against a plain call must catch it.
    class Hidden(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.w = torch.randn(n, D)
            self.scale = nn.Parameter(torch.ones(()))  # gives vmap something to batch

        def forward(self, x):
            return self.scale * (x @ self.w.T)

    x = _inputs()
    k = nngp(Hidden, 8, x, samples=4, seed=3)
    ks = []
    for s in range(4):
        torch.manual_seed(3 + s)
        f = x @ Hidden(8).w.T
        ks.append(f @ f.T / 8)
    torch.testing.assert_close(k.mean, torch.stack(ks).mean(0), rtol=1e-12, atol=1e-14)


def test_progress_bar(capsys):
    nngp(_mlp(nn.ReLU()), 8, _inputs(), samples=3, progress=True)
    assert "empirical NNGP" in capsys.readouterr().err


# -- errors ------------------------------------------------------------------------------

_F = _mlp(nn.ReLU())


def test_nan_inputs():
    x = _inputs()
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="x1 contains NaN or Inf"):
        nngp(_F, 8, x)
    with pytest.raises(ValueError, match="x2 contains NaN or Inf"):
        nngp(_F, 8, _inputs(), x)


def test_trailing_shapes_differ():
    with pytest.raises(ValueError, match=r"same shape after the batch dimension; got \(5,\) and \(4,\)"):
        nngp(_F, 8, _inputs(), torch.zeros(2, 4))


@pytest.mark.parametrize("samples", [1, 0, 2.5])
def test_too_few_samples(samples):
    with pytest.raises(ValueError, match="samples must be an integer >= 2"):
        nngp(_F, 8, _inputs(), samples=samples)


def test_output_not_a_tensor():
    class TupleOut(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.lin = nn.Linear(D, n)

        def forward(self, x):
            return self.lin(x), x

    with pytest.raises(TypeError, match="the model returned tuple"):
        nngp(TupleOut, 8, _inputs(), samples=2)


def test_factory_errors():
    with pytest.raises(TypeError, match="factory must be a callable"):
        nngp(None, 8, _inputs())
    with pytest.raises(TypeError, match=r"factory\(8\) returned Tensor, not a torch.nn.Module"):
        nngp(lambda n: torch.zeros(n), 8, _inputs())
    with pytest.raises(ValueError, match="batch_size must be None"):
        nngp(_F, 8, _inputs(), batch_size=0)
