"""The recursion over only the position pairs the output needs (kernels/needed.py): its
pair analysis against the rule written densely, and its kernels against an independent
closed form (the locally connected recursion of a Flatten-readout CNN), the Master Theorem
engine and the all-pairs recursion, to float64 rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import tensorprograms as tp
from tensorprograms.kernels import kernels_by_recursion
from tensorprograms.kernels import needed as needed_mod
from tensorprograms.kernels.operators import probe
from tensorprograms.kernels.recursion import _Plan

from .models import init_
from .test_kernel_recursion import Myrtle, _close, _engine, _inputs

SW2, SB2 = 2.0, 0.05


class Flat2d(nn.Module):
    """2 × [conv 3×3 SAME, relu], flatten, dense: no pooling anywhere."""

    def __init__(self, width, side=4, bias=True, cin=3):
        super().__init__()
        self.c1 = nn.Conv2d(cin, width, 3, padding=1, bias=bias)
        self.c2 = nn.Conv2d(width, width, 3, padding=1, bias=bias)
        self.out = nn.Linear(width * side * side, 1, bias=bias)
        init_(self, SW2, SB2, bias=bias)

    def forward(self, x):
        return self.out(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


class Flat1d(nn.Module):
    """conv1d stride 2 (no padding), relu, conv1d dilation 2, relu, flatten, dense: maps that
    are not translations, positions changing number."""

    def __init__(self, width, bias=True):
        super().__init__()
        self.c1 = nn.Conv1d(2, width, 3, stride=2, bias=bias)
        self.c2 = nn.Conv1d(width, width, 3, dilation=2, padding=1, bias=bias)
        self.out = nn.Linear(width * 2, 1, bias=bias)
        init_(self, SW2, SB2, bias=bias)

    def forward(self, x):  # x [N, 2, 9]: 4 positions after c1, 2 after c2
        return self.out(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


class PoolThenFlat(nn.Module):
    """2 × [conv 3×3 SAME, relu], avgpool 2×2, conv 3×3, relu, flatten, dense."""

    def __init__(self, width, side=4):
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.c3 = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Linear(width * (side // 2) ** 2, 1)
        init_(self, SW2, SB2)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.out(torch.relu(self.c3(nn.functional.avg_pool2d(x, 2))).flatten(1))


def _recursions(limit, n, weight=lambda p: 1.0, **kw):
    args = (limit.program, limit.output.var, n, weight)
    kw = dict(ghosts=limit._lowering.ghosts, **kw)
    return kernels_by_recursion(*args, pairs="needed", **kw), kernels_by_recursion(*args, pairs="all", **kw)


def _plan(limit, n, weight=lambda p: 1.0):
    return _Plan(limit.program, limit.output.var, n, weight, limit._lowering.ghosts)


# ------------------------------------------------------------------ an independent closed form
def _relu(k):
    """E[relu(u)relu(v)] and E[step(u)step(v)] for covariances ``k [..., N, N]``."""
    d = np.einsum("...ii->...i", k)
    norm = np.sqrt(d[..., :, None] * d[..., None, :])  # √(v v) = v: ρ = 1 exactly on the diagonal
    t = np.arccos(np.clip(k / norm, -1, 1))
    return norm / (2 * math.pi) * (np.sin(t) + (math.pi - t) * np.cos(t)), (math.pi - t) / (2 * math.pi)


def _conv_diag(k, side):
    """``Σ_δ k[p + δ]`` over the 3×3 offsets with zero padding, for ``k [side, side, N, N]``."""
    pad = np.pad(k, ((1, 1), (1, 1), (0, 0), (0, 0)))
    return sum(pad[1 + dy:1 + dy + side, 1 + dx:1 + dx + side] for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def flat2d_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NNGP and NTK (NTK parametrization) of Flat2d by the locally connected recursion: with
    independent weights per filter offset and a readout per position, only the covariances
    of the same position in both inputs, ``K(p) [N, N]``, enter (Novak et al. 2019)."""
    n, c, side, _ = x.shape
    gram = np.einsum("acyx,bcyx->yxab", x, x)  # per position
    k1 = SW2 / (9 * c) * _conv_diag(gram, side) + SB2
    t1 = k1
    r1, d1 = _relu(k1)
    k2 = SW2 / 9 * _conv_diag(r1, side) + SB2
    t2 = k2 + SW2 / 9 * _conv_diag(d1 * t1, side)
    r2, d2 = _relu(k2)
    k = SW2 * r2.mean((0, 1)) + SB2
    return k, k + SW2 * (d2 * t2).mean((0, 1))


