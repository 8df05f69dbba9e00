"""Hand-written Tensor Programs used by the demo, the docs and the tests' examples."""

from __future__ import annotations

import torch

from .program import Program, Vector
from .program import functions as F


def mlp(
    x: torch.Tensor,
    depth: int = 3,
    activation=F.relu,
    weight_variance: float = 2.0,
    bias_variance: float = 0.0,
) -> tuple[Program, Vector]:
    """The program of a ``depth``-layer MLP on inputs ``x`` ``[N, d]`` (NTK/standard init).

    ``h1 = W1 x/√d + b1`` is an initial vector (finite fan-in), then
    ``h_{l+1} = W_{l+1} φ(h_l) + b_{l+1}``. Returns the program and the last
    pre-activation, whose limiting covariance ``[N, N]`` is the NNGP kernel.
    """
    P = Program()
    h = P.input_layer(x, weight_variance, bias_variance, name="h1")
    for layer in range(2, depth + 1):
        W = P.matrix(f"W{layer}", variance=weight_variance)
        a = P.nonlin(activation, h, name=f"x{layer - 1}")
        g = W @ a
        if bias_variance > 0:
            b = P.vector(f"b{layer}", variance=bias_variance)
            h = P.lincomb([1.0, 1.0], [g, b], name=f"h{layer}")
        else:
            h = g
    return P, h
