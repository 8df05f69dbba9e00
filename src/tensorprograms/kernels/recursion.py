"""NNGP and NTK of a program's output by a forward recursion over pair covariances,
blocked over example pairs, with positions kept as tensor axes.

For programs in which examples never interact (finite shapes ``(N, *positions)``),
every matrix is used by one MatMul and no transposes, Moments or Scalar-weighted
LinCombs occur, the Master Theorem's covariances reduce to (TP I, TP II):

- initial vectors ``v`` (with covariance Σ over their finite indices, pushed through the
  LinCombs as dense coefficients ``U``): ``K = UᵀΣU``, ``Θ = w·UᵀΣU``;
- a MatMul atom ``a = W z`` reaching a G-var through the per-example position map ``M``:
  ``K += σ² M K_z Mᵀ``, ``Θ += σ² M (w K_z + Θ_z) Mᵀ`` (distinct matrices are independent);
- an elementwise ``z = φ(h)``: ``K_z = E[φ(u)φ(v)]``, ``Θ_z = E[φ'(u)φ'(v)] ⊙ Θ_h`` with
  ``(u, v)`` of covariance ``K_h`` (closed forms);
- a linear Nonlin ``z = L(y)`` (pooling, a mean over positions): ``M K_y Mᵀ``, ``M Θ_y Mᵀ``.

``w`` is the parameter's NTK weight (1 in the NTK parametrization, 0 when frozen). These are
the covariances the engine computes from the same program (``Θ`` is TP II's sum over
parameters of ``E[dh dh']·Cov``, here accumulated forward instead of by a backward program),
but each update is a few batched tensor operations over ``[pairs, P, P]``, and memory is
bounded by evaluating a block of example pairs at a time: a pass over the same-example
pairs first (the variances every closed form needs), then the off-diagonal blocks.
Programs without positions (P = 1: MLPs) run the same plan on dense tiles of example pairs
instead (dense.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..master import closed_form
from ..program.calling import MatrixMap, call_full
from ..program.instructions import InitVector, LinComb, MatMul, Nonlin
from ..program.program import Program
from ..program.variables import Matrix, Vector
from . import dense, fused
from .operators import SpatialOp, probe, translate_sum

DENSE_ATOM_LIMIT = 1 << 14  # initial vectors up to this many finite entries are pushed as U
# Entries of one [pairs, P, P] covariance block: small enough for the processor's caches
# (measured on the 2-core development machine, 8×8 images, N = 64: 2^18 entries 4.5 s,
# 2^20 7.0 s, 2^22 12 s), but at least MIN_PAIRS pairs so that the per-block Python work
# stays small (16×16 images: 16 pairs = 2^20 entries 30 s, 4 pairs 41 s).
BLOCK_ENTRIES = 1 << 18
MIN_PAIRS = 16
# torch threads for the recursion's tensor ops (None: torch's own setting). Cache-sized
# blocks make each op short, and an OpenMP pool pays a barrier per op: on the shared 2-core
# machine (load 8) the 8×8 case took 24 s with 2 threads and 3.8 s with 1.
THREADS: int | None = 1


class NotApplicable(Exception):
    """The program is outside this recursion's scope: use the Master Theorem engine."""


@dataclass
class _Dense:
    """Initial-vector atoms of a G-var: ``U [F, N, P]`` with block-diagonal Σ and Σ·w (None:
    the same as Σ)."""

    u: torch.Tensor
    cov: torch.Tensor
    cov_ntk: torch.Tensor | None


@dataclass
class _GVar:
    groups: dict[Vector, list[tuple[SpatialOp, float, float]]] = field(default_factory=dict)
    dense: _Dense | None = None
    const: tuple[float, float] = (0.0, 0.0)  # initial vectors constant over examples and positions


@dataclass
class _Act:
    h: Vector
    phi: tuple
    dphi: tuple | None


@dataclass
class _Lin:
    y: Vector
    op: SpatialOp