def test_flatten_readout_equals_locally_connected_closed_form():
    """6×6 images, N = 5: the limit (routed to the needed pairs) against the closed form."""
    x = _inputs((3, 6, 6), n=5, seed=1)
    limit = tp.infinite_width(lambda w: Flat2d(w, side=6), x)
    assert needed_mod.needed_plan(_plan(limit, 5), 5) is not None  # "auto" picks the needed pairs
    K, T = limit.kernels(x)
    k_ref, t_ref = flat2d_reference(x.numpy())
    _close(K, torch.from_numpy(k_ref))
    _close(T, torch.from_numpy(t_ref))


# ------------------------------------------------------------------ against the engine
@pytest.mark.parametrize("model,shape", [
    (Flat2d, (3, 4, 4)),
    (lambda w: Flat2d(w, bias=False), (3, 4, 4)),
    (Flat1d, (2, 9)),
    (lambda w: Flat1d(w, bias=False), (2, 9)),
    (PoolThenFlat, (3, 4, 4)),
])
def test_needed_pairs_equal_engine_and_all_pairs(model, shape):
    x = _inputs(shape, n=3)
    limit = tp.infinite_width(model, x)
    K0, T0 = _engine(limit, x)
    (K, T), (Ka, Ta) = _recursions(limit, 3)
    for a, b in ((K, K0), (T, T0), (Ka, K0), (Ta, T0)):
        _close(a, b)
    (K,), _ = _recursions(limit, 3, weight=None)  # the NNGP alone
    _close(K, K0)
    # cross kernels: the rows < 1 against the others
    (K12, T12), _ = _recursions(limit, 3, n1=1)
    _close(K12, K0[:1, 1:])
    _close(T12, T0[:1, 1:])


def _frozen(factory, name):
    """``factory`` with the parameter ``name`` not trained (its NTK term is dropped)."""
    def make(width):
        module = factory(width)
        module.get_parameter(name).requires_grad_(False)
        return module
    return make


def test_standard_parametrization_frozen_layer_and_default_init():
    x = _inputs((3, 4, 4), n=3)
    std = tp.infinite_width(Flat2d, x, parametrization="standard", nominal_width=32)
    assert needed_mod.needed_plan(_plan(std, 3), 3) is not None
    _close(std.ntk(x), _engine(std, x)[1])

    fr = tp.infinite_width(_frozen(Flat2d, "c2.weight"), x)
    _close(fr.ntk(x), _engine(fr, x)[1])

    def plain(width):  # PyTorch's default init: biases are constant-initialized parameters
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(2, width, 3, padding=1), nn.ReLU(), nn.Conv1d(width, width, 3),
                             nn.ReLU(), nn.Flatten(), nn.Linear(width * 5, 1))

    x1 = _inputs((2, 7), n=3)
    for kw in ({}, {"parametrization": "standard", "nominal_width": 16}):
        limit = tp.infinite_width(plain, x1, **kw)
        assert limit._lowering.ghosts
        K, T = limit.kernels(x1)
        K0, T0 = _engine(limit, x1)
        _close(K, K0)
        _close(T, T0)


def test_blocking_does_not_change_values():
    x = _inputs((3, 4, 4), n=5)
    limit = tp.infinite_width(PoolThenFlat, x)
    args = (limit.program, limit.output.var, 5, lambda p: 1.0)
    big = kernels_by_recursion(*args, pairs="needed")
    small = kernels_by_recursion(*args, pairs="needed", block_entries=8, min_pairs=1)  # a pair a block
    for a, b in zip(big, small):
        _close(a, b)


# ------------------------------------------------------------------ the pair analysis
def _dense_rule(plan, needed):
    """The needed pairs by the rule written with dense masks: a linear step's input needs
    ``|M|ᵀ N |M| ≠ 0`` for each of its maps ``M`` (looked through linear Nonlins), an
    elementwise one its own pairs and the variances ``(p, p)`` of the positions it reads."""
    from tensorprograms.kernels.recursion import _Act, _GVar, _Lin

    size = {v: max(math.prod(v.shape[1:]), 1) for v in plan.order}
    masks = {v: torch.zeros(size[v], size[v], dtype=torch.bool) for v in plan.order}
    masks[plan.order[-1]][0, 0] = True

    def pull(y, m, mask):
        while isinstance(plan.steps[y], _Lin):
            m = m @ plan.steps[y].op.matrix
            y = plan.steps[y].y
        a = (m != 0).to(torch.float64)
        masks[y] |= (a.T @ mask.to(torch.float64) @ a) > 0

    for v in reversed(plan.order):
        step, mask = plan.steps[v], masks[v]
        if v not in needed.order:
            continue  # a linear Nonlin folded into its MatMuls
        if isinstance(step, _Act):
            pos = mask.any(0) | mask.any(1)
            masks[step.h] |= mask | torch.diag(pos)
        elif isinstance(step, _GVar):
            for z, ops in step.groups.items():
                for op, _, _ in ops:
                    pull(z, op.matrix, mask)
        elif isinstance(step, _Lin):
            pull(step.y, step.op.matrix, mask)
    return {v: masks[v].flatten().nonzero()[:, 0] for v in needed.order}


