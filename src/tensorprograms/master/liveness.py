"""Freeing a limit's cached second moments after their last use.

A :class:`~tensorprograms.master.theorem.ProgramLimit` computes ``E[Z^x ⊗ Z^y]`` on demand
and caches it, because later moments read earlier ones (a layer's covariance reads the
previous layer's second moment). For kernels of N inputs every entry is an ``N × N``
matrix, so a program of a few dozen vectors holds gigabytes at N in the thousands.

:func:`plan` lists, for a set of queries the caller will make, every second moment they
can read and which ones read it, from the program's structure alone (the same dispatch
as ``ProgramLimit._second``: Gaussian pairs read their atoms' MatMul inputs, linear
Nonlins their inputs, factored products their two factors, anything else its Gaussian
leaves). Each entry's count of readers that are still to be computed then tells when it
is dead. The plan only steers eviction: a moment evicted too early is recomputed when
read again (correct, only slower), and one the plan does not know is simply kept.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..program import functions as F
from ..program.instructions import InitVector, LinComb, MatMul, Moment, Nonlin
from ..program.variables import Scalar, Vector
from .gaussian import _plain_sum

Key = tuple[Vector, Vector]


def key(x: Vector, y: Vector) -> Key:
    """The cache key of a pair regardless of order (E[y⊗x] is a permutation of E[x⊗y])."""
    return (x, y) if x.index <= y.index else (y, x)


def _atoms(g: Vector, memo: dict) -> frozenset:
    """The atoms (initial vectors, MatMul outputs) a Gaussian vector combines."""
    if g not in memo:
        ins = g.instruction
        if isinstance(ins, (InitVector, MatMul)):
            memo[g] = frozenset((g,))
        else:
            assert isinstance(ins, LinComb)
            memo[g] = frozenset().union(*(_atoms(x, memo) for x in ins.xs))
    return memo[g]


def _leaves(v: Vector, memo: dict) -> frozenset:
    """The Gaussian vectors a non-Gaussian vector is a function of (through Nonlins and the
    Moments their Scalar parameters average)."""
    if v.is_gaussian:
        return frozenset((v,))
    if v not in memo:
        ins = v.instruction
        assert isinstance(ins, Nonlin)
        out = frozenset().union(*(_leaves(x, memo) for x in ins.xs))
        for p in ins.params:
            if isinstance(p, Scalar) and isinstance(p.instruction, Moment):
                out = out.union(*(_leaves(x, memo) for x in p.instruction.xs))
        memo[v] = out
    return memo[v]


def _product(v: Vector) -> tuple[Vector, Vector] | None:
    ins = v.instruction
    if isinstance(ins, Nonlin) and ins.fn is F.product and len(ins.xs) == 2 and not ins.params:
        return ins.xs[0], ins.xs[1]
    return None


def reads(x: Vector, y: Vector, memo: dict) -> set[Key]:
    """The second moments that computing ``E[x ⊗ y]`` may read (a superset)."""
    out: set[Key] = set()
    if x.is_gaussian and y.is_gaussian:
        for u, w in ((x, y), (y, x)):
            if _plain_sum(u):  # GaussianBasis._cov_of_sum: from the operands' covariances
                return {key(a, w) for a in u.instruction.xs}
        for a in _atoms(x, memo):
            for b in _atoms(y, memo):
                ia, ib = a.instruction, b.instruction
                if (isinstance(ia, MatMul) and isinstance(ib, MatMul) and ia.matrix is ib.matrix
                        and not ia.transpose and not ib.transpose):
                    out.add(key(ia.x, ib.x))
        return out
    for u, w in ((x, y), (y, x)):
        ins = u.instruction
        if isinstance(ins, Nonlin) and ins.linear:
            return {key(a, w) for a in ins.xs}
    px, py = _product(x), _product(y)
    if px is not None and py is not None:
        out |= {key(px[0], py[0]), key(px[1], py[1])}
    lx, ly = _leaves(x, memo), _leaves(y, memo)
    both = lx | ly
    out |= {key(a, b) for a in both for b in both}
    return out


def plan(queries: Iterable[Key]) -> tuple[dict[Key, int], dict[Key, set[Key]]]:
    """``({moment: number of readers}, {moment: the moments it reads})`` over everything the
    queries can reach; each query counts once more for the caller, who releases it when
    done."""
    memo: dict = {}
    readers: dict[Key, int] = {}
    edges: dict[Key, set[Key]] = {}
    stack = []
    for q in queries:
        k = key(*q)
        readers[k] = readers.get(k, 0) + 1
        stack.append(k)
    while stack:
        k = stack.pop()
        if k in edges:
            continue
        edges[k] = reads(k[0], k[1], memo) - {k}
        for r in edges[k]:
            readers[r] = readers.get(r, 0) + 1
            stack.append(r)
    return readers, edges
