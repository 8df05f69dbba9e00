"""Per-example linear maps over positions, read off a program's linear functions.

A convolution's shifts, an average pooling or a global mean act on a vector of finite
shape ``(N, *S)`` (examples, positions) the same way on every example and never mix
examples. Such a map is one matrix ``M [P_out, P_in]`` over the flattened positions
``P = |S|``, which this module finds by probing the function once, checks on a random
input, and applies to pair covariances ``C [..., P_in, P_in] -> M C Mᵀ`` with gathers
when each output position reads few input positions (shifts: one, 2×2 pooling: four),
with matrix products otherwise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from ..program.calling import call_full

SPARSE_ROWS = 16  # at most this many inputs per output position: gathers, else matmuls


class SpatialOp:
    """``M [P_out, P_in]`` over flattened positions ``S_in -> S_out``, applied to both sides
    of a pair covariance.

    Applied the cheapest way its structure allows: a translation of the grid with zero fill
    (a convolution offset with SAME padding) by slicing, a Kronecker product of per-axis
    matrices (pooling, a mean over positions) axis by axis, few inputs per output position
    by gathers, anything else by matrix products."""

    def __init__(self, matrix: torch.Tensor, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
        self.matrix = matrix
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.offset = _translation(matrix, self.in_shape, self.out_shape)
        self.factors = None if self.offset is not None else _kronecker(matrix, self.in_shape,
                                                                        self.out_shape)
        nnz = (matrix != 0).sum(1)
        self.rows = int(nnz.max()) if matrix.numel() else 0

    @functools.cached_property
    def _gathers(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``src, coef [r, P_out]``: the r nonzeros of every row (padded with zero
        coefficients), when every row has at most SPARSE_ROWS; found when first applied (most
        ops are translations, or only composed)."""
        if self.rows > SPARSE_ROWS:
            return None
        r = max(self.rows, 1)
        order = torch.argsort((self.matrix == 0).to(torch.int8), dim=1, stable=True)[:, :r]
        return order.T.contiguous(), torch.gather(self.matrix, 1, order).T.contiguous()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)

    def then(self, outer: SpatialOp) -> SpatialOp:
        """``outer ∘ self``."""
        if outer.offset is not None and not any(outer.offset):  # the identity
            return self
        if self.offset is not None and not any(self.offset):
            return outer
        return SpatialOp(outer.matrix @ self.matrix, self.in_shape, outer.out_shape)

    def scaled(self, c: float) -> SpatialOp:
        """``c·M`` (``self`` when c = 1)."""
        return self if c == 1.0 else SpatialOp(self.matrix * c, self.in_shape, self.out_shape)

    def plus(self, other: SpatialOp) -> SpatialOp:
        return SpatialOp(self.matrix + other.matrix, self.in_shape, self.out_shape)

    def _side(self, c: torch.Tensor, dim: int) -> torch.Tensor:
        """``M`` applied along ``dim`` (-2: rows, -1: columns) of ``c``."""
        if self._gathers is None:
            if dim == -1:
                return c @ self.matrix.T
            return self.matrix @ c
        shape = [1] * c.ndim
        shape[dim] = -1
        out = None
        for src, coef in zip(*self._gathers):
            term = c.index_select(c.ndim + dim, src)
            if not bool((coef == 1).all()):
                term = term * coef.reshape(shape)
            out = term if out is None else out + term
        return out

    def pair(self, c: torch.Tensor) -> torch.Tensor:
        """``M C Mᵀ`` over the last two dims of ``c [..., P_in, P_in]`` -> ``[..., P_out, P_out]``."""
        if self.offset is not None:
            return translate_sum(c, self.in_shape, [(self.offset, 1.0)])
        if self.factors is not None:
            lead = c.shape[:-2]
            d = len(self.in_shape)
            t = c.reshape(*lead, *self.in_shape, *self.in_shape)
            base = len(lead)
            scale = 1.0
            for side in (0, d):
                for axis, f in enumerate(self.factors):
                    if f is None:
                        continue
                    dim = base + side + axis
                    block = _block_mean(f)
                    if block is not None:  # pooling windows that tile the axis: a reshaped sum
                        t = t.unflatten(dim, (f.shape[0], f.shape[1] // f.shape[0])).sum(dim + 1)
                        scale *= block
                    else:
                        t = torch.movedim(torch.tensordot(t, f, dims=([dim], [1])), -1, dim)
            p_out = math.prod(self.out_shape)
            t = t.reshape(*lead, p_out, p_out)
            return t if scale == 1.0 else t.mul_(scale)
        return self._side(self._side(c, -2), -1)


def translate_sum(c: torch.Tensor, shape: tuple[int, ...], items: list[tuple[tuple[int, ...], object]]
                  ) -> torch.Tensor:
    """``Σ_k s_k T_k C T_kᵀ`` for translations ``T_k`` of the grid ``shape`` (``(T u)[p] =
    u[p + δ_k]``, zero outside) and weights ``s_k``, over the last two dims of ``c [..., P, P]``.

    Each term adds a shifted view of ``c`` into the part of the output it reaches (no padded
    copy). A full grid of offsets with equal weights (a k×k convolution) is separable: the
    sum over the grid is the product of the sums along each axis, 2·Σ(k_a) adds instead of Π(k_a)."""
    d = len(shape)
    lead = c.shape[:-2]
    p = math.prod(shape)
    t = c.reshape(*lead, *shape, *shape)
    nl = len(lead)
    weights = {s if isinstance(s, float) else None for _, s in items}
    axes = [sorted({o[a] for o, _ in items}) for a in range(d)]
    if len(weights) == 1 and None not in weights and len(items) == math.prod(len(a) for a in axes) \
            and len({o for o, _ in items}) == len(items) and d > 1:
        (s,) = weights
        for a in range(d):
            t = _shift_sum(t, nl, d, [tuple(o if b == a else 0 for b in range(d)) for o in axes[a]])
        return (t if s == 1.0 else t * s).reshape(*lead, p, p)
    out = None
    for off, s in items:
        term = _shift_sum(t, nl, d, [off])
        term = term if isinstance(s, float) and s == 1.0 else term * s
        out = term if out is None else out.add_(term)
    return out.reshape(*lead, p, p)


def _shift_sum(t: torch.Tensor, nl: int, d: int, offsets: list[tuple[int, ...]]) -> torch.Tensor:
    """``Σ_δ t[..., p + δ, q + δ]`` (zero where p + δ or q + δ leaves the grid), for ``t`` of
    shape ``[*lead(nl), *S, *S]``."""
    shape = t.shape[nl:nl + d]
    out = None
    if tuple([0] * d) in offsets:
        out = t.clone()
        offsets = [o for o in offsets if any(o)]
    else:
        out = torch.zeros_like(t)
    for off in offsets:
        dst = [slice(max(0, -o), n - max(0, o)) for o, n in zip(off, shape)]
        src = [slice(max(0, o), n - max(0, -o)) for o, n in zip(off, shape)]
        out[(Ellipsis, *dst, *dst)] += t[(Ellipsis, *src, *src)]
    return out


def _block_mean(f: torch.Tensor) -> float | None:
    """c when ``f [n_out, n_in]`` is c·(I_{n_out} ⊗ 1ᵀ_k) (non-overlapping windows of k = n_in/n_out
    consecutive inputs, equal weights), else None."""
    n_out, n_in = f.shape
    if n_in % n_out:
        return None
    c = float(f[0, 0])
    want = torch.kron(torch.eye(n_out, dtype=f.dtype), torch.ones(1, n_in // n_out, dtype=f.dtype)) * c
    return c if c != 0 and torch.equal(f, want) else None


def _translation(m: torch.Tensor, in_shape, out_shape) -> tuple[int, ...] | None:
    """δ when ``M`` is the translation ``(M u)[p] = u[p + δ]`` (zero outside the grid), else None."""
    if in_shape != out_shape or not in_shape:
        return None
    nz = m.nonzero()
    if len(nz) == 0 or not bool((m[nz[:, 0], nz[:, 1]] == 1).all()):
        return None
    p, a = nz[:, 0], nz[:, 1]
    coords = lambda flat: torch.stack(torch.unravel_index(flat, in_shape), -1)  # noqa: E731
    delta = coords(a[:1]) - coords(p[:1])
    offset = tuple(int(x) for x in delta[0])
    grid = coords(torch.arange(m.shape[0]))
    src = grid + delta
    inside = ((src >= 0) & (src < torch.tensor(in_shape))).all(-1)
    want = torch.zeros_like(m)
    rows = torch.arange(m.shape[0])[inside]
    flat = torch.zeros(len(rows), dtype=torch.long)
    for axis, n in enumerate(in_shape):
        flat = flat * n + src[inside][:, axis]
    want[rows, flat] = 1.0
    return offset if torch.equal(want, m) else None


def _kronecker(m: torch.Tensor, in_shape, out_shape) -> list[torch.Tensor | None] | None:
    """Per-axis matrices ``F_a [out_a, in_a]`` with ``M = F_1 ⊗ … ⊗ F_d`` (None entries: the
    identity), or None when ``M`` is no such product."""
    d = len(in_shape)
    if d == 0 or len(out_shape) != d or d > 4:
        return None
    t = m.reshape(*out_shape, *in_shape)
    factors = []
    scale = t.abs().max()
    if scale == 0:
        return None
    # a nonzero entry; each factor is the slice through it along its own (out, in) pair
    idx = [int(i) for i in torch.unravel_index(t.abs().argmax(), t.shape)]
    pivot = t[tuple(idx)]
    for axis in range(d):
        sl = list(idx)
        sl[axis] = slice(None)
        sl[d + axis] = slice(None)
        factors.append(t[tuple(sl)].clone())
    rebuilt = factors[0]
    for f in factors[1:]:
        rebuilt = torch.kron(rebuilt, f)
    rebuilt = rebuilt / pivot ** (d - 1)
    if not torch.allclose(rebuilt, m, rtol=1e-13, atol=1e-15 * float(scale)):
        return None
    factors[0] = factors[0] / pivot ** (d - 1)
    return [None if f.shape[0] == f.shape[1] and torch.equal(f, torch.eye(f.shape[0], dtype=f.dtype)) else f
            for f in factors]


def probe(fn: Callable, shapes: Sequence[tuple[int, ...]], k: int, params: Sequence,
          batch: int, out_shape: tuple[int, ...]) -> SpatialOp | None:
    """The per-example position matrix of argument ``k`` of the linear ``fn`` (finite shapes
    ``shapes``, output ``out_shape``, each ``(batch, *positions)``), or None when ``fn`` is not
    one map applied to every example separately (it mixes examples, or depends on the data).

    Probing: the basis vectors of the input positions are spread over the examples (example
    n of probe row r gets position r·N + n), so one call with ⌈P_in/N⌉ rows finds ``M`` if the
    map is per-example; a random input then checks that it is."""
    sk = tuple(shapes[k])
    if not sk or sk[0] != batch or not out_shape or out_shape[0] != batch:
        return None
    p_in, p_out = math.prod(sk[1:]), math.prod(out_shape[1:])
    rows = -(-p_in // batch)

    def run(u: torch.Tensor) -> torch.Tensor:
        args = [u if i == k else torch.zeros(u.shape[0], *s, dtype=torch.float64)
                for i, s in enumerate(shapes)]
        return call_full(fn, args, shapes, list(params), 1).reshape(u.shape[0], batch, p_out)

    matrix = _rows_by_adjoint(run, sk, batch, p_in, p_out) if p_out < p_in else None
    if matrix is None:
        basis = torch.zeros(rows * batch, p_in, dtype=torch.float64)
        idx = torch.arange(p_in)
        basis[idx, idx] = 1.0
        out = run(basis.reshape(rows, batch, *sk[1:]))
        matrix = out.reshape(rows * batch, p_out)[:p_in].T.contiguous()  # [P_out, P_in]
    test = _random_input(batch, p_in)
    want = test @ matrix.T
    got = run(test.reshape(2, *sk))
    if not torch.allclose(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max().clamp_min(1.0))):
        return None
    return SpatialOp(matrix, sk[1:], tuple(out_shape[1:]))


@functools.lru_cache(maxsize=8)
def _random_input(batch: int, p_in: int) -> torch.Tensor:
    """The check's random input ``[2, batch, p_in]`` (seeded; one per shape: a Flatten probes
    P maps of the same input, and drawing it each time cost more than the probes)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, batch, p_in, generator=gen, dtype=torch.float64)


def _rows_by_adjoint(run: Callable, sk: tuple[int, ...], batch: int, p_in: int, p_out: int
                     ) -> torch.Tensor | None:
    """``M [P_out, P_in]`` from the adjoint when fewer positions come out than go in (a
    Flatten's one-position selections: ⌈P_out/N⌉ rows instead of ⌈P_in/N⌉), the cotangents
    of the output positions spread over the examples; None when ``fn`` has no gradient."""
    rows = -(-p_out // batch)
    try:
        with torch.enable_grad():
            u = torch.zeros(rows, *sk, dtype=torch.float64, requires_grad=True)
            out = run(u)
            cot = torch.zeros(rows * batch, p_out, dtype=torch.float64)
            idx = torch.arange(p_out)
            cot[idx, idx] = 1.0
            (grad,) = torch.autograd.grad(out, u, cot.reshape(out.shape))
    except (RuntimeError, TypeError):
        return None
    return grad.reshape(rows * batch, p_in)[:p_out].clone()  # not a view: it would keep all of grad