class _Plan:
    """The program read as recursion steps, for the vectors the output needs."""

    def __init__(self, program: Program, output: Vector, batch: int,
                 weight: Callable[[object], float] | None, ghosts=()):
        self.batch, self.weight = batch, weight
        self.ntk = weight is not None
        # constant-initialized parameters: (primitive, use, target) with `use` (a LinComb of the
        # unit-variance primitive) added to `target` for the NTK only (not the forward pass)
        self.ghosts: dict[Vector, list[Vector]] = {}
        self.ghost_prims: set[Vector] = set()
        for prim, use, target, factor in ghosts:
            if factor is not None:
                raise NotApplicable("a constant-initialized gain")
            if self.ntk:
                self.ghosts.setdefault(target, []).append(use)
                self.ghost_prims.add(prim)
        self.steps: dict[Vector, object] = {}
        self._terms: dict[Vector, tuple[dict, dict]] = {}  # g -> ({atom: op}, {init: U})
        used: dict[Matrix, int] = {}
        for ins in program.instructions:
            if isinstance(ins, MatMul):
                if ins.transpose:
                    raise NotApplicable("transposed matrix")
                used[ins.matrix] = used.get(ins.matrix, 0) + 1
        if any(c > 1 for c in used.values()):
            raise NotApplicable("a matrix used by several MatMuls (weight sharing)")
        self._visit(output)
        self.order = [v for v in program.vectors if v in self.steps]
        self.last_use: dict[Vector, int] = {}
        for i, v in enumerate(self.order):
            for dep in self._deps(self.steps[v]):
                self.last_use[dep] = i
        self.last_use[output] = len(self.order)

    @staticmethod
    def _deps(step) -> list[Vector]:
        if isinstance(step, _GVar):
            return list(step.groups)
        if isinstance(step, _Act):
            return [step.h]
        return [step.y]

    def _positions(self, v: Vector) -> int:
        if not v.shape or v.shape[0] != self.batch:
            raise NotApplicable(f"{v.name} has no leading example axis")
        return math.prod(v.shape[1:])

    def _visit(self, v: Vector) -> None:
        if v in self.steps:
            return
        self._positions(v)
        ins = v.instruction
        if v.is_gaussian:
            step = self._gvar(v)
            for z in step.groups:
                self._visit(z)
        elif isinstance(ins, Nonlin) and not ins.params and len(ins.xs) == 1:
            (x,) = ins.xs
            if ins.linear:
                op = probe(ins.fn, [x.shape], 0, [], self.batch, v.shape)
                if op is None:
                    raise NotApplicable(f"{v.name}: not a per-example map of positions")
                step = _Lin(x, op)
            elif ins.elementwise and x.shape == v.shape and x.is_gaussian:
                phi = closed_form.terms_of(ins.fn)
                dphi = closed_form.derivative(ins.fn) if self.ntk else None
                if phi is None or (self.ntk and dphi is None):
                    raise NotApplicable(f"{v.name}: no closed form for its nonlinearity")
                step = _Act(x, phi, None if dphi is None else closed_form.terms_of(dphi))
            else:
                raise NotApplicable(f"{v.name}: a nonlinearity outside the recursion")
            self._visit(step.h if isinstance(step, _Act) else step.y)
        else:
            raise NotApplicable(f"{v.name}: {type(ins).__name__} outside the recursion")
        self.steps[v] = step

    # -------------------------------------------------------------- G-vars as atoms
    def _atoms(self, g: Vector) -> tuple[dict, dict]:
        """``({MatMul atom: SpatialOp}, {initial vector: U [F_a, *F_g]})``."""
        if g in self._terms:
            return self._terms[g]
        ins = g.instruction
        spatial: dict[Vector, SpatialOp] = {}
        dense: dict[Vector, torch.Tensor] = {}
        if isinstance(ins, MatMul):
            p = self._positions(g)
            spatial[g] = SpatialOp(torch.eye(p, dtype=torch.float64), g.shape[1:], g.shape[1:])
        elif isinstance(ins, InitVector):
            if g.numel > DENSE_ATOM_LIMIT:
                raise NotApplicable(f"{g.name}: an initial vector with too many finite entries")
            dense[g] = _Eye(g.numel, g.shape)
        elif isinstance(ins, LinComb):
            if ins.params:
                raise NotApplicable(f"{g.name}: a LinComb with Scalar coefficients")
            shapes = [x.shape for x in ins.xs]
            # Σ c_k x_k of equal shapes (P.lincomb): term k is c_k times the identity, no probing
            # (a Flatten readout sums one term per position)
            coefs = getattr(ins.fn, "coefficients", None)
            if coefs is not None and any(s != g.shape for s in shapes):
                coefs = None
            for k, x in enumerate(ins.xs):
                inner_spatial, inner_dense = self._atoms(x)
                if inner_spatial:
                    op = None if coefs is not None else probe(ins.fn, shapes, k, [], self.batch, g.shape)
                    if op is None and coefs is None:
                        raise NotApplicable(f"{g.name}: not a per-example map of positions")
                    for atom, m in inner_spatial.items():
                        t = m.then(op) if coefs is None else m.scaled(coefs[k])
                        spatial[atom] = spatial[atom].plus(t) if atom in spatial else t
                for atom, u in inner_dense.items():
                    lin = getattr(ins.fn, "coefficients", None)  # Program.lincomb: Σ c_k x_k
                    if isinstance(u, _Eye) and isinstance(ins.fn, MatrixMap):
                        t = ins.fn.matrix.T.reshape(u.n, *g.shape)  # fn(e_f) = A[:, f]: no probe
                    elif lin is not None and x.shape == g.shape and not isinstance(u, _Eye):
                        t = u if lin[k] == 1.0 else lin[k] * u  # no pass through fn
                    else:
                        u = _dense(u)
                        args = [u if i == k else torch.zeros(u.shape[0], *s, dtype=torch.float64)
                                for i, s in enumerate(shapes)]
                        t = call_full(ins.fn, args, shapes, [], 1).reshape(u.shape[0], *g.shape)
                    dense[atom] = dense[atom] + t if atom in dense else t
        else:
            raise NotApplicable(f"{g.name}: {type(ins).__name__} is not Gaussian")
        for use in self.ghosts.get(g, ()):
            use_spatial, use_dense = self._atoms(use)
            if use_spatial or use.shape != g.shape:
                raise NotApplicable(f"{use.name}: a constant-initialized parameter of another shape")
            for atom, u in use_dense.items():
                dense[atom] = _dense(dense[atom]) + _dense(u) if atom in dense else u
        self._terms[g] = (spatial, dense)
        return spatial, dense

    def _gvar(self, g: Vector) -> _GVar:
        spatial, dense = self._atoms(g)
        step = _GVar()
        for atom, op in spatial.items():
            mm = atom.instruction
            w = 0.0 if self.weight is None else float(self.weight(mm.matrix))
            step.groups.setdefault(mm.x, []).append((op, float(mm.matrix.variance), w))
        if dense:
            us, covs, ntks, consts = [], [], [], []
            for atom, u in dense.items():
                u = _dense(u)
                f = u.shape[0]
                u = u.reshape(f, self.batch, -1)
                c = atom.instruction.cov.reshape(f, f).to(torch.float64)
                w = 0.0 if self.weight is None else float(self.weight(atom))
                # a constant-initialized parameter's stand-in enters Θ only (w·UᵀΣU), not K
                c_k, c_ntk = (torch.zeros_like(c) if atom in self.ghost_prims else c), w * c
                flat = u.reshape(f, -1)
                # the same at every example and position (a bias)? (the first two columns first)
                same = flat.shape[1] < 2 or torch.equal(flat[:, 0], flat[:, 1])
                if same and bool((flat == flat[:, :1]).all()):
                    consts.append((flat[:, 0], c_k, c_ntk))
                    continue
                us.append(u)
                covs.append(c_k)
                ntks.append(c_ntk)
            if us:
                cov, cov_ntk = torch.block_diag(*covs), torch.block_diag(*ntks)
                u = us[0] if len(us) == 1 else torch.cat(us)
                step.dense = _Dense(u, cov, None if torch.equal(cov, cov_ntk) else cov_ntk)
            step.const = (sum(float(u @ c @ u) for u, c, _ in consts),
                          sum(float(u @ c @ u) for u, _, c in consts))
        return step


