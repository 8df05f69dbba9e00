"""Gradient-flow predictions vs actually training finite PyTorch networks.

The network is the ordinary module ``MLP`` (weights N(0, σ²/fan_in), biases N(0, σ_b²));
training in the NTK parametrization (p = √v_p · ω_p, gradient descent on ω_p) is gradient
descent on p with each parameter's step scaled by its per-entry initialization variance
v_p (read from the code by ``read_initialization``, as ``tp.empirical.ntk`` does):
``p ← p − lr · v_p · ∂L/∂p``, ``L = 1/(2N) Σ_i ||f(x_i) − y_i||²``.

Prediction for that network: ``tp.predict.gradient_flow`` with the *limit* NTK and the
network's own initial outputs f_0. The difference has two sources, both O(width^-1/2):
the finite network's NTK fluctuates around the limit at init, and it moves during
training (Lee et al. 2019, Theorem 2.1). The time discretization (steps of lr) is measured
separately on the limit kernel and is far below the width error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tensorprograms as tp
from frontend.models import MLP
from tensorprograms.frontend import read_initialization
from tensorprograms.predict import gradient_flow

LR, STEPS = 0.2, 150  # lr·t = 30: the training loss falls by orders of magnitude


def data(d=5, n=8, m=4):
    gen = torch.Generator().manual_seed(11)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    Xt = torch.randn(m, d, generator=gen, dtype=torch.float64)
    Y = torch.sin(X.sum(1, keepdim=True)).repeat(1, 2) * torch.tensor([1.0, -0.5], dtype=torch.float64)
    return X, Xt, Y


def train_ntk_param(factory, width, seed, X, Xt, Y, lr=LR, steps=STEPS):
    """(f_0(X), f_0(Xt), f_T(X), f_T(Xt)) of factory(width) trained by full-batch GD in the
    NTK parametrization."""
    v = {n: p.variances[0] for n, p in read_initialization(factory, (width, 2 * width)).items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(width).double()
    params = dict(model.named_parameters())
    with torch.no_grad():
        f0X, f0t = model(X), model(Xt)
    n = X.shape[0]
    for _ in range(steps):
        loss = 0.5 * ((model(X) - Y) ** 2).sum() / n
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for (name, p), g in zip(params.items(), grads):
                p -= lr * v[name] * g
    with torch.no_grad():
        return f0X, f0t, model(X), model(Xt)


def errors(factory, widths, seeds, X, Xt, Y):
    """RMS over seeds and outputs of |trained − predicted| per width, and the RMS change of
    the outputs during training (the scale the errors are small against)."""
    limit = tp.infinite_width(factory, X.float())
    blocks = tp.predict.limit_kernels(limit, X, Xt)["ntk"]
    n = X.shape[0]
    # time discretization: GD on the linearized limit model vs gradient flow, same kernel
    step = torch.eye(n, dtype=torch.float64) - LR / n * blocks.train
    lin = Y - torch.linalg.matrix_power(step, STEPS) @ Y
    flow = gradient_flow(blocks.train, Y, t=STEPS, lr=LR).mean
    discretization = (lin - flow).abs().max().item()
    out, moved = [], []
    for w in widths:
        sq, mv = [], []
        for s in seeds:
            f0X, f0t, fX, ft = train_ntk_param(factory, w, s, X, Xt, Y)
            pX = gradient_flow(blocks.train, Y, t=STEPS, lr=LR, f0_train=f0X).mean
            pt = gradient_flow(blocks.train, Y, blocks.test_train, t=STEPS, lr=LR,
                               f0_train=f0X, f0_test=f0t).mean
            sq.append(torch.cat([fX - pX, ft - pt]).pow(2).mean().item())
            mv.append(torch.cat([fX - f0X, ft - f0t]).pow(2).mean().item())
        out.append(math.sqrt(np.mean(sq)))
        moved.append(math.sqrt(np.mean(mv)))
    return np.array(out), np.array(moved), discretization


def check_width_law(widths, err, moved, discretization):
    slope = np.polyfit(np.log(widths), np.log(err), 1)[0]
    # width^-1/2 law: slope −0.5; the range allows the seed-to-seed spread of 4-6 networks
    assert -0.75 < slope < -0.3, f"log-log slope {slope:.2f}, errors {err}"
    # the prediction is far better than "no training" (a test that could fail)
    assert err[-1] < 0.05 * moved[-1], (err, moved)
    assert discretization < 0.1 * err[-1]


def _check(factory, widths, seeds):
    X, Xt, Y = data()
    err, moved, disc = errors(factory, widths, seeds, X, Xt, Y)
    print("widths", widths, "RMS error", err, "× √n", err * np.sqrt(widths), "moved", moved, "disc", disc)
    check_width_law(widths, err, moved, disc)


def test_one_hidden_layer_training_matches_gradient_flow():
    # measured: RMS error × √n = 0.68, 0.63, 0.64 at widths 256, 1024, 4096 (6 seeds)
    _check(lambda w: MLP(w, torch.relu, d=5, k=2, depth=1), [256, 1024, 4096], range(6))


@pytest.mark.slow
def test_two_hidden_layers_tanh_training_matches_gradient_flow():
    # measured: RMS error × √n = 0.65, 0.54, 0.58 at widths 128, 512, 2048 (6 seeds; 155 s)
    _check(lambda w: MLP(w, torch.tanh, d=5, k=2, depth=2), [128, 512, 2048], range(6))
