"""tp.infinite_width on plain PyTorch models: limit vs finite-width Monte Carlo of the same
module (tp.empirical.nngp), tolerance from the Monte Carlo standard error."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tensorprograms as tp
from tensorprograms.empirical import nngp as empirical_nngp

from .models import MLP, init_

WIDTH, SAMPLES, Z = 1024, 100, 4.5


@pytest.fixture
def x():
    gen = torch.Generator().manual_seed(7)
    # inputs of different norms (the kernels' dependence on norms is tested too)
    return torch.randn(5, 6, generator=gen) * torch.linspace(0.5, 2.0, 5)[:, None]


def check_against_monte_carlo(factory, x, width=WIDTH, samples=SAMPLES):
    K = tp.infinite_width(factory, x).nngp(x)
    emp = empirical_nngp(factory, width, x, samples=samples, seed=11)
    z = (emp.mean - K).abs() / emp.stderr
    assert z.max() < Z, f"max |MC - limit| / SE = {z.max():.2f}"
    return K, emp


ACTIVATIONS = {
    "relu": torch.relu,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "selu": F.selu,
    "gelu": F.gelu,
    "silu": F.silu,
    "mish": F.mish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "hardtanh": F.hardtanh,
    "erf": torch.special.erf,
    "sin": torch.sin,
    "identity": lambda u: u,
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_mlp_activations(x, name, bias):
    act = ACTIVATIONS[name]
    check_against_monte_carlo(lambda w: MLP(w, act, bias=bias), x)


class Residual(nn.Module):
    def __init__(self, width, scale=1.0, gate=False):
        super().__init__()
        self.inp, self.f, self.g = nn.Linear(6, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, 16)
        self.scale, self.gate = scale, gate
        init_(self)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.scale * torch.tanh(self.f(h))  # residual block, scaled branch
        if self.gate:
            h = torch.relu(self.f(h)) * torch.sigmoid(self.g(h))  # gating (and f used twice)
        return self.out(h)


@pytest.mark.parametrize("scale,gate", [(1.0, False), (0.5, False), (1.0, True)])
def test_residual_scaled_and_gated(x, scale, gate):
    check_against_monte_carlo(lambda w: Residual(w, scale, gate), x)


class Shared(nn.Module):
    """The same layer applied twice (weight sharing), and a scalar multiply."""

    def __init__(self, width):
        super().__init__()
        self.inp, self.h, self.out = nn.Linear(6, width), nn.Linear(width, width), nn.Linear(width, 16)
        init_(self)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.h(h))
        h = torch.relu(self.h(h)) * 1.3
        return self.out(h)


def test_weight_sharing(x):
    L = tp.infinite_width(Shared, x)
    assert sum(1 for m in L.program.matrices if m.name.startswith("h_weight")) == 1
    check_against_monte_carlo(Shared, x)


class Concatenated(nn.Module):
    """Two branches of different widths concatenated, then a hidden layer and a readout."""

    def __init__(self, width):
        super().__init__()
        self.a, self.b = nn.Linear(6, width), nn.Linear(6, 2 * width)
        self.h, self.out = nn.Linear(3 * width, width), nn.Linear(width, 16)
        init_(self)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=-1)
        return self.out(torch.relu(self.h(h)))


def test_concatenation_along_width(x):
    check_against_monte_carlo(Concatenated, x)


class Norms(nn.Module):
    def __init__(self, width, affine=True, rms=False):
        super().__init__()
        self.inp, self.h = nn.Linear(6, width), nn.Linear(width, 2 * width)
        self.out = nn.Linear(2 * width, 16)
        self.ln = nn.LayerNorm(2 * width, elementwise_affine=affine)
        self.rms = rms
        init_(self)

    def forward(self, x):
        h = self.h(torch.tanh(self.inp(x)))
        if self.rms:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        else:
            h = self.ln(h)
        return self.out(torch.relu(h))


@pytest.mark.parametrize("affine,rms", [(True, False), (False, False), (False, True)],
                         ids=["layernorm", "layernorm-noaffine", "rmsnorm"])
def test_layernorm_and_rmsnorm(x, affine, rms):
    check_against_monte_carlo(lambda w: Norms(w, affine, rms), x)


class CNN(nn.Module):
    def __init__(self, width, dims=1, stride=1, padding=1, dilation=1, pool="global", mode="zeros"):
        super().__init__()
        Conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.c1 = Conv(2, width, 3, padding=1)
        self.c2 = Conv(width, width, 3, stride=stride, padding=padding, dilation=dilation, padding_mode=mode)
        self.pool, self.dims = pool, dims
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(width, 8)
        init_(self)

    def forward(self, x):
        h = self.drop(torch.relu(self.c1(x)))
        h = torch.relu(self.c2(h))
        if self.pool == "avg":
            h = (F.avg_pool1d if self.dims == 1 else F.avg_pool2d)(h, 2)
        if self.pool == "adaptive":
            return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))
        dims = tuple(range(2, 2 + self.dims))
        return self.fc(h.mean(dims))


@pytest.mark.parametrize(
    "kw",
    [
        dict(dims=1),
        dict(dims=1, stride=2, pool="avg"),
        dict(dims=1, dilation=2, padding=2),
        dict(dims=1, mode="reflect"),
        dict(dims=1, mode="replicate"),
        dict(dims=2),
        dict(dims=2, pool="adaptive"),
        dict(dims=2, stride=2, padding=0),
    ],
    ids=["conv1d", "conv1d-stride-avgpool", "conv1d-dilation", "conv1d-reflect", "conv1d-replicate",
         "conv2d", "conv2d-adaptive", "conv2d-stride"],
)
def test_cnn(kw):
    gen = torch.Generator().manual_seed(3)
    shape = (3, 2, 6) if kw["dims"] == 1 else (3, 2, 4, 4)
    x = torch.randn(*shape, generator=gen) * torch.tensor([0.6, 1.0, 1.6]).reshape(3, *[1] * (len(shape) - 1))
    check_against_monte_carlo(lambda w: CNN(w, **kw).eval(), x, width=512, samples=60)


class FlatReadout(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.c1 = nn.Conv1d(2, width, 3, padding=1)
        self.fc = nn.Linear(width * 4, 8)
        init_(self)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.c1(x)), 1))


def test_flatten_readout_needs_only_same_position_pairs():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 4, generator=gen)
    K, _ = check_against_monte_carlo(FlatReadout, x, width=512, samples=100)
    # independent check: per-position arc-cosine kernel averaged over positions
    cov = torch.zeros(3, 3, 4)
    pad = F.pad(x, (1, 1))
    patches = torch.stack([pad[:, :, p:p + 3].reshape(3, -1) for p in range(4)], -1)  # [3, 6, 4]
    sw, sb = 1.5 / 6, 0.09
    for p in range(4):
        cov[:, :, p] = sw * patches[:, :, p] @ patches[:, :, p].T + sb
    d = torch.diagonal(cov, 0, 0, 1).T  # [3, 4]
    rho = (cov / torch.sqrt(d[:, None, :] * d[None, :, :])).clamp(-1, 1)
    t = torch.arccos(rho)
    norms = torch.sqrt(d[:, None, :] * d[None, :, :])
    relu_k = norms / (2 * math.pi) * (torch.sin(t) + (math.pi - t) * torch.cos(t))
    expected = 1.5 * relu_k.mean(-1) + 0.09
    torch.testing.assert_close(K, expected, rtol=1e-12, atol=0)


def test_nngp_of_two_batches(x):
    L = tp.infinite_width(lambda w: MLP(w, torch.relu), x)
    full = L.nngp(x)
    torch.testing.assert_close(L.nngp(x[:2], x[2:]), full[:2, 2:], rtol=1e-13, atol=0)
    assert L.nngp(x).dtype == torch.float64 and full.shape == (5, 5)
    assert "Matrix" in str(L.program)


# ----------------------------------------------------------------------------- errors
class Cumsum(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inp, self.out = nn.Linear(6, width), nn.Linear(width, 3)

    def forward(self, x):
        return self.out(torch.cumsum(torch.relu(self.inp(x)), dim=-1))


def test_unsupported_op_names_op_and_source_line(x):
    with pytest.raises(tp.UnsupportedOperation, match=r"aten\.cumsum.*test_infinite_width\.py.*line \d+"):
        tp.infinite_width(Cumsum, x)


def test_factory_ignoring_width(x):
    with pytest.raises(tp.WidthError, match="ignores its width"):
        tp.infinite_width(lambda w: MLP(16, torch.relu), x)


def test_diverging_initialization_reports_numbers(x):
    def factory(w):
        m = MLP(w, torch.relu)
        nn.init.normal_(m.hidden[0].weight, std=1.0)  # N(0, 1) hidden weights: no 1/fan_in
        return m

    with pytest.raises(tp.WidthError, match=r"hidden\.0\.weight.*variance 1 at fan-in 64.*diverges"):
        tp.infinite_width(factory, x)


class Branchy(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inp, self.out = nn.Linear(6, width), nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        if h.sum() > 0:  # data-dependent control flow
            h = -h
        return self.out(h)


def test_data_dependent_control_flow_gets_a_hint(x):
    with pytest.raises(tp.WidthError, match="torch.where"):
        tp.infinite_width(Branchy, x)


def test_bad_inputs(x):
    L = tp.infinite_width(lambda w: MLP(w, torch.relu), x)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        L.nngp(bad)
    with pytest.raises(ValueError, match=r"shapes \[\(5, 7\)\].*\('N', 6\)"):
        L.nngp(torch.randn(5, 7))
    with pytest.raises(ValueError, match="NaN or Inf"):
        tp.infinite_width(lambda w: MLP(w, torch.relu), bad)
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        tp.infinite_width(lambda w: "model", x)
    with pytest.raises(ValueError, match="parametrization"):
        tp.infinite_width(lambda w: MLP(w, torch.relu), x, parametrization="meanfield")
    with pytest.raises(ValueError, match="two increasing positive integers"):
        tp.infinite_width(lambda w: MLP(w, torch.relu), x, widths=(128, 64))
    with pytest.raises(TypeError, match="tensor or a tuple of tensors"):
        tp.infinite_width(lambda w: MLP(w, torch.relu), [[1.0, 2.0]])


class Default(nn.Module):
    """PyTorch's default initialization throughout (kaiming_uniform_ weights, uniform biases)."""

    def __init__(self, width):
        super().__init__()
        self.inp, self.h, self.out = nn.Linear(6, width), nn.Linear(width, width), nn.Linear(width, 32)

    def forward(self, x):
        return self.out(torch.relu(self.h(torch.relu(self.inp(x)))))


