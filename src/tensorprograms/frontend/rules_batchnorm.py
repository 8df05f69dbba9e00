"""Lowering rules for ``nn.BatchNorm1d/2d``.

**Training mode (batch statistics).** Per channel c — a width coordinate — BatchNorm
normalizes by the mean and variance of that channel over the batch and the positions:
finite sums over finite indices of one width coordinate. In the program that is a Nonlin
mixing finite indices (like a max-pool or a softmax over positions), of finite shape
``(N, *positions)``, whose expectations the engine computes by quadrature or Monte
Carlo. The limit therefore depends on the batch: **the batch is the one the model is
given** — ``limit.nngp(x)`` normalizes over ``x``; ``limit.nngp(x1, x2)`` is the
``[N1, N2]`` cross block of the kernel of the model applied to the concatenated batch
``[x1; x2]`` (the statistics are those of the concatenation, as if both were one batch).
Its NTK is not per-example and is rejected.

**Eval mode (running statistics).** An affine map per channel. At initialization the
running mean and variance are 0 and 1 in every channel, so it is multiplication by a
constant; stored statistics that differ across channels are rejected.

The affine parameters must be constant at init (PyTorch's default: weight 1, bias 0), as
for LayerNorm: a random gain per width coordinate is not a Tensor Program operation here.
"""

from __future__ import annotations

import torch

from .lower import Lowering, rule
from .values import Data, Param, Tuple_, Vec

aten = torch.ops.aten


def _affine(low: Lowering, weight, bias) -> tuple[float, float]:
    """(gain, shift) of a BatchNorm's affine parameters, which must be constant at init."""
    gain, shift = 1.0, 0.0
    for p in (weight, bias):
        if p is None:
            continue
        v1, v2 = low.init_variance(p)
        if v1 != 0.0 or v2 != 0.0:
            raise low.unsupported(
                f"BatchNorm parameter {p.name} is randomly initialized; constant init (the default "
                "weight 1, bias 0) is supported."
            )
        if p is weight:
            gain = low.init_mean(p)[0]
        else:
            shift = low.init_mean(p)[0]
    return gain, shift


def _ghosts(low: Lowering, weight, bias, y, unit) -> None:
    """The affine parameters' NTK terms (constant at init, so absent from the forward pass):
    the gain's gradient is the cotangent times the normalized input ``unit``, the shift's
    the cotangent (as for LayerNorm)."""
    if weight is not None:
        low.ghost(weight, y, factor=unit)
    if bias is not None:
        low.ghost(bias, y)


def _check_input(low: Lowering, x) -> Vec:
    if not isinstance(x, Vec) or x.iid_outputs or x.axis != 1:
        raise low.unsupported("BatchNorm of something other than a width-channel activation [N, C, ...]")
    return x


def _stats_placeholders(node) -> list:
    """Data stand-ins for the op's other outputs (saved/running statistics), never used."""
    return [Data(torch.zeros(tuple(v.shape), dtype=torch.float64)) for v in node.meta["val"][1:]]


@rule(aten._native_batch_norm_legit_functional.default, aten._native_batch_norm_legit.default,
      consumes_buffers=True)
def _batch_norm_train(low: Lowering, node, args):
    """BatchNorm with batch statistics: a Nonlin over the finite batch (and positions) per channel."""
    x, weight, bias = args[0], args[1], args[2]
    training = args[5]  # (input, weight, bias, running_mean, running_var, training, momentum, eps)
    eps = float(args[-1])
    if not training:
        raise low.unsupported("BatchNorm with training=False through this op")
    x = _check_input(low, x)
    gain, shift = _affine(low, weight, bias)
    nf = len(x.finite_shape)

    def batch_norm(u, _nf=nf, _eps=eps, _g=gain, _s=shift):
        dims = tuple(range(u.ndim - _nf, u.ndim))  # the batch and positions of one channel
        mean = u.mean(dims, keepdim=True)
        var = u.var(dims, unbiased=False, keepdim=True)
        return _g * (u - mean) / torch.sqrt(var + _eps) + _s

    y = low.program.nonlin(batch_norm, x.var, elementwise=False)
    unit = y if (gain, shift) == (1.0, 0.0) else low.program.nonlin(
        lambda u, _g=gain, _s=shift: (u - _s) / _g, y, elementwise=True)
    _ghosts(low, weight, bias, y, unit)
    return Tuple_((Vec(y, x.shape, x.axis), *_stats_placeholders(node)))


@rule(aten._native_batch_norm_legit_no_training.default, consumes_buffers=True)
def _batch_norm_eval(low: Lowering, node, args):
    """BatchNorm with running statistics (eval mode): a constant affine map at initialization."""
    x, weight, bias, running_mean, running_var = args[:5]
    eps = float(args[-1])
    x = _check_input(low, x)
    gain, shift = _affine(low, weight, bias)
    buffers = dict(low.c.modules[0].named_buffers())
    stats = []
    for p in (running_mean, running_var):
        value = buffers[p.name] if isinstance(p, Param) else p.value
        if not bool((value == value.reshape(-1)[0]).all()):
            raise low.unsupported(
                f"BatchNorm running statistic {p.name if isinstance(p, Param) else ''} differs across "
                "channels; only the initial statistics (mean 0, variance 1 in every channel) are supported."
            )
        stats.append(float(value.reshape(-1)[0]))
    mean, var = stats
    scale = gain / (var + eps) ** 0.5
    if shift - scale * mean != 0.0:
        def affine(u, _a=scale, _b=shift - scale * mean):
            return _a * u + _b

        y = low.program.nonlin(affine, x.var, elementwise=True)
    elif x.var.is_gaussian:
        y = low.program.lincomb([scale], [x.var])
    else:
        y = low.program.nonlin(lambda u, _a=scale: _a * u, x.var, elementwise=True)
    if weight is not None or bias is not None:
        inv = (var + eps) ** -0.5
        if y.is_gaussian and shift == 0.0 and mean == 0.0:
            # the normalized input is y / gain: the same G-var when the gain is 1, so the
            # NTK's expectations see one Gaussian instead of two (y and its input), which
            # keeps them in closed form or quadrature instead of Monte Carlo
            unit = y if gain == 1.0 else low.program.lincomb([1.0 / gain], [y])
        else:
            unit = low.program.nonlin(lambda u, _m=mean, _i=inv: (u - _m) * _i, x.var, elementwise=True)
        _ghosts(low, weight, bias, y, unit)
    return Tuple_((Vec(y, x.shape, x.axis), *_stats_placeholders(node)))
