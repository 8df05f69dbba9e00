"""Which position pairs the output's kernels need, and the recursion over only those.

The recursion of recursion.py carries every vector's covariance over all pairs of positions
``[pairs, P, P]``. The output (one value per example) rarely needs them all. A MatMul atom
``W z`` reaching a G-var through the position map ``M`` adds ``σ² M K_z Mᵀ``: entry ``(p, q)``
reads entry ``(a, b)`` of ``K_z`` only where ``M[p, a] M[q, b] ≠ 0``. Distinct matrices are
independent, so the 9 offsets of a 3×3 convolution are 9 translations, each of which maps
the pair ``(p, q)`` to ``(p + δ, q + δ)``: the difference ``q − p`` never grows through a
convolution. A Flatten readout (one readout matrix per position) reads only the same-position
pairs ``(p, p)``, and then every layer below it does too (the CNN-GP without pooling is the
locally connected network's, Novak et al. 2019); an average pool reads the pairs within its
window; a global mean reads every pair, and then all pairs are needed (recursion.py's
layout, with its structured shift sums, is kept for that).

``needed_plan`` walks the recursion's steps backwards from the output and collects, for each
vector, the set of position pairs ``(p, q)`` its consumers read (plus the same-position pairs
``(p, p)`` an elementwise closed form needs for its variances). Each vector is then carried as
``[kinds, K, E]`` (K needed pairs, sorted by ``p·P + q``; E example pairs of a block), every
linear step (a G-var's MatMul atoms grouped by their input, through any linear Nonlins in
between; a linear Nonlin) as one sparse matrix over pairs ``[K_out, K_in]`` (CSR: one
MKL product per source and kernel), the initial vectors' ``UᵀΣU`` at the needed pairs only,
and the closed forms on ``[K, E]``. The values equal the all-pairs recursion's at the pairs
kept, to float64 rounding.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..master import closed_form
from ..program.variables import Vector
from . import fused

# "auto": the needed pairs when they are at most NEEDED_FRACTION of all pairs (summed over
# vectors), else all pairs; "needed", "all": always that layout.
MODE = "auto"
NEEDED_FRACTION = 0.25
GATHER_ENTRIES = 1 << 22  # the first layer's U and ΣU gathered per chunk of position pairs
RELU = (((1.0, "relu"),), 0.0)


@dataclass
class _Source:
    """The contribution of one input ``y`` to a linear step: ``K += S K_y``,
    ``Θ += S Θ_y + S_w K_y`` (``S_w = w·S`` when every atom has NTK weight ``w``)."""

    y: Vector
    s: torch.Tensor  # sparse CSR [K_out, K_y]
    w: float | None
    s_w: torch.Tensor | None  # sparse CSR, when the atoms' weights differ


@dataclass
class _DenseAt:
    """Initial-vector atoms ``UᵀΣU`` at the pairs ``(p, q)``: ``u``, ``cu``, ``cu_ntk``
    ``[P, N, F]`` (``U`` and ``ΣU``, a row per position and example: the rows a block reads
    are sliced or gathered whole); ``same``: p = q = every position in order (no gather)."""

    u: torch.Tensor
    cu: torch.Tensor
    cu_ntk: torch.Tensor | None
    p: torch.Tensor
    q: torch.Tensor
    same: bool


@dataclass
class _Linear:
    sources: list[_Source]
    dense: _DenseAt | None
    const: tuple[float, float]


@dataclass
class _Elementwise:
    """``z = φ(h)`` at z's pairs ``(p, q)``, read from h's pairs ``take`` (None: the same);
    h's variances at positions ``diag_pos`` are its pairs ``diag_idx``."""

    h: Vector
    phi: tuple
    dphi: tuple | None
    take: torch.Tensor | None
    p: torch.Tensor
    q: torch.Tensor
    diag_pos: torch.Tensor
    diag_idx: torch.Tensor


