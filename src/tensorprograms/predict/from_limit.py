"""Predictions straight from an :class:`~tensorprograms.InfiniteWidthLimit` and data."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..frontend.limit import InfiniteWidthLimit
from .core import Prediction, gp_posterior, gradient_flow

__all__ = ["KernelBlocks", "limit_kernels", "predict"]

KERNELS = ("nngp", "ntk")
METHODS = ("gp", "flow")


@dataclass
class KernelBlocks:
    """One kernel on train and test inputs (float64): ``train`` ``[N, N]``,
    ``test_train`` ``[M, N]`` and ``test`` ``[M, M]`` (both None without test inputs)."""

    train: Tensor
    test_train: Tensor | None
    test: Tensor | None


def limit_kernels(limit: InfiniteWidthLimit, x_train, x_test=None,
                  ntk: bool = True) -> dict[str, KernelBlocks]:
    """``{"nngp": KernelBlocks, "ntk": KernelBlocks}`` (``"ntk"`` only when ``ntk``) of the
    limit on ``x_train`` ``[N, ...]`` and ``x_test`` ``[M, ...]``, from one program on the
    concatenated inputs (the NNGP and NTK share the forward program)."""
    if not isinstance(limit, InfiniteWidthLimit):
        raise TypeError("limit must be a tp.InfiniteWidthLimit (tp.infinite_width(...)); "
                        f"got {type(limit).__name__}")
    xs_train = x_train if isinstance(x_train, (tuple, list)) else (x_train,)
    n = xs_train[0].shape[0]
    if x_test is None:
        xs = xs_train
    else:
        xs_test = x_test if isinstance(x_test, (tuple, list)) else (x_test,)
        if len(xs_test) != len(xs_train):
            raise ValueError("x_test must have as many input tensors as x_train")
        xs = tuple(torch.cat([a, b]) for a, b in zip(xs_train, xs_test))
    full = dict(zip(KERNELS, limit.kernels(xs))) if ntk else {"nngp": limit.nngp(xs)}
    out = {}
    for name, K in full.items():
        if x_test is None:
            out[name] = KernelBlocks(K, None, None)
        else:
            out[name] = KernelBlocks(K[:n, :n], K[n:, :n], K[n:, n:])
    return out


def predict(
    limit: InfiniteWidthLimit | dict[str, KernelBlocks],
    x_train,
    y_train: Tensor,
    x_test=None,
    *,
    kernel: str = "ntk",
    method: str = "flow",
    t: float = math.inf,
    lr: float = 1.0,
    noise: float = 0.0,
) -> Prediction:
    """Predict with the infinite-width network ``limit`` trained on ``(x_train, y_train)``.

    Args:
        limit: ``tp.infinite_width(...)``, or precomputed :func:`limit_kernels` (then
            ``x_train``/``x_test`` are ignored and may be None).
        x_train: ``[N, ...]`` inputs; ``y_train``: ``[N]`` or ``[N, k]`` targets (for classes,
            ``tp.predict.one_hot(labels)``).
        x_test: ``[M, ...]`` inputs, or None to predict the training outputs.
        kernel: ``"ntk"`` or ``"nngp"``.
        method: ``"flow"``: MSE gradient flow for time ``t`` with learning rate ``lr``
            (:func:`gradient_flow`; with ``kernel="nngp"`` this is training the readout
            only), covariance of the infinite ensemble from the NNGP; ``"gp"``: the GP
            posterior with kernel ``kernel`` (:func:`gp_posterior`).
        noise: observation noise (``"gp"``) or ridge (``"flow"``) added to the diagonal.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    blocks = limit if isinstance(limit, dict) else limit_kernels(
        limit, x_train, x_test, ntk=(kernel == "ntk"))
    if kernel not in blocks:
        raise ValueError(f"the precomputed kernels have {sorted(blocks)}; {kernel!r} is missing")
    k, g = blocks[kernel], blocks["nngp"]
    if method == "gp":
        return gp_posterior(k.train, y_train, k.test_train, k.test, noise=noise)
    return gradient_flow(k.train, y_train, k.test_train, t=t, lr=lr, noise=noise,
                         nngp_train=g.train, nngp_test_train=g.test_train, nngp_test=g.test)
