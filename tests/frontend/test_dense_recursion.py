"""The kernel recursion on dense tiles for programs without positions (MLPs, kernels/dense.py)
against the Master Theorem engine's path on the same lowered programs (NNGP, and the NTK
through the backward program), to float64 rounding; tiling, threads, symmetry and scope."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorprograms as tp
from tensorprograms.kernels import NotApplicable, dense, kernels_by_recursion

from .models import MLP, init_
from .test_kernel_recursion import _engine


def _close(a, b, tol=1e-12):
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= tol * scale, float((a - b).abs().max()) / scale


def _check(limit, x, x2=None):
    """``limit.kernels(x, x2)`` against the engine's, to 1e-12."""
    got = limit.kernels(x, x2)
    for a, b in zip(got, _engine(limit, x, x2)):
        _close(a, b)
    return got


def _x(n, d=6, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture
def spy():
    """Counts the calls of the dense path (the route taken) and sets tiny tiles and two
    threads, so that a dozen inputs span several tiles, remainder tiles and both threads."""
    calls = []
    orig, threads = dense.kernels, torch.get_num_threads()

    def counted(plan, batch, kinds, n1, workers, tile):
        calls.append((batch, n1))
        return orig(plan, batch, kinds, n1, 2, 5)

    dense.kernels = counted
    try:
        yield calls
    finally:
        dense.kernels = orig
        torch.set_num_threads(threads)


@pytest.mark.parametrize("depth,act,bias", [(1, torch.relu, True), (3, torch.relu, False),
                                            (2, torch.sin, True), (2, torch.abs, True),
                                            (4, torch.relu, True), (3, torch.erf, True)])
def test_mlps_equal_the_engine(spy, depth, act, bias):
    x = _x(12)
    x2 = torch.cat([_x(4, seed=1), x[2:5]])  # with copies of x's examples (ρ = 1 across x1, x2)
    limit = tp.infinite_width(lambda w: MLP(w, act, depth=depth, bias=bias), x[:2])
    K, T = limit.kernels(x)
    assert spy and spy[-1] == (12, None)
    assert torch.equal(K, K.T) and torch.equal(T, T.T)  # exactly symmetric
    K0, T0 = _engine(limit, x)
    _close(K, K0)
    _close(T, T0)
    K12, T12 = limit.kernels(x, x2)  # the cross block alone
    assert spy[-1] == (19, 12) and K12.shape == (12, 7)
    K0, T0 = _engine(limit, x, x2)
    _close(K12, K0)
    _close(T12, T0)
    _close(limit.nngp(x2, x), K0.T)  # the NNGP alone


def test_standard_parametrization_and_frozen_layers(spy):
    x = _x(11)
    std = tp.infinite_width(lambda w: MLP(w, torch.relu, depth=3), x[:2], parametrization="standard",
                            nominal_width=64)
    _close(std.ntk(x), _engine(std, x)[1])

    def frozen(width):
        m = MLP(width, torch.relu, depth=3)
        m.hidden[0].weight.requires_grad_(False)
        m.inp.bias.requires_grad_(False)
        return m

    limit = tp.infinite_width(frozen, x[:2])
    _close(limit.ntk(x), _engine(limit, x)[1])
    _close(limit.ntk(x[:4], x[4:]), _engine(limit, x[:4], x[4:])[1])
    assert len(spy) == 3


class TwoInputs(nn.Module):
    """Two data inputs of different fan-in summed into one layer: the input layer's initial
    vectors have different NTK weights in the standard parametrization (Θ's Gram is not a
    multiple of K's)."""

    def __init__(self, width):
        super().__init__()
        self.a, self.b = nn.Linear(3, width), nn.Linear(5, width, bias=False)
        self.out = nn.Linear(width, 1)
        init_(self)

    def forward(self, x, y):
        return self.out(torch.relu(self.a(x) + self.b(y)))


def test_inputs_with_different_weights(spy):
    xs = (_x(9, 3), _x(9, 5, seed=2))
    for kw in ({}, {"parametrization": "standard", "nominal_width": 32}):
        _check(tp.infinite_width(TwoInputs, tuple(t[:2] for t in xs), **kw), xs)
    assert len(spy) == 2


def test_zero_variance_inputs_and_pytorch_default_biases(spy):
    """A zero input without biases has variance 0 (the ReLU pass's general closed forms);
    PyTorch's default biases are constant-initialized parameters (NTK stand-ins)."""
    x = _x(8)
    x[3] = 0.0
    limit = tp.infinite_width(lambda w: MLP(w, torch.relu, depth=2, bias=False), x[:2])
    K, _ = _check(limit, x)
    assert K[3].abs().max() == 0

    def plain(width):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, 1))

    for kw in ({}, {"parametrization": "standard", "nominal_width": 16}):
        limit = tp.infinite_width(plain, x[:2], **kw)
        assert limit._lowering.ghosts
        _check(limit, x)
    assert len(spy) == 3


