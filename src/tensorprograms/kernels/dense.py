"""The recursion of recursion.py for programs without positions (every vector ``(N,)``: MLPs),
on dense tiles ``[A, B]`` of example pairs instead of lists of pairs.

With one position the position maps are scalars (``M K Mᵀ = m² K``), so a layer is a few
elementwise passes over a tile: ``K_g = a K_z + c``, ``Θ_g = b K_z + a Θ_z + c'`` for a
MatMul ``g = W z`` (``a = σ²m²``, ``b = w·a``), ``X_A Σ X_Bᵀ`` for the input layer's
initial vectors (the Gram product), and one closed-form pass per nonlinearity that computes
ρ and θ once for both ``E[φφ]`` and ``E[φ'φ']`` (ReLU: kernels/fused.py).

Each tile runs through the whole program while it is small enough to stay in the
processor's caches, and the tiles are spread over ``torch.get_num_threads()`` Python threads
(torch itself on one thread each: short ops pay an OpenMP barrier apiece). Without ``x2``
the matrix is symmetric: only tiles on and above the diagonal are computed, the diagonal
tiles first, which give the per-example variances every closed form needs (from their own
diagonals, so an example paired with itself has ρ = 1 exactly, as in the engine). With
``x2`` only the ``[N1, N2]`` cross block is computed, after the variances of both sides
(one pass over same-example pairs: vectors, not matrices).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..master import closed_form
from . import fused


class _Cov:
    """Σ of initial vectors as it is applied to rows ``X_A`` of a block: a scalar (iid
    vectors of one variance, the usual input layer: folded into the product), a diagonal
    (a column scaling) or a matrix; worked out once per call, not per block."""

    def __init__(self, cov: torch.Tensor):
        d = cov.diagonal()
        diagonal = torch.equal(cov, torch.diag(d))
        self.scalar = float(d[0]) if diagonal and bool((d == d[0]).all()) else None
        self.diag = d if diagonal and self.scalar is None else None
        self.full = cov if not diagonal else None

    def gram(self, xa: torch.Tensor, xb: torch.Tensor | None) -> torch.Tensor:
        """``X_A Σ X_Bᵀ`` (``xb`` None: the diagonal of ``X_A Σ X_Aᵀ``)."""
        if self.scalar is not None and xb is not None:
            return torch.addmm(_ZERO, xa, xb.T, beta=0, alpha=self.scalar)
        y = xa * self.scalar if self.scalar is not None else xa * self.diag if self.diag is not None \
            else xa @ self.full
        return (y * xa).sum(-1) if xb is None else y @ xb.T


_ZERO = torch.zeros((), dtype=torch.float64)


@dataclass
class _Gram:
    """A G-var's initial-vector atoms as rows ``X [N, F]``: ``K = X_A Σ X_Bᵀ``; Θ's is the
    same times ``ntk_scale``, or ``X_A Σ_ntk X_Bᵀ``."""

    x: torch.Tensor
    cov: _Cov
    ntk_scale: float | None
    cov_ntk: _Cov | None


class Plan:
    """A recursion plan (recursion._Plan) whose vectors all have one position, with the
    per-step scalars and the input layers' rows precomputed."""

    def __init__(self, plan, kinds: int):
        from .recursion import RELU, _Act, _GVar, _Lin

        self.plan, self.kinds, self.relu = plan, kinds, RELU
        self.gvar, self.act, self.lin = _GVar, _Act, _Lin
        self.grams: dict = {}
        self.coefs: dict = {}  # g -> {z: (a, b)} (K_g += a K_z, Θ_g += b K_z + a Θ_z)
        self.scale: dict = {}  # linear Nonlin -> m²
        for v in plan.order:
            step = plan.steps[v]
            if isinstance(step, _GVar):
                self.coefs[v] = {}
                for z, items in step.groups.items():
                    a = sum(var * _scalar(op) ** 2 for op, var, _ in items)
                    b = sum(w * var * _scalar(op) ** 2 for op, var, w in items)
                    self.coefs[v][z] = (a, b)
                if step.dense is not None:
                    d = step.dense
                    f = d.u.shape[0]
                    x = d.u.reshape(f, -1).T  # [N, F] (a view: the data itself for an input layer)
                    scale, cov_ntk = (1.0 if kinds == 2 else None), None
                    if kinds == 2 and d.cov_ntk is not None:
                        scale = _ratio(d.cov_ntk, d.cov)
                        cov_ntk = d.cov_ntk if scale is None else None
                    self.grams[v] = _Gram(x, _Cov(d.cov), scale, None if cov_ntk is None else _Cov(cov_ntk))
            elif isinstance(step, _Lin):
                self.scale[v] = _scalar(step.op) ** 2
        # a ReLU whose only reader is the next step, a MatMul (and bias): one fused pass
        self.fuse: dict = {}  # z -> (g, (a, b, c₀, c₁))
        for i, z in enumerate(plan.order[:-1]):
            step, g = plan.steps[z], plan.order[i + 1]
            if (isinstance(step, _Act) and step.phi == RELU and plan.last_use[z] == i + 1
                    and isinstance(plan.steps[g], _GVar) and list(self.coefs[g]) == [z]
                    and g not in self.grams):
                (a, b), (c0, c1) = self.coefs[g][z], plan.steps[g].const
                self.fuse[z] = (g, (a, b, c0, c1))
        self.layers = sum(isinstance(s, _Act) for s in plan.steps.values())


