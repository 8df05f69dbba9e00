"""The μP training limit: closed forms, exact vs particles, checkpoints, bad input."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import tensorprograms as tp
from tensorprograms.feature_learning import TrainingDiverged, limit_run

from .models import data, deep_linear, linear1, relu3, tanh1, tanh2

BASE = 16


_LIMITS: dict = {}


def trainer(factory, lr=0.02, **kw):
    """A fresh trainer; the captured limit is shared per factory (capture costs seconds)."""
    if factory not in _LIMITS:
        X, _, _ = data()
        _LIMITS[factory] = tp.infinite_width(factory, X, parametrization="mup", base_width=BASE)
    return _LIMITS[factory].trainer(lr=lr, **kw)


def test_one_hidden_linear_first_step_closed_form():
    """d -> n -> k linear, one SGD step from f₀ = 0 (MSE): by hand,
    f₁(ξ) = -Σ_i [(η/b) σ_v² + η b s₁] ⟨ξ_i, ξ⟩ χ_i, with s₁ = 1/3 the input weights' variance,
    σ_v² = b² · (1/b) the readout's, χ_i = -2 y_i / (B k)."""
    eta, b = 0.02, BASE
    X, batches, Xt = data(steps=1)
    xb, yb = batches[0]
    chi = -2.0 * yb / yb.numel()
    K = xb @ Xt.T
    expected = -((eta / b) * b + eta * b / 3.0) * (K.T @ chi)
    tr = trainer(linear1, lr=eta)
    assert tr.config.method == "exact"
    loss = tr.step(xb, yb)
    assert loss == pytest.approx(float(yb.pow(2).mean()), rel=1e-14)
    torch.testing.assert_close(tr.predict(Xt), expected, rtol=1e-12, atol=1e-14)


def test_exact_and_particles_agree_on_a_deep_linear_network():
    """Same limit two ways: the exact atom tracker and Monte Carlo over particles. The
    tolerance is 4 standard errors of the mean over independent particle seeds."""
    X, batches, Xt = data(steps=6)
    ex = limit_run(trainer(deep_linear), batches, Xt)
    runs = [limit_run(trainer(deep_linear, method="particles", particles=2**13, seed=s), batches, Xt)
            for s in range(6)]
    out = torch.stack([r.outputs for r in runs])
    se = out.std(0) / len(runs) ** 0.5
    assert ((out.mean(0) - ex.outputs).abs() <= 4 * se + 1e-12).all()
    losses = torch.stack([r.losses for r in runs])
    se_l = losses.std(0) / len(runs) ** 0.5
    assert ((losses.mean(0) - ex.losses).abs() <= 4 * se_l + 1e-12).all()


@pytest.mark.parametrize("factory,method,optimizer", [
    (tanh2, "particles", "sgd"), (deep_linear, "exact", "sgd"), (tanh1, "particles", "adam")])
def test_checkpoint_resume_is_bit_exact(factory, method, optimizer):
    X, batches, Xt = data(steps=6)
    full = trainer(factory, particles=2**10, optimizer=optimizer)
    assert full.config.method == method
    for xb, yb in batches:
        full.step(xb, yb)
    first = trainer(factory, particles=2**10, optimizer=optimizer)
    for xb, yb in batches[:3]:
        first.step(xb, yb)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = trainer(factory, particles=2**10, optimizer=optimizer)
    for xb, yb in batches[:1]:  # a trainer that has moved: loading must replace all of its state
        resumed.step(xb, yb)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    for xb, yb in batches[3:]:
        resumed.step(xb, yb)
    assert resumed.history == full.history
    assert torch.equal(resumed.predict(Xt), full.predict(Xt))


def test_checkpoint_from_another_configuration_is_rejected():
    tr = trainer(tanh2, particles=2**8)
    other = trainer(tanh2, particles=2**8, lr=0.03)
    with pytest.raises(ValueError, match="same lr"):
        other.load_state_dict(tr.state_dict())


