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
    with torch.enable_grad():
        run = simulate(program, n, seed=seed, requires_grad=True)
        vecs = [v for v in program.vectors if run.values[v].requires_grad]
        f = run.values[output]  # [m, batch]
        c = torch.randn(f.shape[0], generator=torch.Generator().manual_seed(seed + 1), dtype=f.dtype)
        hits = {v: torch.zeros(batch, *v.shape, dtype=torch.bool) for v in vecs}
        for p in range(batch):
            grads = torch.autograd.grad((f[:, p] * c).sum(), [run.values[v] for v in vecs],
                                        retain_graph=True, allow_unused=True)
            for v, g in zip(vecs, grads):
                if g is not None:
                    hits[v][p] = g.abs().sum(0) > 0
    owners = {}
    for v in program.vectors:
        h = hits.get(v)
        if h is None:
            owners[v] = torch.full(v.shape, UNUSED, dtype=torch.long)
            continue
        count = h.sum(0)
        owner = h.to(torch.long).argmax(0)
        owners[v] = torch.where(count == 0, UNUSED, torch.where(count > 1, SHARED, owner))
    return owners


def one_hot_owner(owner: torch.Tensor, batch: int) -> torch.Tensor:
    """``[numel, batch]`` float64 matrix with a 1 at (entry, its example); zero rows for
    entries that influence no output."""
    flat = owner.reshape(-1)
    out = torch.zeros(flat.numel(), batch, dtype=torch.float64)
    used = flat >= 0
    out[used.nonzero().squeeze(-1), flat[used]] = 1.0
    return out