@dataclass
class _Eye:
    """The identity ``[n, *shape]``: an initial vector's own coordinates, not yet pushed
    through a map (materialized only when a map has to be probed with it)."""

    n: int
    shape: tuple[int, ...]


def _dense(u: torch.Tensor | _Eye) -> torch.Tensor:
    if isinstance(u, _Eye):
        return torch.eye(u.n, dtype=torch.float64).reshape(u.n, *u.shape)
    return u


class _Pairs:
    """The example pairs ``(left[e], right[e])`` of one block."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor):
        self.left, self.right = left, right

    def dense(self, d: _Dense, cov: torch.Tensor) -> torch.Tensor:
        """``U_lᵀ Σ U_r`` for these pairs: ``[E, P, P]``."""
        a = d.u[:, self.left].permute(1, 2, 0)  # [E, P, F]
        b = torch.einsum("fg,geq->efq", cov, d.u[:, self.right])  # [E, F, P]
        return torch.bmm(a, b)


def _evaluate(plan: _Plan, pairs: _Pairs, variances: dict[Vector, torch.Tensor],
              store_variances: bool, compiled: bool = False) -> torch.Tensor:
    """The output's ``[2 or 1, E]`` (NNGP, NTK) for the pairs of one block."""
    vals: dict[Vector, torch.Tensor] = {}  # v -> [kinds, E, P, P]
    kinds = 2 if plan.ntk else 1
    for i, v in enumerate(plan.order):
        step = plan.steps[v]
        if isinstance(step, _GVar):
            out = None
            for z, items in step.groups.items():
                t = vals[z]
                by_weight: dict[float, list] = {}
                for op, var, w in items:
                    by_weight.setdefault(w, []).append((op, var))
                for w, ops in by_weight.items():
                    # MatMul atoms: K_a = σ² K_z, Θ_a = σ² (w K_z + Θ_z)
                    if kinds == 1:
                        src = t
                    elif len(by_weight) == 1 and plan.last_use[z] == i:
                        src = t  # z is not needed again: update it in place
                        t[1].add_(t[0], alpha=w)
                    else:
                        src = torch.stack((t[0], w * t[0] + t[1]))
                    moves = [(op.offset, var) for op, var in ops if op.offset is not None]
                    terms = [translate_sum(src, ops[0][0].in_shape, moves)] if moves else []
                    terms += [op.pair(src).mul_(var) for op, var in ops if op.offset is None]
                    for term in terms:
                        out = term if out is None else out.add_(term)
            if step.dense is not None:
                d = pairs.dense(step.dense, step.dense.cov)
                if out is None and kinds == 2 and step.dense.cov_ntk is None:
                    out = torch.stack((d, d))
                elif out is None:
                    out = d.unsqueeze(0).repeat(kinds, 1, 1, 1)
                else:
                    out[0].add_(d)
                    if kinds == 2 and step.dense.cov_ntk is None:
                        out[1].add_(d)
                if kinds == 2 and step.dense.cov_ntk is not None:
                    if step.groups:
                        out[1].add_(pairs.dense(step.dense, step.dense.cov_ntk))
                    else:
                        out[1] = pairs.dense(step.dense, step.dense.cov_ntk)
            if out is None:
                p = math.prod(v.shape[1:])
                out = torch.zeros(kinds, len(pairs.left), p, p, dtype=torch.float64)
            for k in range(kinds):
                if step.const[k]:
                    out[k].add_(step.const[k])
        elif isinstance(step, _Lin):
            out = step.op.pair(vals[step.y])
        else:
            h = vals[step.h]
            if store_variances:
                variances[step.h][pairs.left] = h[0].diagonal(dim1=-2, dim2=-1)
            var = variances[step.h]
            v1, v2 = var[pairs.left].unsqueeze(-1), var[pairs.right].unsqueeze(-2)
            if step.phi == RELU and bool((var > 0).all()):
                out = fused.relu_pair(v1, v2, h[0], h[1] if kinds == 2 else None, compiled)
            else:
                shared: dict = {}  # ρ and θ, once for both kernels
                k = closed_form.cross(step.phi, step.phi, v1, v2, h[0], shared)
                if kinds == 1:
                    out = k.unsqueeze(0)
                else:
                    dk = closed_form.cross(step.dphi, step.dphi, v1, v2, h[0], shared)
                    out = torch.stack((k, dk.mul_(h[1])))
                del shared
        vals[v] = out
        for dep in plan._deps(step):
            if plan.last_use.get(dep) == i:
                del vals[dep]
    out = vals[plan.order[-1]]
    return out.reshape(kinds, -1)