def test_default_pytorch_init(x):
    """Biases behind a width fan-in (variance 1/(3·fan_in)) vanish in the limit. At width n
    they are still there, so the finite-width reference is the limit with those two biases
    held at their width-n variance (stated with the `variances=` override); the remaining
    finite-width corrections are O(1/n), far below the Monte Carlo standard error."""
    v = 1 / (3 * WIDTH)
    kept = {"h.bias": (v, v), "out.bias": (v, v)}
    K = tp.infinite_width(Default, x).nngp(x)
    K_n = tp.infinite_width(Default, x, variances=kept).nngp(x)
    emp = empirical_nngp(Default, WIDTH, x, samples=200, seed=11)
    z = ((emp.mean - K_n).abs() / emp.stderr).max()
    assert z < Z, f"max |MC - limit at width-n biases| / SE = {z:.2f}"
    # the biases' effect is small but real: the limit without them is below K_n everywhere
    assert ((K_n - K) > 0).all() and ((K_n - K) < 0.05 * K.abs().max()).all()


class MaxPoolCNN(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.c1 = nn.Conv1d(2, width, 3, padding=1)
        self.c2 = nn.Conv1d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, 8)
        init_(self)

    def forward(self, x):
        h = F.max_pool1d(torch.relu(self.c1(x)), 2)  # a Nonlin mixing positions: joint Monte Carlo
        return self.fc(torch.relu(self.c2(h)).mean(-1))


