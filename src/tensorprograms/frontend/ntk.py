"""The infinite-width NTK of a lowered model: TP II's backward program.

The forward program Q is extended by its backward pass (a NetsorT program: readout
vectors seed it, transposed matrices carry it, vjps of the Nonlins are odd in the
cotangents). Cotangents are indexed like the forward vectors, with the cotangent of
output f_p living at batch index p (valid because batch elements never interact).
For every trainable primitive (matrix or initial vector) and every pair of its uses
``a_i, a_j`` (the G-vars it produces; several with weight sharing),

    Θ[p, q] += Σ_{r, s} E[da_i[p, r] da_j[q, s]] · Cov(a_i[p, r], a_j[q, s]),

which for a matrix is TP II's σ² E[dh dh'] E[x x'] and for the first layer
``E[dh dh']·Var(W_ij)⟨x, x'⟩``. This is the NTK parametrization: gradients with respect
to ω in W = σ ω/√fan_in.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..errors import UnsupportedOperation
from ..master import closed_form
from ..program import functions as F
from ..program.calling import call_full, common_rank, is_elementwise
from ..program.instructions import InitVector, LinComb, MatMul, Moment, Nonlin
from ..program.program import Program
from ..program.variables import Matrix, Scalar, Vector
from .batch_owner import SHARED, batch_owners, pool_by_owner


def _vjp_fn(fn, shapes, i: int, out_shape, nparams: int, linear: bool):
    """A function (xs..., d, *params) -> cotangent of argument i, by the calling convention."""
    k = len(shapes)

    def pull(*vals):
        xs, d, ps = list(vals[:k]), vals[k], list(vals[k + 1:])
        rank = common_rank(list(shapes) + [tuple(out_shape)] + [tuple(p.shape) for p in ps
                                                                 if isinstance(p, torch.Tensor)])
        nb = d.ndim - rank
        batch = d.shape[:nb]
        xs = [x.reshape(*batch, *s) if x.numel() == math.prod(batch) * math.prod(s) else x
              for x, s in zip(xs, shapes)]
        if linear:
            xs = [torch.zeros(*batch, *s, dtype=d.dtype) for s in shapes]

        def f(t):
            args = list(xs)
            args[i] = t
            return call_full(fn, args, shapes, ps, nb)

        _, back = torch.func.vjp(f, xs[i])
        return back(d.reshape(*batch, *out_shape))[0].reshape(*batch, *shapes[i])

    pull.__name__ = f"vjp{i}"
    return pull


def _diag_jacobian(fn, shapes, i, params=()):
    """∂φ/∂x_i of an elementwise φ (the diagonal of its Jacobian): in closed form for the
    recognised activations (relu' = step, …, so E[φ'φ'] has a closed form too), else by a
    vjp with ones."""
    if len(shapes) == 1 and not params:
        d = closed_form.derivative(fn)
        if d is not None:
            return d

    def jac(*vals):
        xs, ps = list(vals[: len(shapes)]), list(vals[len(shapes):])

        def f(t):
            args = list(xs)
            args[i] = t
            return fn(*args, *ps)

        out, back = torch.func.vjp(f, xs[i])
        return back(torch.ones_like(out))[0]

    jac.__name__ = f"∂{i}φ"
    return jac


def _lin_adjoint(fn, shapes, i, out_shape):
    """The adjoint of a linear map's argument i: ``(d, *params) -> cotangent``; the params
    (a LinComb's Scalars, NETSOR+) are the forward map's, so the adjoint is linear too."""
    k = len(shapes)

    def adj(d, *ps):
        # called by the calling convention: d is padded to the params' common rank
        rank = max([len(out_shape)] + [p.ndim for p in ps if isinstance(p, torch.Tensor)])
        nb = d.ndim - rank
        batch = d.shape[:nb]
        d = d.reshape(*batch, *out_shape)
        zeros = [torch.zeros(*batch, *s, dtype=d.dtype) for s in shapes]

        def f(t):
            args = list(zeros)
            args[i] = t
            return call_full(fn, args, shapes, list(ps), nb).reshape(*batch, *out_shape)

        _, back = torch.func.vjp(f, zeros[i])
        return back(d)[0]

    adj.__name__ = f"adjoint{i}"
    assert k >= 1
    return adj


def _part(fn, shapes, i):
    def part(t, *ps):
        nb = t.ndim - len(shapes[i])
        batch = t.shape[:nb]
        args = [t if j == i else torch.zeros(*batch, *s, dtype=t.dtype) for j, s in enumerate(shapes)]
        return call_full(fn, args, shapes, list(ps), nb)

    part.__name__ = f"part{i}"
    return part


def _diagonal(fn, shapes, params, out_shape) -> bool:
    """Whether a one-vector LinComb with Scalar params scales each finite index separately."""
    if len(shapes) != 1 or tuple(shapes[0]) != tuple(out_shape):
        return False
    probe = [torch.ones(p.shape, dtype=torch.float64) if isinstance(p, Scalar) else p for p in params]
    return is_elementwise(fn, shapes, probe, tuple(out_shape))


def ntk_of(program: Program, output: Vector, batch: int, master_theorem, trainable=None,
           ghosts=(), owner_cache: dict | None = None):
    """Per-primitive NTK contributions ``{primitive: Θ_p [batch, batch]}`` for the per-output
    kernel of ``output`` (a sum of readouts), and the limit object of the extended program
    (its caches serve the NNGP too).

    ``Θ_p = Σ_{uses i, j} Σ E[da_i da_j]·Cov(a_i, a_j)`` is the NTK parametrization's
    contribution of ``p`` (gradients w.r.t. ω in ``p = σ·ω``). ``ghosts`` are
    ``(primitive, use, target, factor)`` for parameters initialized to a constant: ``use``
    (not part of the forward pass) is the parameter's unit-variance stand-in shaped like
    ``target``, the vector it is added to (``factor`` None) or multiplies ``factor`` into
    (a gain: its gradient is the cotangent times ``factor``, which is not independent of the
    cotangent, so the product is formed before the expectation); their Θ_p is the
    contribution per unit learning rate of the parameter itself.

    ``trainable(primitive) -> bool`` drops frozen parameters' contributions (their
    cotangents still flow). Width averages (Moments, e.g. LayerNorm statistics) are held
    fixed in the backward pass: their gradient term is E[dy ∂_θφ] · ψ'(x), and E[dy ·]
    vanishes because the backward pass is odd in the readout seeds, which are independent
    of the forward pass (TP II).

    ``owner_cache``: a dict kept by the caller across calls whose programs are lowered from
    the same model and input shapes (so they have the same structure, vector by vector):
    the batch owners are probed once per structure instead of once per call."""
    Q = program
    signature = tuple((type(ins).__name__, tuple(ins.out.shape),
                       tuple(x.index for x in getattr(ins, "xs", ())),
                       getattr(getattr(ins, "x", None), "index", None)) for ins in Q.instructions)
    if owner_cache is not None and signature in owner_cache:
        by_index = owner_cache[signature]
        owners = {v: by_index[v.index] for v in Q.vectors}
    else:
        owners = batch_owners(Q, output, batch)  # example of each finite index (any layout)
        if owner_cache is not None:
            owner_cache[signature] = {v.index: o for v, o in owners.items()}
    # primitive -> (a, da, the forward var whose entries a's entries belong to)
    uses: dict[object, list[tuple[Vector, object, Vector]]] = defaultdict(list)
    cot: dict[Vector, list] = defaultdict(list)  # var -> cotangent pieces (Vector or tensor)
    seeds: dict[Matrix, Vector] = {}
    cot[output].append(torch.ones(output.shape, dtype=torch.float64))

    def linear(fn, *vs, label="", params=()):
        """A linear map of cotangents: a LinComb when they are Gaussian, else a Nonlin."""
        if all(v.is_gaussian for v in vs):
            return Q.linear(fn, *vs, label=label, params=params)
        return Q.nonlin(fn, *vs, params=params)

    def add(*vs):
        return linear(lambda *us: sum(us[1:], us[0]), *vs, label="Σ cotangents")

    def total(v: Vector):
        pieces = cot.get(v, [])
        consts = [p for p in pieces if isinstance(p, torch.Tensor)]
        vecs = [p for p in pieces if isinstance(p, Vector)]
        if consts and vecs:
            raise UnsupportedOperation("NTK: the output mixes readouts with hidden activations")
        if consts:
            return sum(consts)
        if not vecs:
            return None
        return vecs[0] if len(vecs) == 1 else add(*vecs)

    ghosts_at: dict[Vector, list] = defaultdict(list)
    for prim, use, target, factor in ghosts:
        ghosts_at[target].append((prim, use, factor))

    def times_forward(fwd: Vector, d):
        """``fwd ⊙ d`` kept as (forward factor) × (backward vector), which the engine factors."""
        if isinstance(d, torch.Tensor):
            raise UnsupportedOperation("NTK: a gain applied to the model's outputs")
        inner = d.instruction
        if isinstance(inner, Nonlin) and inner.fn is F.product:
            f, back = inner.xs
            return Q.nonlin(F.product, Q.nonlin(F.product, fwd, f, elementwise=True), back,
                            elementwise=True)
        return Q.nonlin(F.product, fwd, d, elementwise=True)

    forward = list(Q.instructions)
    # vectors whose cotangent can reach a parameter: outputs of MatMuls and of LinCombs of
    # initial vectors, ghost targets, and everything computed from them. Others (a fixed
    # positional encoding, a Nonlin of auxiliary vectors shared by the batch) get none.
    reaches: set = {t for _, _, t, _ in ghosts}
    for ins in forward:
        if isinstance(ins, MatMul) or (isinstance(ins, (LinComb, Nonlin)) and any(
                x in reaches or (isinstance(ins, LinComb) and x.kind == "init") for x in ins.xs)):
            reaches.add(ins.out)
    for ins in reversed(forward):
        out = ins.out
        if not isinstance(out, (Vector, Scalar)) or out not in cot:
            continue
        d = total(out)
        if d is None:
            continue
        for prim, use, factor in ghosts_at.get(out, ()):
            uses[prim].append((use, d if factor is None else times_forward(factor, d), out))
        if isinstance(ins, InitVector):
            continue  # its uses were recorded where it entered a LinComb
        if isinstance(ins, MatMul):
            W = ins.matrix
            uses[W].append((out, d, out))
            if isinstance(d, torch.Tensor):  # readout: √n·(row of W) is a fresh initial vector
                if W not in seeds:
                    # √n·(row of W): in R^{in_ratio·n}, entry variance σ²/(in_ratio·n) times n
                    seeds[W] = Q.vector(f"d{W.name}", variance=W.variance / W.in_ratio, ratio=W.in_ratio)
                dx = Q.linear(lambda t, _c=d: t.reshape(*t.shape, *[1] * _c.ndim) * _c,
                              seeds[W], label=f"readout cotangent {W.name}")
            else:
                dx = Q.matmul(W, d, transpose=True)
            cot[ins.x].append(dx)
        elif isinstance(ins, LinComb):
            shapes = [x.shape for x in ins.xs]
            ps = ins.params  # Scalars held at their limits, like Moments (see the docstring)
            for i, x in enumerate(ins.xs):
                if x.kind == "init":
                    # a LinComb of x alone is its own use (shares its covariance cache)
                    a = out if len(ins.xs) == 1 and not ps else Q.linear(
                        _part(ins.fn, shapes, i), x, label=f"use of {x.name}", params=ps)
                    uses[x].append((a, d, out))
                elif isinstance(d, torch.Tensor):
                    if ps:
                        raise UnsupportedOperation(
                            "NTK: the model's output is a Scalar-weighted combination of readouts")
                    adj = _lin_adjoint(ins.fn, shapes, i, out.shape)
                    cot[x].append(adj(d.unsqueeze(0))[0])
                elif (not ps and tuple(x.shape) == tuple(out.shape)
                      and getattr(ins.fn, "coefficients", (None,) * (i + 1))[i] == 1.0):
                    # x enters Σ_k c_k x_k with c = 1 and its own shape (a bias added to Wx):
                    # its cotangent is d itself, not a new vector mapped by a vjp
                    cot[x].append(d)
                else:
                    adj = _lin_adjoint(ins.fn, shapes, i, out.shape)
                    inner = d.instruction
                    if (ps and isinstance(inner, Nonlin) and inner.fn is F.product
                            and _diagonal(ins.fn, shapes, ps, out.shape)):
                        # a diagonal scaling (LayerNorm of a G-var) commutes with the forward
                        # factor: keep the cotangent a (forward) × (backward) product, which
                        # the engine factors exactly
                        fwd, back = inner.xs
                        back = linear(adj, back, label=f"adjoint of {out.name}", params=ps)
                        cot[x].append(Q.nonlin(F.product, fwd, back, elementwise=True))
                    else:
                        cot[x].append(linear(adj, d, label=f"adjoint of {out.name}", params=ps))
        elif isinstance(ins, Nonlin):
            if isinstance(d, torch.Tensor):
                raise UnsupportedOperation(
                    "NTK: a nonlinearity applied to the model's outputs; only sums of readouts "
                    "are supported as outputs."
                )
            shapes = [x.shape for x in ins.xs]
            for i, x in enumerate(ins.xs):
                if x not in reaches:
                    continue
                if (owners[x] == SHARED).any():
                    raise UnsupportedOperation(
                        f"NTK: {x.name} is shared across the batch inside a nonlinearity"
                    )
                if ins.linear:
                    cot[x].append(linear(_lin_adjoint(ins.fn, shapes, i, out.shape), d,
                                         label=f"adjoint of {out.name}"))
                elif ins.elementwise and all(s == out.shape for s in shapes):
                    # φ' at the forward point times the cotangent: a product whose factors are
                    # independent in the limit (forward vs backward), which the engine factors
                    jac = Q.nonlin(_diag_jacobian(ins.fn, shapes, i, ins.params), *ins.xs, params=ins.params,
                                   elementwise=True)
                    # keep cotangents as (forward factor) × (backward vector): the engine
                    # factors E[(F B) ⊗ (F' B')] only when the two groups are independent
                    cot[x].append(times_forward(jac, d))
                else:
                    fn = _vjp_fn(ins.fn, shapes, i, out.shape, len(ins.params), False)
                    cot[x].append(Q.nonlin(fn, *ins.xs, d, params=ins.params))
        elif isinstance(ins, Moment):
            continue  # held fixed: see the docstring

    limit = master_theorem(Q)
    live = {prim: items for prim, items in uses.items() if trainable is None or trainable(prim)}
    # declare every pair read below (and the output's, read by the caller for the NNGP) so
    # the engine frees intermediate N × N moments after their last use
    queries = [(output, output)]
    for items in live.values():
        for a_i, d_i, _ in items:
            for a_j, d_j, _ in items:
                queries.append((a_i, a_j))
                if isinstance(d_i, Vector):
                    queries.append((d_i, d_j))
    limit.plan(queries)
    contributions = {}
    for prim, items in live.items():
        theta = None
        for a_i, d_i, f_i in items:
            if (owners[f_i] == SHARED).any():
                raise UnsupportedOperation(f"NTK: {f_i.name} is shared across the batch")
            for a_j, d_j, f_j in items:
                C = limit.cov(a_i, a_j)  # [*F_i, *F_j]
                if isinstance(d_i, torch.Tensor):
                    D = torch.einsum("a,b->ab", d_i.reshape(-1), d_j.reshape(-1)).reshape(C.shape)
                else:
                    D = limit.second_moment(d_i, d_j)
                term = pool_by_owner((C * D).reshape(a_i.numel, a_j.numel), owners[f_i], owners[f_j], batch)
                theta = term if theta is None else theta + term
                del C, D
                limit.release(a_i, a_j)
                if isinstance(d_i, Vector):
                    limit.release(d_i, d_j)
        # Σ over the primitive's rows: a matrix with out_ratio·n rows or a vector in R^{ratio·n}
        # (heads of fixed size: rules_heads) has that many times the rows of one in R^n
        rows = prim.out_ratio if isinstance(prim, Matrix) else getattr(prim, "ratio", 1.0)
        contributions[prim] = theta if rows == 1.0 else rows * theta
    return contributions, limit
