"""empirical.ntk against closed forms and a brute-force autograd reference; ntk_mean
against the analytic infinite-width NTK of a one-hidden-layer ReLU net.

Exact comparisons (everything except the Monte Carlo test) use float64 tolerances:
the kernels below are sums of at most a few thousand products of O(1) numbers, so
summation-order differences are ~1e-15 relative; 1e-12 leaves margin and still catches
any wrong term. The Monte Carlo test uses 4.5 standard errors, as tests/empirical/test_nngp.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tensorprograms.empirical import EmpiricalKernel, ntk, ntk_mean
from tensorprograms.frontend.init_reader import read_initialization

D = 5


def _inputs(n: int = 6, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 2.0, n)[:, None]
    x[-1] = -0.7 * x[1]  # an anti-parallel pair: θ = π
    return x


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-12) -> None:
    assert a.shape == b.shape and a.dtype == torch.float64
    scale = float(b.abs().max())
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"max |error| {err:.3g} > {rel} · {scale:.3g}"


def _brute(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
    """[N1, N2, k, k] from plain torch.autograd.grad, one input and one output at a time."""
    model = model.double().eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def grads(x: torch.Tensor) -> torch.Tensor:
        rows = []
        for xi in x:
            out = model(xi.unsqueeze(0)).reshape(-1)
            per_out = []
            for a in range(out.shape[0]):
                g = torch.autograd.grad(out[a], [p for _, p in named], retain_graph=True, allow_unused=True)
                flat = [
                    (torch.zeros(p.numel(), dtype=torch.float64) if gi is None else gi.reshape(-1))
                    * (1.0 if weights is None else math.sqrt(weights[n]))
                    for (n, p), gi in zip(named, g)
                ]
                per_out.append(torch.cat(flat))
            rows.append(torch.stack(per_out))
        return torch.stack(rows)  # [N, k, P]

    g1, g2 = grads(x1), grads(x2)
    return torch.einsum("iap,jbp->ijab", g1, g2)


def _per_output(full: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(full, dim1=2, dim2=3).sum(-1) / full.shape[-1]


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(D, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)).double()


def _conv() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 3, 3), nn.Flatten(), nn.Linear(3 * 4, 2)
    ).double()


def _conv_inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- exact ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["jacobian", "ntk_vp"])
def test_deep_linear_network_closed_form(method):
    # f(x) = W2 W1 x, W1 [n, d], W2 [k, n]. ∂f_a/∂W1 = W2[a]ᵀ xᵀ and ∂f_a/∂W2[c] = δ_ac W1 x, so
    #   Θ(x, x')_ab = (W2 W2ᵀ)_ab xᵀx' + δ_ab (W1 x)ᵀ(W1 x'),
    # and the per-output kernel is (‖W2‖²_F / k) xᵀx' + (W1 x)ᵀ(W1 x').
    torch.manual_seed(0)
    n, k = 9, 3
    model = nn.Sequential(nn.Linear(D, n, bias=False), nn.Linear(n, k, bias=False)).double()
    w1, w2 = model[0].weight.detach(), model[1].weight.detach()
    x1, x2 = _inputs(), _inputs(4, seed=2)
    gram, feat = x1 @ x2.T, (x1 @ w1.T) @ (x2 @ w1.T).T
    full = (w2 @ w2.T)[None, None] * gram[:, :, None, None] + torch.eye(k) * feat[:, :, None, None]
    _close(ntk(model, x1, x2, per_output=False, method=method), full)
    _close(ntk(model, x1, x2, method=method), (w2 * w2).sum() / k * gram + feat)
    # one output: Θ = ‖W2‖² xᵀx' + (W1 x)ᵀ(W1 x')
    model1 = nn.Sequential(model[0], nn.Linear(n, 1, bias=False)).double()
    v = model1[1].weight.detach()
    _close(ntk(model1, x1, x2, method=method), (v * v).sum() * gram + feat)


@pytest.mark.parametrize("per_output", [True, False])
@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_jacobian_ntk_vp_and_brute_force_agree(net, per_output):
    model = _mlp() if net == "mlp" else _conv()
    x1, x2 = (_inputs(), _inputs(4, seed=2)) if net == "mlp" else (_conv_inputs(5, 0), _conv_inputs(3, 1))
    brute = _brute(model, x1, x2)
    ref = _per_output(brute) if per_output else brute
    for method in ("jacobian", "ntk_vp", "auto"):
        _close(ntk(model, x1, x2, per_output=per_output, method=method), ref)
    # x2 = None: the symmetric kernel of x1 (blocks computed once and mirrored)
    self_ref = _brute(model, x1, x1)
    self_ref = _per_output(self_ref) if per_output else self_ref
    for method in ("jacobian", "ntk_vp"):
        _close(ntk(model, x1, per_output=per_output, method=method), self_ref)
    # A tiny budget forces one input per chunk and one NTK-vector-product column at a time
    # (slow for the conv net's forward-mode AD: checked on the MLP only); a budget of a
    # few Jacobians forces chunks of several inputs and several columns at a time.
    budgets = [1, 20_000] if net == "mlp" else [20_000]
    for method in ("jacobian", "ntk_vp"):
        for budget in budgets:
            _close(ntk(model, x1, per_output=per_output, method=method, max_memory=budget), self_ref)
            _close(ntk(model, x1, x2, per_output=per_output, method=method, max_memory=budget), ref)


def test_frozen_parameters_drop_out():
    model = _mlp()
    x1, x2 = _inputs(), _inputs(4, seed=2)
    everything = _per_output(_brute(model, x1, x2))
    model[0].bias.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    ref = _per_output(_brute(model, x1, x2))
    assert float((ref - everything).abs().max()) > 1e-3 * float(everything.abs().max())
    for method in ("jacobian", "ntk_vp"):
        _close(ntk(model, x1, x2, method=method), ref)


def test_does_not_modify_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 4), nn.Dropout(0.5), nn.Linear(4, 2)).float()  # training mode
    x = _inputs()
    k = ntk(model, x)
    assert model.training and model[0].weight.dtype == torch.float32
    ref = _per_output(_brute(model, x, x))  # eval mode: dropout off
    _close(k, ref)


def _ntp_factory(n: int) -> nn.Module:
    model = nn.Sequential(nn.Linear(D, n), nn.Tanh(), nn.Linear(n, 2))
    nn.init.normal_(model[0].weight, std=math.sqrt(2.0 / D))
    nn.init.normal_(model[0].bias, std=0.3)
    nn.init.normal_(model[2].weight, std=math.sqrt(1.5 / n))
    nn.init.uniform_(model[2].bias, -0.5, 0.5)
    return model


def test_ntk_parametrization_weights_each_parameter_by_its_variance():
    width = 8
    inits = read_initialization(_ntp_factory, (width, 2 * width))
    v = {n: p.variances[0] for n, p in inits.items()}
    expected = {"0.weight": 2.0 / D, "0.bias": 0.09, "2.weight": 1.5 / width, "2.bias": 1.0 / 12}
    for n, val in expected.items():
        assert v[n] == pytest.approx(val, rel=1e-12)
    torch.manual_seed(0)
    model = _ntp_factory(width).double()
    x1, x2 = _inputs(), _inputs(4, seed=2)
    full = _brute(model, x1, x2, weights=v)
    for method in ("jacobian", "ntk_vp"):
        _close(ntk(model, x1, x2, per_output=False, method=method, parametrization="ntk", variances=v), full)
        _close(ntk(model, x1, x2, method=method, parametrization="ntk", variances=v), _per_output(full))
    standard = ntk(model, x1, x2)
    assert float((standard - _per_output(full)).abs().max()) > 0.1 * float(standard.abs().max())


# -- Monte Carlo ---------------------------------------------------------------------------


class _NTPReLU(nn.Module):
    """f(x) = Σ_i v_i relu(ω_i·x / √d) / √n with ω, v ~ N(0, 1): the NTK parametrization
    written out, so that gradients w.r.t. the parameters as they are give the NTP NTK."""

    def __init__(self, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.empty(n, D))
        self.v = nn.Parameter(torch.empty(1, n))
        nn.init.normal_(self.w)
        nn.init.normal_(self.v)

    def forward(self, x):
        n = self.w.shape[0]
        return torch.relu(x @ self.w.T / math.sqrt(D)) @ self.v.T / math.sqrt(n)


class _SPReLU(nn.Module):
    """The same function in standard parametrization: W ~ N(0, 1/d), V ~ N(0, 1/n), no
    multipliers; built from the same random draws as _NTPReLU."""

    def __init__(self, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.empty(n, D))
        self.v = nn.Parameter(torch.empty(1, n))
        nn.init.normal_(self.w, std=1 / math.sqrt(D))
        nn.init.normal_(self.v, std=1 / math.sqrt(n))

    def forward(self, x):
        return torch.relu(x @ self.w.T) @ self.v.T


def _relu_ntk(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Θ = (x·x'/d) E[relu'(u) relu'(u')] E[v²] + E[relu(u) relu(u')], (u, u') ~ N(0, Gram/d):
    arc-cosine kernels of order 0, (π − θ)/(2π), and 1, (s s'/2π)(sin θ + (π − θ) cos θ)."""
    gram = x1 @ x2.T / D
    s = x1.norm(dim=1)[:, None] * x2.norm(dim=1)[None, :] / D
    cos = (gram / s).clamp(-1, 1)
    theta = torch.arccos(cos)
    k0 = (math.pi - theta) / (2 * math.pi)
    k1 = s / (2 * math.pi) * (torch.sin(theta) + (math.pi - theta) * cos)
    return gram * k0 + k1


