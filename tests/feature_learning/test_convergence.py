"""Finite-width μP networks (tp.mup, same hyperparameters) converge to the computed limit
like width^-1/2: outputs on held-out inputs after training and the loss curve.

The slope's tolerance is 3 standard errors, propagated from the seed-to-seed spread of the
distances at each width (``Convergence.slope_stderr``). The Monte Carlo floor of the
particle method (the spread between two particle seeds, divided by √2) is measured in the
slow tests and must lie below the distance at the largest width. Measured with M = 2^16 for
the 2-hidden-layer tanh MLP: floor 4.6e-3 against 6.7e-3 at width 4096, so width 4096 is
near the floor (the slope over 64-4096 is still -0.55 ± 0.07)."""

from __future__ import annotations

import pytest
import torch

import tensorprograms as tp
from tensorprograms.feature_learning import convergence, limit_run

from .models import data, deep_linear, relu3, tanh1, tanh2

BASE = 16


def _check(factory, lr, steps, widths, seeds, particles=2**14, readout_bias=None, floor=False,
           optimizer="sgd"):
    X, batches, Xt = data(steps=steps)
    lim = tp.infinite_width(factory, X, parametrization="mup", base_width=BASE)
    run = limit_run(lim.trainer(optimizer, lr=lr, particles=particles), batches, Xt)
    conv = convergence(factory, run, widths, seeds, BASE, batches, Xt, lr=lr, readout_bias=readout_bias,
                       progress=False, optimizer=optimizer)
    print(conv.table())
    for what in ("output", "loss"):
        s, se = conv.slope(what), conv.slope_stderr(what)
        print(f"{what}: slope {s:.3f} ± {se:.3f}")
        assert abs(s + 0.5) <= 3 * se, (what, s, se)
    if floor:
        other = limit_run(lim.trainer(optimizer, lr=lr, particles=particles, seed=1), batches, Xt)
        mc = float((other.outputs - run.outputs).pow(2).mean().sqrt()) / 2**0.5
        print(f"Monte Carlo floor (one run's output error, from two particle seeds): {mc:.2e}")
        assert mc < conv.output[-1]
    return conv


def test_deep_linear_exact_converges_short():
    _check(deep_linear, 0.02, 10, [16, 64, 256, 1024], 8)


def test_tanh_particles_converge_short():
    _check(tanh2, 0.05, 10, [16, 64, 256, 1024], 8, particles=2**15, readout_bias="4.bias")


def test_adam_one_hidden_layer_converges_short():
    """Adam (TP IVb): finite tp.mup.Adam nets (eps scaled by base/width) → the particle limit."""
    _check(tanh1, 0.01, 10, [16, 64, 256, 1024], 8, particles=2**15, readout_bias="2.bias", optimizer="adam")


@pytest.mark.slow
def test_adam_one_hidden_layer_converges_50_steps():
    _check(tanh1, 0.01, 50, [64, 256, 1024, 4096], 6, particles=2**16, readout_bias="2.bias", floor=True,
           optimizer="adam")


@pytest.mark.slow
def test_deep_linear_exact_converges_50_steps():
    _check(deep_linear, 0.02, 50, [64, 256, 1024, 4096], 6)


@pytest.mark.slow
def test_tanh_two_hidden_layers_converge_50_steps():
    _check(tanh2, 0.05, 50, [64, 256, 1024, 4096], 6, particles=2**16, readout_bias="4.bias", floor=True)


@pytest.mark.slow
def test_relu_three_hidden_layers_converge_50_steps():
    _check(relu3, 0.05, 50, [64, 256, 1024, 4096], 6, particles=2**16, floor=True)


def test_convergence_slope_fit_is_exact_on_a_power_law():
    w = [16, 64, 256]
    y = torch.tensor([float(x) ** -0.5 for x in w], dtype=torch.float64)
    c = tp.feature_learning.Convergence(w, y, 0.01 * y, 2 * y, 0.01 * y, 3)
    assert c.slope() == pytest.approx(-0.5, abs=1e-12)
    assert c.slope("loss") == pytest.approx(-0.5, abs=1e-12)