def _scalar(op) -> float:
    """The one entry of a 1 × 1 position map."""
    return float(op.matrix.reshape(()))


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """s with ``a == s·b`` exactly (or both zero), else None."""
    nz = b != 0
    if not bool(nz.any()):
        return 0.0 if not bool((a != 0).any()) else None
    s = float(a[nz].flatten()[0] / b[nz].flatten()[0])
    return s if torch.equal(a, s * b) else None


class _Block:
    """Pairs ``rows × cols`` as a dense ``[A, B]`` tile, or (``cols`` None) the same-example
    pairs of ``rows`` as vectors ``[A]``. ``own``: take the variances from this block's own
    same-example entries (a diagonal tile, or vectors) and store them."""

    def __init__(self, rows: slice, cols: slice | None, own: bool):
        self.rows, self.cols, self.own = rows, cols, own

    def shape(self) -> tuple[int, ...]:
        a = self.rows.stop - self.rows.start
        return (a,) if self.cols is None else (a, self.cols.stop - self.cols.start)

    def gram(self, x: torch.Tensor, cov: _Cov) -> torch.Tensor:
        """``X_rows Σ X_colsᵀ`` (or its diagonal)."""
        return cov.gram(x[self.rows], None if self.cols is None else x[self.cols])

    def variances(self, c: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.own:
            d = c if self.cols is None else c.diagonal()
            var[self.rows] = d
            d = var[self.rows]
            return (d, d) if self.cols is None else (d.unsqueeze(-1), d.unsqueeze(0))
        return var[self.rows].unsqueeze(-1), var[self.cols].unsqueeze(0)


def evaluate(dp: Plan, block: _Block, variances: dict, compiled: bool = False) -> list[torch.Tensor]:
    """``[K]`` or ``[K, Θ]`` of the output on one block (``compiled``: the ReLU passes of
    tiles by torch.compile)."""
    plan, kinds = dp.plan, dp.kinds
    vals: dict = {}  # v -> [K, Θ]
    compiled = compiled and block.cols is not None and block.shape()[0] > 1 and block.shape()[1] > 1
    for i, v in enumerate(plan.order):
        step = plan.steps[v]
        out = None
        if v in vals:  # computed with the ReLU before it
            pass
        elif isinstance(step, dp.gvar):
            out = None
            for z, (a, b) in dp.coefs[v].items():
                t = vals[z]
                last = plan.last_use[z] == i and len(dp.coefs[v]) == 1
                if kinds == 2:  # Θ_g = b K_z + a Θ_z first: K_z is then scaled in place
                    th = t[1].mul_(a) if last else t[1] * a
                    if b:
                        th.add_(t[0], alpha=b)
                k = t[0].mul_(a) if last else t[0] * a
                term = [k, th] if kinds == 2 else [k]
                out = term if out is None else [o.add_(s) for o, s in zip(out, term)]
            gram = dp.grams.get(v)
            if gram is not None:
                g = block.gram(gram.x, gram.cov)
                if kinds == 2:
                    gt = (block.gram(gram.x, gram.cov_ntk) if gram.cov_ntk is not None
                          else g if gram.ntk_scale == 1.0 else g * gram.ntk_scale)
                    term = [g, gt]
                else:
                    term = [g]
                if out is None:
                    out = [g] if kinds == 1 else [g, gt.clone() if gt is g else gt]
                else:
                    out = [o.add_(s) for o, s in zip(out, term)]
            if out is None:
                out = [torch.zeros(block.shape(), dtype=torch.float64) for _ in range(kinds)]
            for k in range(kinds):
                if step.const[k]:
                    out[k].add_(step.const[k])
        elif isinstance(step, dp.lin):
            s = dp.scale[v]
            out = [t * s for t in vals[step.y]]
        else:
            h = vals[step.h]
            v1, v2 = block.variances(h[0], variances[step.h])
            if step.phi == dp.relu and bool((v1 > 0).all()) and bool((v2 > 0).all()):
                g, affine = dp.fuse.get(v, (None, None))
                if g is not None and kinds == 1:
                    affine = (affine[0], 0.0, affine[2], 0.0)
                out = list(fused.relu_pair(v1, v2, h[0], h[1] if kinds == 2 else None, compiled, affine))
                if g is not None:  # the MatMul after it, done: z itself is never stored
                    vals[g], out = out, None
            else:
                shared: dict = {}  # ρ and θ, once for both kernels
                k = closed_form.cross(step.phi, step.phi, v1, v2, h[0], shared)
                if kinds == 1:
                    out = [k]
                else:
                    dk = closed_form.cross(step.dphi, step.dphi, v1, v2, h[0], shared)
                    out = [k, dk.mul_(h[1])]
                del shared
        if out is not None:
            vals[v] = out
        for dep in plan._deps(step):
            if plan.last_use.get(dep) == i:
                vals.pop(dep, None)
    return vals[plan.order[-1]]


def kernels(plan, batch: int, kinds: int, n1: int | None, workers: int, tile: int
            ) -> tuple[torch.Tensor, ...]:
    """``(K,)`` or ``(K, Θ)``: ``[batch, batch]``, or ``[n1, batch − n1]`` when ``n1`` is given,
    from a recursion plan whose vectors all have one position, in ``tile × tile`` blocks on
    ``workers`` threads."""
    dp = Plan(plan, kinds)
    variances = {s.h: torch.zeros(batch, dtype=torch.float64)
                 for s in plan.steps.values() if isinstance(s, dp.act)}
    cuts = lambda a, b: [slice(s, min(s + tile, b)) for s in range(a, b, tile)]  # noqa: E731
    if n1 is None:
        result = torch.empty(kinds, batch, batch, dtype=torch.float64)
        blocks = cuts(0, batch)
        first = [_Block(r, r, True) for r in blocks]
        then = [_Block(r, c, False) for i, r in enumerate(blocks) for c in blocks[i + 1:]]
    else:
        result = torch.empty(kinds, n1, batch - n1, dtype=torch.float64)
        first = [_Block(r, None, True) for r in cuts(0, batch)]
        then = [_Block(r, c, False) for r in cuts(0, n1) for c in cuts(n1, batch)]

    work = sum(math.prod(b.shape()) for b in first + then) * dp.layers
    compiled = fused.use_compiled(work)
    if compiled:
        fused.prepare(kinds, bool(dp.fuse))  # compiled here, not by two threads at once
        compiled = not fused.failed()

    def run(block: _Block) -> None:
        out = evaluate(dp, block, variances, compiled)
        for k, t in enumerate(out):
            if block.cols is None:
                continue
            if n1 is not None:
                result[k, block.rows, block.cols.start - n1:block.cols.stop - n1] = t
            elif block.own:  # the upper triangle, mirrored: exactly symmetric
                t = torch.triu(t) + torch.triu(t, 1).T
                result[k, block.rows, block.rows] = t
            else:
                result[k, block.rows, block.cols] = t
                result[k, block.cols, block.rows] = t.T

    with torch.no_grad():
        if workers <= 1:
            for block in first + then:
                run(block)
        else:
            with ThreadPoolExecutor(workers) as pool:
                for stage in (first, then):  # the variances before any block that reads them
                    for f in [pool.submit(run, b) for b in stage]:
                        f.result()
    return tuple(result)