def _pair_terms(m: torch.Tensor, p: torch.Tensor, q: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every ``(k, a, b, M[p_k, a]·M[q_k, b])`` with both factors nonzero, for the output pairs
    ``(p_k, q_k)`` of ``M C Mᵀ`` (``m [P_out, P_in]``)."""
    nz = m.nonzero()  # row-major: each row's nonzeros are contiguous
    rows, cols = nz[:, 0], nz[:, 1]
    vals = m[rows, cols]
    count = torch.bincount(rows, minlength=m.shape[0])
    start = torch.cumsum(count, 0) - count
    cp, cq = count[p], count[q]
    n = cp * cq
    k = torch.repeat_interleave(torch.arange(len(p)), n)
    local = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    width = cq[k]
    ia, ib = start[p[k]] + local // width, start[q[k]] + local % width
    return k, cols[ia], cols[ib], vals[ia] * vals[ib]


def _csr(k: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used is stable
        warnings.simplefilter("ignore")
        coo = torch.sparse_coo_tensor(torch.stack((k, col)), val, shape).coalesce()
        return coo.to_sparse_csr()


class NeededPlan:
    """The recursion's steps over the position pairs the output needs (see the module doc).

    ``entries``: the most pairs of any vector (a block's covariance has ``entries × E``);
    ``fraction``: needed pairs over all pairs, summed over vectors."""

    def __init__(self, plan, batch: int):
        from .recursion import _Act, _GVar, _Lin

        self.kinds = 2 if plan.ntk else 1
        self.batch = batch
        self.output = plan.order[-1]
        linear, acts = self._fold(plan, _GVar, _Lin, _Act)
        order = self._reachable(plan.order, linear, acts)
        size = {v: max(math.prod(v.shape[1:]), 1) for v in order}
        keys: dict[Vector, list[torch.Tensor]] = {v: [] for v in order}
        keys[self.output].append(torch.zeros(1, dtype=torch.long))
        needed: dict[Vector, torch.Tensor] = {}
        pending = {}
        for v in reversed(order):  # every consumer of v comes after it: its set is complete
            needed[v] = torch.unique(torch.cat(keys.pop(v)))
            p, q = needed[v] // size[v], needed[v] % size[v]
            if v in acts:  # its pairs, and the variances (p, p) of the positions it reads
                # (implied: a needed (a, b) always comes with (a, a) and (b, b); kept explicit)
                h = acts[v][0]
                pos = torch.unique(torch.cat((p, q)))
                keys[h] += [needed[v], pos * size[h] + pos]
                continue
            terms = []
            for y, m, var, w in linear[v][0]:
                k, a, b, coef = _pair_terms(m, p, q)
                key = a * size[y] + b
                keys[y].append(key)
                terms.append((y, k, key, coef * var, w))
            pending[v] = terms
        self.order = order
        self.needed = needed
        self.size = size
        self.fraction = sum(len(needed[v]) for v in order) / sum(size[v] ** 2 for v in order)
        self.entries = max(len(needed[v]) for v in order)
        self.steps = {}
        for v in order:
            if v in acts:
                self.steps[v] = self._elementwise(v, *acts[v])
            else:
                self.steps[v] = self._linear(v, pending[v], *linear[v][1:])
        self.last_use: dict[Vector, int] = {}
        for i, v in enumerate(order):
            for dep in self._deps(self.steps[v]):
                self.last_use[dep] = i
        self.last_use[self.output] = len(order)
        self.variances = {s.h: torch.zeros(size[s.h], batch, dtype=torch.float64)
                          for s in self.steps.values() if isinstance(s, _Elementwise)}

    # ------------------------------------------------------------------ plan
    @staticmethod
    def _fold(plan, gvar_t, lin_t, act_t):
        """Linear steps as ``([(y, M, σ², w)], dense, const)`` with linear Nonlins between a
        MatMul and its input folded into ``M`` (``σ² M L K_y Lᵀ Mᵀ``: the Nonlin's own
        covariance is never formed unless something else reads it); activations as
        ``(h, φ, φ')``."""
        linear, acts = {}, {}

        def through(z, m):
            step = plan.steps[z]
            while isinstance(step, lin_t):
                m = m @ step.op.matrix
                z = step.y
                step = plan.steps[z]
            return z, m

        for v, step in plan.steps.items():
            if isinstance(step, act_t):
                acts[v] = (step.h, step.phi, step.dphi)
            elif isinstance(step, lin_t):
                linear[v] = ([(step.y, step.op.matrix, 1.0, None)], None, (0.0, 0.0))
            elif isinstance(step, gvar_t):
                items = []
                for z, ops in step.groups.items():
                    for op, var, w in ops:
                        y, m = through(z, op.matrix)
                        items.append((y, m, var, w))
                linear[v] = (items, step.dense, step.const)
        return linear, acts

    def _reachable(self, order, linear, acts):
        seen = {self.output}
        for v in reversed(order):
            if v not in seen:
                continue
            if v in acts:
                seen.add(acts[v][0])
            else:
                seen.update(y for y, *_ in linear[v][0])
        return [v for v in order if v in seen]

    def _index(self, v: Vector, key: torch.Tensor) -> torch.Tensor:
        """Positions of the pair keys ``key`` in v's sorted needed pairs."""
        idx = torch.searchsorted(self.needed[v], key)
        assert bool((self.needed[v][idx.clamp_max(len(self.needed[v]) - 1)] == key).all())
        return idx

    def _linear(self, v, terms, dense, const) -> _Linear:
        shape_out = len(self.needed[v])
        by_source: dict[Vector, list] = {}
        for y, k, key, coef, w in terms:
            by_source.setdefault(y, []).append((k, self._index(y, key), coef, w))
        sources = []
        for y, parts in by_source.items():
            k, col, coef = (torch.cat(t) for t in zip(*(p[:3] for p in parts)))
            shape = (shape_out, len(self.needed[y]))
            ws = {p[3] for p in parts}
            s = _csr(k, col, coef, shape)
            if len(ws) == 1:
                sources.append(_Source(y, s, next(iter(ws)), None))
            else:
                cw = torch.cat([c * (w or 0.0) for _, _, c, w in parts])
                sources.append(_Source(y, s, None, _csr(k, col, cw, shape)))
        at = None
        if dense is not None:
            n = self.batch

            def flat(u):  # [F, N, P] -> [P, N, F]
                return u.reshape(u.shape[0], n, -1).permute(2, 1, 0).contiguous()

            u = dense.u.reshape(dense.u.shape[0], n, -1)
            cu = torch.einsum("fg,gnp->fnp", dense.cov, u)
            cu_ntk = None if dense.cov_ntk is None else torch.einsum("fg,gnp->fnp", dense.cov_ntk, u)
            key = self.needed[v]
            p, q = key // self.size[v], key % self.size[v]
            same = torch.equal(p, q) and torch.equal(p, torch.arange(self.size[v]))
            at = _DenseAt(flat(u), flat(cu), None if cu_ntk is None else flat(cu_ntk), p, q, same)
        return _Linear(sources, at, const)

    def _elementwise(self, v, h, phi, dphi) -> _Elementwise:
        key_z, key_h = self.needed[v], self.needed[h]
        take = None if torch.equal(key_z, key_h) else self._index(h, key_z)
        n = self.size[h]
        pos = torch.unique(torch.cat((key_z // n, key_z % n)))
        return _Elementwise(h, phi, dphi, take, key_z // n, key_z % n, pos, self._index(h, pos * n + pos))

    @staticmethod
    def _deps(step) -> list[Vector]:
        if isinstance(step, _Elementwise):
            return [step.h]
        return [s.y for s in step.sources]

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, left: torch.Tensor, right: torch.Tensor, store: bool, compiled: bool) -> torch.Tensor:
        """The output's ``[kinds, E]`` for the example pairs ``(left[e], right[e])``; ``store``:
        these are same-example pairs, whose variances the closed forms keep."""
        vals: dict[Vector, torch.Tensor] = {}  # v -> [kinds, K_v, E]
        for i, v in enumerate(self.order):
            step = self.steps[v]
            if isinstance(step, _Linear):
                out = self._apply_linear(step, vals, left, right, i)
            else:
                out = self._apply_elementwise(step, vals[step.h], left, right, store, compiled)
            vals[v] = out
            for dep in self._deps(step):
                if self.last_use.get(dep) == i:
                    del vals[dep]
        return vals[self.output].reshape(self.kinds, -1)

    def _apply_linear(self, step: _Linear, vals: dict, left, right, i: int) -> torch.Tensor:
        kinds, e = self.kinds, len(left)
        out = None
        for src in step.sources:
            x = vals[src.y]
            beta = 0.0 if out is None else 1.0
            if out is None:
                out = torch.empty(kinds, src.s.shape[0], e, dtype=torch.float64)
            out[0].addmm_(src.s, x[0], beta=beta)
            if kinds == 1:
                continue
            if src.s_w is not None:
                out[1].addmm_(src.s_w, x[0], beta=beta)
                out[1].addmm_(src.s, x[1])
                continue
            # Θ += S (w K_y + Θ_y): one product; in place when y is not read again
            t = x[1]
            if src.w:
                t = t.add_(x[0], alpha=src.w) if self.last_use[src.y] == i else t.add(x[0], alpha=src.w)
            out[1].addmm_(src.s, t, beta=beta)
        if step.dense is not None:
            d = step.dense
            gram = self._gram(d, left, right)
            k = gram(d.cu)
            if out is None:
                out = torch.empty(kinds, len(d.p), e, dtype=torch.float64)
                out[0] = k
                if kinds == 2:
                    out[1] = k if d.cu_ntk is None else gram(d.cu_ntk)
            else:
                out[0].add_(k)
                if kinds == 2:
                    out[1].add_(k if d.cu_ntk is None else gram(d.cu_ntk))
        if out is None:
            raise AssertionError("a linear step without sources")
        for k in range(kinds):
            if step.const[k]:
                out[k].add_(step.const[k])
        return out

    def _gram(self, d: _DenseAt, left: torch.Tensor, right: torch.Tensor):
        """``cu -> [K, E]``: ``Σ_f U[p_k, left_e, f] cu[q_k, right_e, f]``.

        A block of pairs ``i < j`` in order has few distinct ``left`` (rows) and a run of
        ``right`` (columns): then one batched product per position pair over the block's
        rows and columns (the columns a slice, the positions unselected for same-position
        pairs), read at the pairs; otherwise (the same-example pass) a dot product per entry.
        Position pairs go in chunks that gather at most GATHER_ENTRIES values (F, the
        initial vectors' entries, can be large)."""
        e, k, f, n = len(left), len(d.p), d.u.shape[-1], self.batch
        rows, at_row = torch.unique(left, return_inverse=True)
        cols, at_col = torch.unique(right, return_inverse=True)
        if len(rows) * len(cols) <= 4 * e:
            at = at_row * len(cols) + at_col
            run = int(cols[-1] - cols[0]) + 1 == len(cols)
            step = max(1, GATHER_ENTRIES // ((len(rows) + len(cols)) * f))

            def rows_of(t, pos, which, lo, hi):  # t[pos[lo:hi]][:, which]: [chunk, len(which), F]
                idx = ((pos[lo:hi] * n).unsqueeze(1) + which).reshape(-1)
                return t.view(-1, f).index_select(0, idx).reshape(hi - lo, len(which), f)

            def part(cu, lo, hi):
                a = rows_of(d.u, d.p, rows, lo, hi)
                if run and d.same:  # a view: no copy
                    b = cu[lo:hi, int(cols[0]):int(cols[-1]) + 1]
                else:
                    b = rows_of(cu, d.q, cols, lo, hi)
                return torch.bmm(a, b.transpose(1, 2)).reshape(hi - lo, -1)[:, at]
        else:
            step = max(1, GATHER_ENTRIES // (e * f))

            def part(cu, lo, hi):  # [chunk·E, 1, F] × [chunk·E, F, 1]
                a = d.u.view(-1, f).index_select(0, ((d.p[lo:hi] * n).unsqueeze(1) + left).reshape(-1))
                b = cu.view(-1, f).index_select(0, ((d.q[lo:hi] * n).unsqueeze(1) + right).reshape(-1))
                return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(hi - lo, e)

        def gram(cu):
            if step >= k:
                return part(cu, 0, k)
            out = torch.empty(k, e, dtype=torch.float64)
            for lo in range(0, k, step):
                out[lo:lo + step] = part(cu, lo, min(k, lo + step))
            return out
        return gram

    def _apply_elementwise(self, step: _Elementwise, h: torch.Tensor, left, right, store, compiled):
        var = self.variances[step.h]
        if store:
            var[step.diag_pos.unsqueeze(1), left.unsqueeze(0)] = h[0].index_select(0, step.diag_idx)
        if step.take is not None:
            h = h.index_select(1, step.take)
        flat = var.view(-1)
        n = self.batch
        v1 = flat[(step.p * n).unsqueeze(1) + left.unsqueeze(0)]
        v2 = flat[(step.q * n).unsqueeze(1) + right.unsqueeze(0)]
        kinds = self.kinds
        if step.phi == RELU and bool((v1 > 0).all()) and bool((v2 > 0).all()):
            return fused.relu_pair(v1, v2, h[0], h[1] if kinds == 2 else None, compiled)
        shared: dict = {}  # ρ and θ, once for both kernels
        k = closed_form.cross(step.phi, step.phi, v1, v2, h[0], shared)
        if kinds == 1:
            return k.unsqueeze(0)
        dk = closed_form.cross(step.dphi, step.dphi, v1, v2, h[0], shared)
        return torch.stack((k, dk.mul_(h[1])))


def needed_plan(plan, batch: int, mode: str | None = None) -> NeededPlan | None:
    """The needed-pairs recursion of ``plan`` (recursion.py's ``_Plan``), or None when all
    pairs should be computed (``mode`` "all", or "auto" with more than ``NEEDED_FRACTION``
    of them needed)."""
    mode = MODE if mode is None else mode
    if mode not in ("auto", "needed", "all"):
        raise ValueError(f"pairs={mode!r}: use 'auto', 'needed' or 'all'")
    if mode == "all":
        return None
    needed = NeededPlan(plan, batch)
    if mode == "auto" and needed.fraction > NEEDED_FRACTION:
        return None
    return needed