def test_ntk_mean_relu_matches_infinite_width_ntk():
    # Given x, the pre-activations u_i = ω_i·x/√d are exactly Gaussian and iid over units and
    # v is independent of them, so E[Θ_s] equals the limit at every width: only Monte Carlo
    # error. Per sample Θ_s has relative s.d. ≈ √(1.25/n)/0.5 ≈ 7% (E[relu⁴]=3/2·s², E[v⁴]=3);
    # with 128 samples the SE is ≈ 0.6% of the kernel, so a 3% error is ≈ 5 SE and fails.
    x = _inputs()
    expected = _relu_ntk(x, x)
    k = ntk_mean(_NTPReLU, 1024, x, samples=128, seed=0)
    assert isinstance(k, EmpiricalKernel) and k.mean.shape == (6, 6) and k.samples == 128 and k.width == 1024
    diag = torch.diagonal(k.stderr / expected)
    assert float(diag.max()) < 0.03 / 4.5, diag
    err = (k.mean - expected).abs()
    # θ = π pair: both terms vanish identically; 1e-12 absorbs sin(π) ≈ 1e-16 in the formula.
    ok = err <= 4.5 * k.stderr + 1e-12
    pos = k.stderr > 0
    assert bool(ok.all()), f"worst |error|/stderr = {float((err[pos] / k.stderr[pos]).max()):.2f}"

    # The same networks written in SP (same draws), with parametrization="ntk": the
    # variances read from the code (1/d, 1/n) weight the contractions, giving the same NTK.
    sp = ntk_mean(_SPReLU, 1024, x, samples=8, seed=0, parametrization="ntk")
    ntp = ntk_mean(_NTPReLU, 1024, x, samples=8, seed=0)
    _close(sp.mean, ntp.mean, rel=1e-10)
    # ...while the SP NTK of the code as written is a different (width-growing) kernel.
    plain = ntk_mean(_SPReLU, 1024, x, samples=2, seed=0)
    assert float(plain.mean[0, 0]) > 10 * float(expected[0, 0])


