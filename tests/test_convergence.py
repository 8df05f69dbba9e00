"""Finite-width runs of hand-written programs converge to the engine's limit like n^(-1/2).

At each width, many seeds; the error is the root-mean-square distance of the
finite-width quantity to the limit. The log-log slope is fitted by weighted least
squares with per-width standard errors from the spread over seeds (delta method), and
must be within 3 standard errors of -1/2.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tensorprograms as tp
from tensorprograms import functions as F


def deep_program(x):
    P = tp.Program()
    h1 = P.input_layer(x, 2.0, 0.1, name="h1")
    W2 = P.matrix("W2", variance=1.5)
    h2 = W2 @ P.nonlin(torch.tanh, h1)
    W3 = P.matrix("W3", variance=2.0, out_ratio=2.0)  # a 2n × n matrix
    b3 = P.vector("b3", variance=0.2, ratio=2.0)
    h3 = W3 @ P.nonlin(F.relu, h2) + b3
    theta = P.moment(lambda u: torch.sin(u) ** 2, h3, name="theta")
    return P, h3, theta


def fit_slope(widths, errs_by_seed):
    """Weighted least-squares slope of log RMS error vs log n, and its standard error."""
    logn, logr, se = [], [], []
    for n, e in zip(widths, errs_by_seed):
        e = np.asarray(e)
        ms = e.mean()
        logn.append(math.log(n))
        logr.append(0.5 * math.log(ms))
        se.append(0.5 * e.std(ddof=1) / (ms * math.sqrt(len(e))))
    logn, logr, w = np.array(logn), np.array(logr), 1 / np.array(se) ** 2
    X = np.stack([np.ones_like(logn), logn], 1)
    cov = np.linalg.inv(X.T @ (w[:, None] * X))
    beta = cov @ X.T @ (w * logr)
    return beta[1], math.sqrt(cov[1, 1])


def run_convergence(x, widths, seeds):
    P, h3, theta = deep_program(x)
    L = tp.master_theorem(P)
    K, t = L.cov(h3), L.value(theta)
    errs_k, errs_t = [], []
    for n in widths:
        ek, et, ks = [], [], []
        for s in range(seeds):
            run = tp.simulate(P, n, seed=1000 * n + s)
            ks.append(run.second_moment(h3))
            ek.append(((ks[-1] - K) ** 2).mean().item())
            et.append(((run[theta] - t) ** 2).mean().item())
        errs_k.append(ek)
        errs_t.append(et)
    # Unbiasedness at the largest width: the seed average sits on the limit within its
    # standard error (the O(1/n) bias is far below it at these widths).
    ks = torch.stack(ks)
    se = ks.std(0) / math.sqrt(seeds)
    z = ((ks.mean(0) - K) / se).abs().max().item()
    print(f"largest width: max |mean - limit| / SE = {z:.2f}")
    assert z < 4.5
    return fit_slope(widths, errs_k), fit_slope(widths, errs_t)


def check(slope, se, what):
    print(f"{what}: fitted log-log slope {slope:.3f} ± {se:.3f} (expected -0.5)")
    assert abs(slope + 0.5) < 3 * se, f"{what}: slope {slope:.3f} ± {se:.3f}"


def test_finite_width_converges_like_inverse_sqrt_width(inputs):
    (sk, sek), (st, set_) = run_convergence(inputs[:3], [2**8, 2**9, 2**10, 2**11], seeds=24)
    check(sk, sek, "kernel E[h3 h3ᵀ]")
    check(st, set_, "scalar θ = E[sin²(h3)]")


@pytest.mark.slow
def test_finite_width_converges_like_inverse_sqrt_width_to_4096(inputs):
    widths = [2**8, 2**9, 2**10, 2**11, 2**12]
    (sk, sek), (st, set_) = run_convergence(inputs[:4], widths, seeds=64)
    check(sk, sek, "kernel E[h3 h3ᵀ]")
    check(st, set_, "scalar θ")