def test_max_pool_joint_monte_carlo():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 2, 4, generator=gen)
    L = tp.infinite_width(MaxPoolCNN, x)
    K = L.nngp(x)
    limit = tp.master_theorem(L.program)
    limit.second_moment(L.output.var)
    assert any(r.backend == "monte_carlo" for r in limit.records)
    # the limit's own Monte Carlo error (2^16 samples) is far below the finite-width SE
    emp = empirical_nngp(MaxPoolCNN, 512, x, samples=100, seed=12)
    assert ((emp.mean - K).abs() / emp.stderr).max() < Z


def test_variance_override_changes_the_readout(x):
    """variances={'out.weight': v} states a parameter's per-entry variance exactly: the
    readout scales the whole kernel, minus its (unchanged) bias variance."""
    base = tp.infinite_width(lambda w: MLP(w, torch.relu), x).nngp(x)
    over = tp.infinite_width(
        lambda w: MLP(w, torch.relu), x, variances={"out.weight": (3.0 / 64, 3.0 / 128)}
    ).nngp(x)
    from .models import SB2, SW2

    torch.testing.assert_close(over - SB2, (base - SB2) * 3.0 / SW2, rtol=1e-12, atol=0)


def test_finite_fan_in_variance_must_not_depend_on_width():
    """An input layer or embedding table with a width-dependent (or zero) variance gets an
    error naming the parameter, both variances and the fix."""

    class Scaled(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.inp, self.out = nn.Linear(3, width), nn.Linear(width, 2)
            nn.init.normal_(self.inp.weight, std=width ** -0.5)  # shrinks with width: wrong

        def forward(self, x):
            return self.out(torch.relu(self.inp(x)))

    with pytest.raises(tp.WidthError, match=r"inp\.weight has a finite fan-in.*read .* at width 64.*"
                                            r"at width 128.*nn\.init\.normal_"):
        tp.infinite_width(Scaled, torch.randn(4, 3))

    class Table(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.emb, self.out = nn.Embedding(5, width), nn.Linear(width, 2)
            nn.init.normal_(self.emb.weight, std=width ** -0.5)

        def forward(self, ids):
            return self.out(self.emb(ids).mean(1))

    with pytest.raises(tp.WidthError, match=r"emb\.weight has a finite fan-in.*Embedding's default"):
        tp.infinite_width(Table, torch.tensor([[0, 1], [2, 3]]))