def test_ntk_mean_stderr_shrinks_with_samples():
    x = _inputs(4)[:3]  # no anti-parallel pair: every entry has a positive standard error
    small = ntk_mean(_NTPReLU, 64, x, samples=16, seed=0)
    large = ntk_mean(_NTPReLU, 64, x, samples=144, seed=0)
    # expected ratio √(144/16) = 3; the SE estimate from 16 samples is uncertain by ~20%
    ratio = float((small.stderr / large.stderr).log().mean().exp())
    assert 3 / 1.8 < ratio < 3 * 1.8, ratio


def test_ntk_mean_is_the_per_sample_average():
    x1, x2 = _inputs(), _inputs(3, seed=5)
    k = ntk_mean(_ntp_factory, 6, x1, x2, samples=3, seed=4)
    ks = []
    for s in range(3):
        torch.manual_seed(4 + s)
        ks.append(ntk(_ntp_factory(6), x1, x2))
    ks = torch.stack(ks)
    _close(k.mean, ks.mean(0))
    _close(k.stderr, ks.std(0) / math.sqrt(3), rel=1e-10)


# -- errors --------------------------------------------------------------------------------


def test_no_trainable_parameters():
    model = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ntk(model, _inputs())


def test_nan_inputs():
    x = _inputs()
    x[2, 1] = float("inf")
    with pytest.raises(ValueError, match="x1 contains NaN or Inf"):
        ntk(_mlp(), x)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="x2 contains NaN or Inf"):
        ntk(_mlp(), _inputs(), x)