RELU = (((1.0, "relu"),), 0.0)


def kernels_by_recursion(program: Program, output: Vector, batch: int,
                         weight: Callable[[object], float] | None, n1: int | None = None,
                         block_entries: int = BLOCK_ENTRIES, ghosts=(), min_pairs: int = MIN_PAIRS,
                         pairs: str | None = None) -> tuple[torch.Tensor, ...]:
    """``(K,)`` or ``(K, Θ)`` of ``output`` (finite shape ``(batch,)``), each ``[batch, batch]``,
    or ``[n1, batch - n1]`` (the rows ``< n1`` against the others) when ``n1`` is given.

    Args:
        weight: ``primitive -> float``, the NTK weight of a matrix or initial vector (None:
            NNGP only).
        block_entries, min_pairs: a block holds ``max(min_pairs, block_entries // P²)`` example
            pairs (P: the most positions of any vector; with the needed pairs, P² is the most
            pairs any vector needs); memory is a few such blocks. Without positions (P = 1) a
            block is a dense tile of ``√block_entries`` × ``√block_entries`` pairs, and the
            tiles are spread over torch's thread count (kernels/dense.py).
        ghosts: the lowering's ``(primitive, use, target, factor)`` for constant-initialized
            parameters (frontend/ntk.py): their stand-ins add ``weight·Cov`` to Θ only.
        pairs: which position pairs to carry: "needed" (only those the output reads, e.g.
            same-position pairs under a Flatten readout; needed.py), "all", or "auto" (the
            needed ones when they are few); None: ``needed.MODE``. Equal values either way.

    Raises:
        NotApplicable: the program is outside the recursion (the engine handles it).
    """
    if output.shape != (batch,):
        raise NotApplicable("the output is not one value per example")
    threads = torch.get_num_threads()
    if THREADS is not None:
        torch.set_num_threads(THREADS)
    try:
        return _kernels(program, output, batch, weight, n1, block_entries, ghosts, min_pairs, threads,
                        pairs)
    finally:
        torch.set_num_threads(threads)