@pytest.mark.parametrize("model,shape,diagonal", [
    (Flat2d, (3, 4, 4), True), (Flat1d, (2, 9), True), (PoolThenFlat, (3, 4, 4), False),
    (Myrtle, (3, 4, 4), False)])
def test_needed_pairs_are_what_the_output_reads(model, shape, diagonal):
    x = _inputs(shape, n=2)
    limit = tp.infinite_width(model, x)
    plan = _plan(limit, 2)
    needed = needed_mod.NeededPlan(plan, 2)
    want = _dense_rule(plan, needed)
    for v in needed.order:
        assert torch.equal(needed.needed[v], want[v]), v.name
        p = needed.size[v]
        if diagonal:  # a Flatten readout without pooling: the same-position pairs only
            assert torch.equal(needed.needed[v], torch.arange(p) * (p + 1))
    if model is Myrtle:  # a global mean reads every pair: "auto" keeps the all-pairs layout
        assert needed.fraction > needed_mod.NEEDED_FRACTION
        assert needed_mod.needed_plan(plan, 2) is None
        assert all(len(needed.needed[v]) == needed.size[v] ** 2 for v in needed.order[-3:])


def test_bad_mode_is_named():
    x = _inputs((3, 4, 4), n=2)
    limit = tp.infinite_width(Flat2d, x)
    with pytest.raises(ValueError, match="pairs='diagonal'.*'auto', 'needed' or 'all'"):
        kernels_by_recursion(limit.program, limit.output.var, 2, None, pairs="diagonal")


def test_probe_by_adjoint_equals_forward_probe():
    """Selections and pooling (fewer positions out) are probed through the adjoint; the
    matrix equals the one read off the forward basis."""
    g = torch.Generator().manual_seed(0)
    pick = lambda u: u.reshape(*u.shape[:2], -1)[..., 5]  # noqa: E731
    pool = lambda u: nn.functional.avg_pool2d(u.reshape(-1, 1, 4, 4), 2).reshape(*u.shape[:2], 2, 2)  # noqa: E731
    for fn, out in ((pick, (3,)), (pool, (3, 2, 2))):
        op = probe(fn, [(3, 4, 4)], 0, [], 3, out)
        basis = torch.eye(16, dtype=torch.float64).reshape(16, 1, 4, 4).expand(16, 3, 4, 4)
        want = fn(basis)[:, 0].reshape(16, -1).T
        assert torch.equal(op.matrix, want)
        # its own storage, not a view of the probe's gradient (a Flatten keeps P of them)
        assert op.matrix.untyped_storage().nbytes() == op.matrix.numel() * 8
        u = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
        _close(fn(u).reshape(2, 3, -1), u.reshape(2, 3, 16) @ op.matrix.T)


@pytest.mark.parametrize("chunk", [needed_mod.GATHER_ENTRIES, 64])
def test_any_example_pairs_give_the_same_entries(chunk, monkeypatch):
    """The evaluator on pairs in no particular order (columns not a run, many distinct rows:
    the gathered and the per-entry products of the first layer, whole or in chunks of
    position pairs) equals the all-pairs recursion."""
    monkeypatch.setattr(needed_mod, "GATHER_ENTRIES", chunk)
    x = _inputs((3, 4, 4), n=6)
    limit = tp.infinite_width(PoolThenFlat, x)
    K, T = kernels_by_recursion(limit.program, limit.output.var, 6, lambda p: 1.0, pairs="all")
    plan = needed_mod.NeededPlan(_plan(limit, 6), 6)
    rows = torch.arange(6)
    plan.evaluate(rows, rows, True, False)  # the variances
    for left, right in (([0, 0, 2], [1, 3, 5]), ([0, 1, 2, 3, 4], [5, 4, 1, 0, 2])):
        left, right = torch.tensor(left), torch.tensor(right)
        got = plan.evaluate(left, right, False, False)
        _close(got[0], K[left, right])
        _close(got[1], T[left, right])