def test_tiles_threads_and_diagonals_do_not_change_values():
    """One thread and one tile, several tiles on two threads: the same kernels."""
    x = _x(13)
    limit = tp.infinite_width(lambda w: MLP(w, torch.relu, depth=3, k=1), x[:2])
    program, out = limit._lower((x,))
    out = out.var
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels_by_recursion(program, out, 13, lambda p: 1.0)
        torch.set_num_threads(2)
        many = kernels_by_recursion(program, out, 13, lambda p: 1.0, block_entries=16)  # 4 × 4 tiles
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        _close(b, a, 1e-15)
        assert torch.equal(b, b.T)


@pytest.mark.parametrize("act", [torch.tanh, torch.sigmoid])
def test_nonlinearities_without_closed_forms_fall_back(spy, act):
    """tanh and sigmoid have no closed form for E[φφ]; the engine integrates them."""
    x = _x(5)
    limit = tp.infinite_width(lambda w: MLP(w, act, depth=2, k=1), x[:2])
    program, out = limit._lower((x,))
    with pytest.raises(NotApplicable, match="no closed form"):
        kernels_by_recursion(program, out.var, 5, lambda p: 1.0)
    K, T = limit.kernels(x)  # the engine's path
    assert not spy and torch.isfinite(K).all() and torch.isfinite(T).all()


def test_compile_rule_is_ski_rental(monkeypatch):
    """"auto" compiles a job of ≥ COMPILE_MIN_ENTRIES entry-passes at once, smaller jobs once
    the process has run that much eagerly; True and False force it."""
    from tensorprograms.kernels import fused

    monkeypatch.setattr(fused, "_compiled", None)
    monkeypatch.setattr(fused, "_failed", False)
    monkeypatch.setattr(fused, "_eager_work", 0)
    monkeypatch.setattr(fused, "COMPILE_MIN_ENTRIES", 100)
    assert fused.use_compiled(100)
    assert [fused.use_compiled(40) for _ in range(4)] == [False, False, False, True]
    monkeypatch.setattr(fused, "COMPILE", False)
    assert not fused.use_compiled(10**9)
    monkeypatch.setattr(fused, "COMPILE", True)
    assert fused.use_compiled(1)
    monkeypatch.setattr(fused, "_failed", True)  # no compiler: eager whatever the setting
    assert not fused.use_compiled(10**9)


@pytest.mark.slow
def test_compiled_passes_equal_the_engine(spy, monkeypatch):
    """The torch.compile'd ReLU + MatMul pass (tens of seconds of compilation once)."""
    from tensorprograms.kernels import fused

    monkeypatch.setattr(fused, "COMPILE", True)
    x = _x(12)
    limit = tp.infinite_width(lambda w: MLP(w, torch.relu, depth=3), x[:2])
    _check(limit, x)
    _check(limit, x[:7], x[7:])
    assert not fused.failed() and len(spy) == 2
