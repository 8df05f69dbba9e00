"""Batch owners (which example each finite index belongs to) found with 2·⌈log₂ N⌉ probes,
against the one-backward-pass-per-example definition; pooling by owner against the one-hot
matrix products it replaces; the owner cache of repeated kernel calls."""

from __future__ import annotations

import torch

import tensorprograms as tp
from tensorprograms.frontend import batch_owner
from tensorprograms.frontend.batch_owner import SHARED, UNUSED, batch_owners, one_hot_owner, pool_by_owner
from tensorprograms.program.simulate import simulate

from .models import MLP
from .recurrent_models import D, Fused


def _per_example(program, output, batch, n=32, seed=0):
    """The definition: one backward pass per example p (what batch_owners used to run)."""
    with torch.enable_grad():
        run = simulate(program, n, seed=seed, requires_grad=True)
        vecs = [v for v in program.vectors if run.values[v].requires_grad]
        f = run.values[output]
        c = torch.randn(f.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=f.dtype)
        hits = {v: torch.zeros(batch, *v.shape, dtype=torch.bool) for v in vecs}
        for p in range(batch):
            gs = torch.autograd.grad((f[:, p] * c[:, p]).sum(), [run.values[v] for v in vecs],
                                     retain_graph=True, allow_unused=True)
            for v, g in zip(vecs, gs):
                if g is not None:
                    hits[v][p] = g.abs().sum(0) > 0
    out = {}
    for v in program.vectors:
        if v not in hits:
            out[v] = torch.full(v.shape, UNUSED, dtype=torch.long)
            continue
        count = hits[v].sum(0)
        out[v] = torch.where(count == 0, UNUSED, torch.where(count > 1, SHARED, hits[v].long().argmax(0)))
    return out


def _lowered(factory, x):
    limit = tp.infinite_width(factory, x)
    program, out = limit._lower((x,))
    return program, out.var


def test_owners_match_the_per_example_definition():
    torch.manual_seed(0)
    cases = [(lambda n: MLP(n, torch.relu), torch.randn(b, 6, dtype=torch.float64)) for b in (1, 2, 7, 8)]
    # time-major recurrent layout ([T, B] finite indices) and biases shared by every example
    cases.append((lambda n: Fused(n, "gru", batch_first=False), torch.randn(5, 3, D, dtype=torch.float64)))
    for factory, x in cases:
        program, output = _lowered(factory, x)
        got, want = batch_owners(program, output, x.shape[0]), _per_example(program, output, x.shape[0])
        for v in program.vectors:
            assert torch.equal(got[v], want[v]), (v.name, got[v], want[v])
    # the last case exercises SHARED entries (a GRU's input weights and biases) and a
    # time-major layout ([T, B] entries owned along the second axis)
    assert any((o == SHARED).any() for o in got.values())
    assert any(o.ndim == 2 and o.shape[1] == x.shape[0] and torch.equal(o[0], torch.arange(x.shape[0]))
               for o in got.values())


def test_pool_by_owner_equals_one_hot_products():
    gen = torch.Generator().manual_seed(1)
    batch = 4
    for rows, cols in (((6,), (4,)), ((3, 4), (2, 2))):
        oi = torch.randint(-1, batch, rows, generator=gen)  # includes UNUSED entries
        oj = torch.arange(batch) if cols == (4,) else torch.randint(-1, batch, cols, generator=gen)
        m = torch.randn(oi.numel(), oj.numel(), generator=gen, dtype=torch.float64)
        want = one_hot_owner(oi, batch).T @ m @ one_hot_owner(oj, batch)
        torch.testing.assert_close(pool_by_owner(m, oi, oj, batch), want, rtol=1e-15, atol=1e-15)
    m = torch.randn(batch, batch, generator=gen, dtype=torch.float64)
    assert pool_by_owner(m, torch.arange(batch), torch.arange(batch), batch) is m  # one entry per example


def test_owner_cache_probes_once_per_structure(monkeypatch):
    calls = []
    real = batch_owner.batch_owners

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("tensorprograms.frontend.ntk.batch_owners", counting)
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # tanh: no closed form, so the NTK takes the engine's backward program (a ReLU MLP's takes
    # the dense recursion, which needs no batch owners)
    limit = tp.infinite_width(lambda n: MLP(n, torch.tanh), x)
    first = limit.kernels(x)
    second = limit.kernels(x * 1.5)  # new data, same structure: cached owners
    third = limit.kernels(x[:3])  # another batch size: probed again
    assert len(calls) == 2
    fresh = tp.infinite_width(lambda n: MLP(n, torch.tanh), x).kernels(x * 1.5)
    assert all(torch.equal(a, b) for a, b in zip(second, fresh))
    assert first[1].shape == (5, 5) and third[1].shape == (3, 3)
