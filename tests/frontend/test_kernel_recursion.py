"""The batched kernel recursion (kernels/recursion.py) against the Master Theorem engine's
path on the same lowered programs (NNGP, NTK through the backward program), to float64
rounding, and its blocking, scope checks and position maps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tensorprograms as tp
from tensorprograms.frontend.limit import InfiniteWidthLimit
from tensorprograms.kernels import NotApplicable, kernels_by_recursion
from tensorprograms.kernels.operators import SpatialOp, translate_sum

from .models import init_

SW2, SB2 = 2.0, 0.05


class Myrtle(nn.Module):
    """2 × [conv 3×3 SAME, relu], avgpool 2×2, conv, relu, global avgpool, dense (nt_compare's CNN)."""

    def __init__(self, width, pool=nn.functional.avg_pool2d):
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.c3 = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Linear(width, 2)
        self.pool = pool
        init_(self, SW2, SB2)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        x = torch.relu(self.c3(self.pool(x, 2)))
        return self.out(x.mean(dim=(2, 3)))


class Strided1d(nn.Module):
    """conv1d stride 2 no padding, relu, conv1d dilation 2, relu, mean: maps that are not
    translations (strides, dilation), positions changing number."""

    def __init__(self, width):
        super().__init__()
        self.c1 = nn.Conv1d(2, width, 3, stride=2)
        self.c2 = nn.Conv1d(width, width, 3, dilation=2, padding=1)
        self.out = nn.Linear(width, 1)
        init_(self, SW2, SB2)

    def forward(self, x):
        return self.out(torch.relu(self.c2(torch.relu(self.c1(x)))).mean(-1))


def _inputs(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64)


def _engine(limit, x1, x2=None):
    """The same limit without the recursion: the engine's NNGP and backward-program NTK."""
    orig = InfiniteWidthLimit._by_recursion
    InfiniteWidthLimit._by_recursion = lambda *a, **k: None
    try:
        return limit.kernels(x1, x2)
    finally:
        InfiniteWidthLimit._by_recursion = orig


def _close(a, b):
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= 1e-12 * scale, float((a - b).abs().max()) / scale


@pytest.mark.parametrize("model,shape", [(Myrtle, (3, 4, 4)), (Strided1d, (2, 11))])
def test_recursion_equals_engine(model, shape):
    x = _inputs(shape)
    limit = tp.infinite_width(model, x)
    K, T = limit.kernels(x)
    direct = kernels_by_recursion(limit.program, limit.output.var, len(x), lambda p: 1.0)
    _close(direct[1], T)  # the recursion is the route taken (NTK parametrization: weights 1)
    K0, T0 = _engine(limit, x)
    _close(K, K0)
    _close(T, T0)
    # cross kernels and the NNGP alone take the same route
    K12, T12 = limit.kernels(x[:1], x[1:])
    _close(K12, K0[:1, 1:])
    _close(T12, T0[:1, 1:])
    _close(limit.nngp(x[:3], x[3:]), K0[:3, 3:])


def test_recursion_is_used_and_blocking_does_not_change_values():
    x = _inputs((3, 4, 4), n=5)
    limit = tp.infinite_width(Myrtle, x)
    limit.kernels(x)
    program, out = limit.program, limit.output

    def weight(prim):
        return 1.0

    big = kernels_by_recursion(program, out.var, 5, weight)
    small = kernels_by_recursion(program, out.var, 5, weight, block_entries=16, min_pairs=1)  # a pair a block
    for a, b in zip(big, small):
        _close(a, b)


def test_frozen_and_standard_parametrization_match_engine():
    x = _inputs((3, 4, 4), n=3)

    def frozen(width):
        m = Myrtle(width)
        m.c2.weight.requires_grad_(False)
        return m

    limit = tp.infinite_width(frozen, x)
    _close(limit.ntk(x), _engine(limit, x)[1])
    std = tp.infinite_width(Myrtle, x, parametrization="standard", nominal_width=32)
    _close(std.ntk(x), _engine(std, x)[1])


def test_out_of_scope_programs_fall_back_to_the_engine():
    x = _inputs((3, 4, 4), n=2)
    limit = tp.infinite_width(lambda w: Myrtle(w, pool=nn.functional.max_pool2d), x)
    with pytest.raises(NotApplicable, match="nonlinearity outside"):
        kernels_by_recursion(limit.program, limit.output.var, 2, None)
    K, T = limit.kernels(x)  # the engine's path
    assert torch.isfinite(K).all() and torch.isfinite(T).all()


def test_spatial_op_structures():
    """Translations, Kronecker products of pooling windows and generic maps apply M C Mᵀ."""
    g = torch.Generator().manual_seed(1)
    c = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    shift = torch.zeros(16, 16, dtype=torch.float64)
    for y in range(4):
        for x in range(4):
            if y + 1 < 4 and x - 1 >= 0:
                shift[y * 4 + x, (y + 1) * 4 + x - 1] = 1.0
    pool = torch.kron(torch.kron(torch.eye(2), torch.ones(1, 2)), torch.kron(torch.eye(2), torch.ones(1, 2)))
    pool = pool.to(torch.float64) / 4
    generic = torch.randn(5, 16, generator=g, dtype=torch.float64)
    for m, out, kind in ((shift, (4, 4), "offset"), (pool, (2, 2), "factors"), (generic, (5,), None)):
        op = SpatialOp(m, (4, 4), out)
        if kind is not None:
            assert getattr(op, kind) is not None
        _close(op.pair(c), m @ c @ m.T)
    items = [((dy, dx), 0.7) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    want = sum(0.7 * SpatialOp(_shift(dy, dx), (4, 4), (4, 4)).matrix @ c @ _shift(dy, dx).T
               for (dy, dx), _ in items)
    _close(translate_sum(c, (4, 4), items), want)
    _close(translate_sum(c, (4, 4), items[:4]), want - sum(
        0.7 * _shift(dy, dx) @ c @ _shift(dy, dx).T for (dy, dx), _ in items[4:]))


def _shift(dy, dx):
    m = torch.zeros(16, 16, dtype=torch.float64)
    for y in range(4):
        for x in range(4):
            if 0 <= y + dy < 4 and 0 <= x + dx < 4:
                m[y * 4 + x, (y + dy) * 4 + x + dx] = 1.0
    return m


def test_memory_is_bounded_by_the_block():
    """The largest covariance block stays near block_entries, whatever N (here N²·P² = 2^18
    entries, blocks of 2^12)."""
    x = _inputs((3, 8, 8), n=8)
    limit = tp.infinite_width(Myrtle, x)
    limit.kernels(x)
    seen = []
    orig = SpatialOp.pair

    def spy(self, c):
        seen.append(c.numel())
        return orig(self, c)

    SpatialOp.pair = spy
    try:
        kernels_by_recursion(limit.program, limit.output.var, 8, lambda p: 1.0, block_entries=1 << 12,
                             min_pairs=1)
    finally:
        SpatialOp.pair = orig
    assert seen and max(seen) <= 2 * (1 << 12) * 1.0 + 1
    assert math.isfinite(sum(seen))


def test_fused_relu_pass_matches_closed_forms():
    """The fused ReLU pass (eager) equals closed_form.cross for relu·relu and step·step."""
    from tensorprograms.kernels import fused
    from tensorprograms.master import closed_form

    g = torch.Generator().manual_seed(2)
    v1 = torch.rand(3, 5, 1, generator=g, dtype=torch.float64) + 0.5
    v2 = torch.rand(3, 1, 5, generator=g, dtype=torch.float64) + 0.5
    c = (torch.rand(3, 5, 5, generator=g, dtype=torch.float64) * 2 - 1) * (v1 * v2).sqrt()
    theta = torch.rand(3, 5, 5, generator=g, dtype=torch.float64)
    relu, step = closed_form.terms_of(torch.relu), closed_form.terms_of(closed_form.derivative(torch.relu))
    want = torch.stack((closed_form.cross(relu, relu, v1, v2, c),
                        closed_form.cross(step, step, v1, v2, c) * theta))
    _close(fused.relu_pair(v1, v2, c, theta), want)


@pytest.mark.slow
def test_compiled_relu_pass_matches_eager():
    """torch.compile's fused loop (used for large jobs) equals the eager pass (tens of seconds
    of compilation)."""
    from tensorprograms.kernels import fused

    g = torch.Generator().manual_seed(3)
    v1 = torch.rand(4, 6, 1, generator=g, dtype=torch.float64) + 0.5
    v2 = torch.rand(4, 1, 6, generator=g, dtype=torch.float64) + 0.5
    c = (torch.rand(4, 6, 6, generator=g, dtype=torch.float64) * 2 - 1) * (v1 * v2).sqrt()
    theta = torch.rand(4, 6, 6, generator=g, dtype=torch.float64)
    _close(fused.relu_pair(v1, v2, c, theta, compiled=True), fused.relu_pair(v1, v2, c, theta))


def test_default_pytorch_init_biases_as_constant_parameters():
    """PyTorch's default bias init vanishes with width: the bias is a constant-initialized
    parameter whose stand-in enters Θ only (standard parametrization) or not at all (NTK)."""
    x = _inputs((2, 7), n=3)

    def plain(width):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(2, width, 3, padding=1), nn.ReLU(), nn.Conv1d(width, width, 3),
                             nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, 1))

    for kw in ({}, {"parametrization": "standard", "nominal_width": 16}):
        limit = tp.infinite_width(plain, x, **kw)
        assert limit._lowering.ghosts
        kernels_by_recursion(limit.program, limit.output.var, 3, lambda p: 1.0,
                             ghosts=limit._lowering.ghosts)  # within its scope: no NotApplicable
        K, T = limit.kernels(x)
        K0, T0 = _engine(limit, x)
        _close(K, K0)
        _close(T, T0)