def test_trailing_shapes_differ():
    with pytest.raises(ValueError, match=r"same shape after the batch dimension; got \(5,\) and \(4,\)"):
        ntk(_mlp(), _inputs(), torch.zeros(2, 4))


def test_unknown_method_and_parametrization():
    with pytest.raises(ValueError, match="unknown method 'svd'"):
        ntk(_mlp(), _inputs(), method="svd")
    with pytest.raises(ValueError, match="unknown parametrization 'mup'"):
        ntk(_mlp(), _inputs(), parametrization="mup")
    with pytest.raises(ValueError, match="unknown parametrization 'mup'"):
        ntk_mean(_NTPReLU, 8, _inputs(), parametrization="mup")


def test_ntk_parametrization_needs_variances():
    with pytest.raises(ValueError, match="pass variances=.*read_initialization"):
        ntk(_mlp(), _inputs(), parametrization="ntk")
    with pytest.raises(ValueError, match=r"no entry for the trainable parameters \['4.weight', '4.bias'\]"):
        ntk(_mlp(), _inputs(), parametrization="ntk",
            variances={"0.weight": 1.0, "0.bias": 1.0, "2.weight": 1.0, "2.bias": 1.0})


# -- structured derivatives (linear layers) -------------------------------------------------


class _Tied(nn.Module):
    """A weight used by a linear layer and by a plain matmul: not structured-eligible."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.a = nn.Linear(D, D)
        self.out = nn.Linear(D, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.a(x)) @ self.a.weight)


@pytest.mark.parametrize("per_output", [True, False])
def test_structured_matches_brute_force(per_output):
    """Linear-layer Gram contractions vs per-example autograd: same kernel, with biases, three
    outputs, x2 given or not, a frozen weight, both parametrizations."""
    model = _mlp()
    model[2].weight.requires_grad_(False)
    x1, x2 = _inputs(6, 1), _inputs(4, 2)
    v = {n: 0.1 * (i + 1) for i, (n, _) in enumerate(model.named_parameters())}
    for par, w in (("standard", None), ("ntk", v)):
        ref = _brute(model, x1, x2, w)
        ref_sym = _brute(model, x1, x1, w)
        if per_output:
            ref, ref_sym = _per_output(ref), _per_output(ref_sym)
        kw = dict(per_output=per_output, parametrization=par, variances=w)
        _close(ntk(model, x1, x2, method="structured", **kw), ref)
        _close(ntk(model, x1, method="structured", **kw), ref_sym)
        _close(ntk(model, x1, x2, method="auto", **kw), ref)


def test_structured_falls_back_when_a_parameter_has_another_use():
    model = _Tied().double()
    x1, x2 = _inputs(5, 1), _inputs(3, 2)
    ref = _per_output(_brute(model, x1, x2))
    _close(ntk(model, x1, x2), ref)  # auto: the Jacobian contraction
    with pytest.raises(ValueError, match="method='structured' needs every trainable parameter"):
        ntk(model, x1, x2, method="structured")
    conv = _conv()  # convolution weights: not linear layers
    c1, c2 = _conv_inputs(3, 1), _conv_inputs(2, 2)
    _close(ntk(conv, c1, c2), _per_output(_brute(conv, c1, c2)))
