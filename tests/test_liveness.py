"""Freeing cached second moments after their last use (master/liveness.py): the NTK's
queries leave one N × N moment cached instead of all of them, values are bitwise those of
an unplanned run, and a moment released too early is recomputed, not wrong."""

from __future__ import annotations

import math

import torch
from torch import nn

import tensorprograms as tp
from tensorprograms import functions as F
from tensorprograms.frontend.ntk import ntk_of
from tensorprograms.master import liveness
from tensorprograms.master.theorem import ProgramLimit


class MLP(nn.Module):
    """depth × [Linear, ReLU] and a readout; weights N(0, 2/fan_in), biases N(0, 0.1)."""

    def __init__(self, width: int, depth: int = 3, d: int = 6):
        super().__init__()
        sizes = [d] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(width, 1)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=math.sqrt(2.0 / m.in_features))
                nn.init.normal_(m.bias, std=math.sqrt(0.1))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.out(x)


def _ntk_limit(plan: bool):
    x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    limit = tp.infinite_width(MLP, x)
    program, out = limit._lower((x,))
    held = {}

    def theorem(q):
        lim = tp.master_theorem(q)
        if not plan:
            lim.plan = lambda queries: None
        held["limit"] = lim
        return lim

    contributions, lim = ntk_of(program, out.var, 7, theorem)
    return contributions, lim, out.var


def test_ntk_frees_intermediate_moments_with_identical_values():
    planned, lim, out = _ntk_limit(plan=True)
    unplanned, lim0, out0 = _ntk_limit(plan=False)
    assert [p.name for p in planned] == [p.name for p in unplanned]
    for a, b in zip(planned.values(), unplanned.values()):
        assert torch.equal(a, b)
    big = lambda lim: {k for k, v in lim._moments.items() if v.value.numel() >= 49}  # noqa: E731
    assert len(big(lim0)) > 10  # every moment of the program stays cached without a plan
    # with one: only the output's (the NNGP), which the caller reads after the contributions
    assert torch.equal(lim.second_moment(out), lim0.second_moment(out0))
    assert {frozenset(k) for k in big(lim)} <= {frozenset((lim._map(out),))}


def test_early_release_recomputes():
    P = tp.Program()
    x = P.vector("x", shape=(3,), cov=torch.tensor([[1.0, 0.3, 0.1], [0.3, 2.0, 0.2], [0.1, 0.2, 1.5]]))
    W = P.matrix("W", variance=2.0)
    h = P.nonlin(F.relu, W @ P.nonlin(F.relu, x))
    out = P.nonlin(F.relu, W @ h)
    reference = tp.master_theorem(P).second_moment(out).clone()
    limit = tp.master_theorem(P)
    limit.plan([(h, h)])
    first = limit.second_moment(h).clone()
    limit.release(h, h)
    assert not any(h in k for k in limit._moments)  # freed
    assert torch.equal(limit.second_moment(out), reference)  # needs E[h h] again: recomputed
    assert torch.equal(limit.second_moment(h), first)


def test_plan_reads_follow_the_engine_dispatch():
    P = tp.Program()
    x = P.vector("x", shape=(2,))
    W = P.matrix("W")
    r = P.nonlin(F.relu, x)
    g = W @ r
    b = P.vector("b")
    s = P.lincomb([1.0, 1.0], [g, b])
    top = P.nonlin(F.relu, s)
    readers, reads = liveness.plan([(top, top)])
    # a sum reads its operands' covariances with the other side, one side at a time
    assert reads[liveness.key(s, s)] == {liveness.key(g, s), liveness.key(b, s)}
    assert reads[liveness.key(g, s)] == {liveness.key(g, g), liveness.key(g, b)}
    assert reads[liveness.key(g, g)] == {liveness.key(r, r)}  # a MatMul pair reads its inputs
    assert readers[liveness.key(s, s)] == 1
    assert isinstance(tp.master_theorem(P), ProgramLimit)