def test_feature_kernel_at_init_is_the_nngp_of_the_hidden_layer():
    """Before training, E[x(ξ)x(ξ')] of the last hidden layer is that layer's NNGP kernel:
    for a linear one-hidden-layer net with N(0, 1/3) input weights it is ⟨ξ, ξ'⟩/3 exactly
    (exact method); after a step it has moved (feature learning)."""
    X, batches, Xt = data(steps=1)
    tr = trainer(linear1, lr=0.5)
    torch.testing.assert_close(tr.feature_kernel(Xt), Xt @ Xt.T / 3.0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(tr.feature_kernel(Xt, X), Xt @ X.T / 3.0, rtol=1e-12, atol=1e-14)
    tr.step(*batches[0])
    assert (tr.feature_kernel(Xt) - Xt @ Xt.T / 3.0).abs().max() > 1e-3


def test_particle_stderr_and_determinism():
    X, batches, Xt = data(steps=2)
    tr = trainer(relu3, particles=2**10)
    tr.train(batches, progress=False)
    f, se = tr.predict(Xt, stderr=True)
    assert se.shape == f.shape and (se > 0).all()
    assert torch.equal(tr.predict(Xt), f)


def test_divergence_names_step_and_scalar():
    X, batches, Xt = data(steps=40)
    tr = trainer(deep_linear, lr=5.0)
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+: .*(E\[\(h\^\d\)\^2\]|output|loss)"):
        tr.train(batches, progress=False)
    with pytest.raises(TrainingDiverged):
        tr.step(*batches[0])


def test_unsupported_optimizer_and_loss():
    with pytest.raises(tp.UnsupportedOperation, match=r"one hidden layer.*\['2.weight'\].*TP IVb"):
        trainer(tanh2, optimizer="adam")
    with pytest.raises(ValueError, match="method='exact' cannot train with Adam"):
        trainer(linear1, optimizer="adam", method="exact")
    assert trainer(linear1, optimizer="adam").config.method == "particles"
    with pytest.raises(ValueError, match="betas must be"):
        trainer(tanh1, optimizer="adam", betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps must be"):
        trainer(tanh1, optimizer="adam", eps=-1.0)
    with pytest.raises(tp.UnsupportedOperation, match="'rmsprop'"):
        trainer(tanh2, optimizer="rmsprop")
    with pytest.raises(ValueError, match="loss 'hinge'"):
        trainer(tanh2, loss="hinge")
    with pytest.raises(ValueError, match="method='exact' needs"):
        trainer(tanh2, method="exact")


class Residual(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, n), nn.Linear(n, n), nn.Linear(n, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.c(h + torch.tanh(self.b(h)))


def wide_hidden(n):
    return nn.Sequential(nn.Linear(3, n), nn.Tanh(), nn.Linear(n, 2 * n), nn.Tanh(), nn.Linear(2 * n, 2))


def with_norm(n):
    return nn.Sequential(nn.Linear(3, n), nn.LayerNorm(n), nn.Linear(n, 2))


@pytest.mark.parametrize("factory,match", [
    (Residual, "aten.add"),
    (wide_hidden, "must equal the width"),
    (with_norm, "neither a Linear layer nor an elementwise activation"),
])
def test_unsupported_architecture_names_the_op(factory, match):
    with pytest.raises(tp.UnsupportedOperation, match=match):
        trainer(factory)


def test_bad_batches():
    X, batches, Xt = data(steps=1)
    tr = trainer(tanh2, particles=2**8)
    with pytest.raises(ValueError, match=r"\[batch, 3\]"):
        tr.step(torch.zeros(2, 4), batches[0][1])
    with pytest.raises(ValueError, match=r"shape \[2, 2\]"):
        tr.step(batches[0][0], torch.zeros(2))
    ce = trainer(tanh2, particles=2**8, loss="cross_entropy")
    with pytest.raises(ValueError, match="in \\[0, 2\\)"):
        ce.step(batches[0][0], torch.tensor([0, 5]))
    assert ce.step(batches[0][0], torch.tensor([0, 1])) > 0


def test_mup_limit_has_no_kernels_and_other_limits_no_trainer():
    X, _, _ = data()
    lim = tp.infinite_width(tanh2, X, parametrization="mup")
    assert lim.base_width == 64
    with pytest.raises(ValueError, match="no NNGP/NTK"):
        lim.nngp(X)
    with pytest.raises(ValueError, match="needs parametrization='mup'"):
        tp.infinite_width(tanh2, X).trainer(lr=0.1)
    with pytest.raises(ValueError, match="base_width applies"):
        tp.infinite_width(tanh2, X, base_width=8)


class Swish(nn.Module):
    """A composite activation written functionally: x * sigmoid(x), then an affine layer."""

    def __init__(self, n, affine=False):
        super().__init__()
        self.a, self.b = nn.Linear(3, n), nn.Linear(n, 2)
        self.affine = affine

    def forward(self, x):
        h = self.a(x)
        return self.b(2.0 * h + 1.0 if self.affine else h * torch.sigmoid(h))


def test_composite_and_affine_activations_are_recognised():
    X, batches, Xt = data(steps=2)
    sw = trainer(Swish, particles=2**8)
    assert sw.config.method == "particles"
    assert sw.spec.activations[0].affine is None and len(sw.spec.activations[0].ops) == 2
    sw.train(batches, progress=False)
    af = tp.infinite_width(lambda n: Swish(n, affine=True), X, parametrization="mup", base_width=BASE)
    tr = af.trainer(lr=0.02)
    assert tr.config.method == "exact" and tr.spec.activations[0].affine == (2.0, 1.0)
    tr.train(batches, progress=False)