def _kernels(program, output, batch, weight, n1, block_entries, ghosts, min_pairs, threads, pairs):
    from .needed import needed_plan  # it builds on this module's steps

    plan = _Plan(program, output, batch, weight, ghosts)
    kinds = 2 if plan.ntk else 1
    p_max = max(math.prod(v.shape[1:]) for v in plan.order)
    if p_max == 1:  # no positions (MLPs): dense tiles of example pairs, on `threads` threads
        return dense.kernels(plan, batch, kinds, n1, threads, max(math.isqrt(block_entries), 1))
    layers = sum(isinstance(s, _Act) for s in plan.steps.values())
    needed = needed_plan(plan, batch, pairs)
    if needed is not None:  # only the position pairs the output reads (needed.py)
        per_block = max(min_pairs, block_entries // needed.entries, 1)
        return _blocks(needed.evaluate, batch, kinds, n1, per_block, needed.entries * layers)
    per_block = max(min_pairs, block_entries // (p_max * p_max), 1)
    variances = {s.h: torch.zeros(batch, math.prod(s.h.shape[1:]), dtype=torch.float64)
                 for s in plan.steps.values() if isinstance(s, _Act)}

    def evaluate(left, right, store, compiled):
        return _evaluate(plan, _Pairs(left, right), variances, store, compiled)

    return _blocks(evaluate, batch, kinds, n1, per_block, p_max * p_max * layers)


def _blocks(evaluate: Callable, batch: int, kinds: int, n1: int | None, per_block: int,
            entries: int) -> tuple[torch.Tensor, ...]:
    """Every block of example pairs: the same-example pairs first, then the others.
    ``evaluate(left, right, store_variances, compiled) -> [kinds, E]``; ``entries``: covariance
    entries per example pair times the layers (the entry-passes that decide compilation)."""
    with torch.no_grad():
        idx = torch.arange(batch)
        if n1 is None:
            result = torch.zeros(kinds, batch, batch, dtype=torch.float64)
            iu = torch.triu_indices(batch, batch, 1)
            left, right = iu[0], iu[1]
        else:
            result = torch.zeros(kinds, n1, batch - n1, dtype=torch.float64)
            left = torch.arange(n1).repeat_interleave(batch - n1)
            right = torch.arange(n1, batch).repeat(n1)
        compiled = fused.use_compiled((len(left) + batch) * entries)
        # the same-example pairs first: the variances every closed form needs
        for start in range(0, batch, per_block):
            rows = idx[start:start + per_block]
            val = evaluate(rows, rows, True, compiled)
            if n1 is None:
                result[:, rows, rows] = val
        for start in range(0, len(left), per_block):
            lb, rb = left[start:start + per_block], right[start:start + per_block]
            val = evaluate(lb, rb, False, compiled)
            if n1 is None:
                result[:, lb, rb] = val
                result[:, rb, lb] = val
            else:
                result[:, lb, rb - n1] = val
    return tuple(result)
