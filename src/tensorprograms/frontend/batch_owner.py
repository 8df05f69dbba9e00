"""Which example of the batch each finite index of a program variable belongs to.

The NTK construction (frontend/ntk.py) seeds the backward pass with the sum of the
outputs, which is valid because examples never interact: every finite index of every
activation belongs to one example. Recurrent models store activations time-major
(``[T, B]``, or ``T·B`` flattened), so the batch is not always the first finite dim; the
owner of each index is found here, whatever the layout, by running the program at a small
width and asking autograd which outputs each entry influences.
"""

from __future__ import annotations

import torch

from ..program.program import Program
from ..program.simulate import simulate
from ..program.variables import Vector

UNUSED, SHARED = -1, -2


def batch_owners(program: Program, output: Vector, batch: int, n: int = 32, seed: int = 0
                 ) -> dict[Vector, torch.Tensor]:
    """For each vector of ``program``, a long tensor of its finite shape: the example
    ``p`` whose output ``output[p]`` its entry influences, ``UNUSED`` (-1) if none,
    ``SHARED`` (-2) if several (e.g. a bias of finite shape ``()``).

    Args:
        output: the readout, finite shape ``(batch,)``.
        n: the width of the probing run. An entry counts as influencing ``output[p]``
            when its gradient is nonzero at some of the n coordinates; with random
            weights a zero is a measure-zero event except for dead ReLUs, whose chance of
            being dead at all n coordinates is 2^-n.
    """
    # One backward pass per bit of the example index and per value of the bit (2·⌈log₂ batch⌉
    # passes, not one per example): an entry reaches the examples whose bit b is 1, those
    # whose bit b is 0, or both. With a single owner p, exactly one of the two is hit for
    # every b and spells p; two owners differ in some bit, where both are hit (SHARED).
    bits = max(1, (batch - 1).bit_length())
    index = torch.arange(batch)
    with torch.enable_grad():
        run = simulate(program, n, seed=seed, requires_grad=True)
        vecs = [v for v in program.vectors if run.values[v].requires_grad]
        f = run.values[output]  # [m, batch]
        # random weights per (coordinate, example): a cancellation is a measure-zero event
        c = torch.randn(f.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=f.dtype)
        probes = [(b, side) for b in range(bits) for side in (0, 1)
                  if bool((((index >> b) & 1) == side).any())]
        seeds = torch.stack([c * (((index >> b) & 1) == side).to(f.dtype) for b, side in probes])
        values = [run.values[v] for v in vecs]
        try:  # all probes in one batched backward pass
            grads = torch.autograd.grad(f, values, grad_outputs=seeds, is_grads_batched=True,
                                        retain_graph=True, allow_unused=True)
        except RuntimeError:  # an op without a batched backward: one pass per probe
            per = [torch.autograd.grad(f, values, grad_outputs=s, retain_graph=True, allow_unused=True)
                   for s in seeds]
            grads = [None if per[0][i] is None else torch.stack([g[i] for g in per])
                     for i in range(len(values))]
        hits = {v: torch.zeros(bits, 2, *v.shape, dtype=torch.bool) for v in vecs}
        for v, g in zip(vecs, grads):
            if g is None:
                continue
            reached = g.abs().sum(1) > 0  # [probes, *F]: nonzero at some of the n coordinates
            for i, (b, side) in enumerate(probes):
                hits[v][b, side] = reached[i]
    owners = {}
    weights = 1 << torch.arange(bits)
    for v in program.vectors:
        h = hits.get(v)
        if h is None:
            owners[v] = torch.full(v.shape, UNUSED, dtype=torch.long)
            continue
        one, zero = h[:, 1], h[:, 0]
        used = (one | zero).any(0)
        shared = (one & zero).any(0)
        owner = (one.to(torch.long) * weights.reshape(bits, *[1] * len(v.shape))).sum(0)
        owners[v] = torch.where(~used, UNUSED, torch.where(shared, SHARED, owner))
    return owners


def one_hot_owner(owner: torch.Tensor, batch: int) -> torch.Tensor:
    """``[numel, batch]`` float64 matrix with a 1 at (entry, its example); zero rows for
    entries that influence no output."""
    flat = owner.reshape(-1)
    out = torch.zeros(flat.numel(), batch, dtype=torch.float64)
    used = flat >= 0
    out[used.nonzero().squeeze(-1), flat[used]] = 1.0
    return out


def pool_by_owner(m: torch.Tensor, owner_i: torch.Tensor, owner_j: torch.Tensor, batch: int) -> torch.Tensor:
    """``O_iᵀ m O_j`` for the one-hot owner matrices (:func:`one_hot_owner`) of ``m``'s rows
    and columns, ``[batch, batch]``, without forming them: entries are summed into their
    examples (``m`` itself when each side is one entry per example, in order)."""
    rows, cols = owner_i.reshape(-1), owner_j.reshape(-1)
    ident = torch.arange(batch)
    if not (rows.numel() == batch and torch.equal(rows, ident)):
        keep = (rows >= 0).nonzero().squeeze(-1)
        m = m.new_zeros(batch, m.shape[1]).index_add_(0, rows[keep], m[keep])
    if not (cols.numel() == batch and torch.equal(cols, ident)):
        keep = (cols >= 0).nonzero().squeeze(-1)
        m = m.new_zeros(m.shape[0], batch).index_add_(1, cols[keep], m[:, keep])
    return m
