"""Infinitely many heads of fixed size: ``nn.MultiheadAttention(n, n // d_h)``.

A reshape of the width ``n`` into ``(n/k, k)`` with ``k`` the same at both capture widths
(the head dimension ``d_h``) makes ``k`` a *finite* index of a vector of ``R^{n/k}`` whose
width coordinate is the head. Coordinates ``c ≡ α (mod k)`` of ``W y`` are ``W^{(α)} y`` with
``W^{(α)}`` the rows ``α::k`` of ``W``: a fresh ``(n/k)×n`` matrix with the same entry
variance, independent across α; LinCombs, Nonlins and initial vectors commute with
restricting to a residue class. So the split vector is obtained by rewriting its
definition (:func:`split_vector`), valid when the unsplit vector and ``W`` are not used
elsewhere in the program (checked after lowering: :func:`check_splits`).

In the torch layout the head (the new width coordinate) may share an axis with finite
indices: PyTorch's decomposition of ``nn.MultiheadAttention`` reshapes ``[T, B, n]`` to
``[T, B·H, d_h]`` and works on ``[B·H, T, d_h]``. A :class:`SplitVec` records, for every
torch element, its finite index and head (``codes``); the axis holding the head has the
structure ``(p, h, q)`` (index ``(p·H + h)·Q + q``). Per-head ops (``bmm`` over ``d_h``,
masks, softmax, ``where``) act on each head alike: they become one Nonlin over the finite
indices of one head, evaluated with the engine's batch of samples put where the heads
are (the "fold"). The per-head logits ``q·k/√d_h`` stay random: the Nonlin is a function
of ``3·d_h·T·B`` Gaussians, whose expectations the engine takes by Monte Carlo. The output
projection on the merged heads is ``Σ_α W_O^{(α)} o_α`` with independent column blocks of
fan-in ``n/k`` (a law of large numbers over the heads: Hron et al. 2020).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..program.instructions import InitVector, LinComb, MatMul, Nonlin
from ..program.variables import Vector
from .lower import APPLY_HOOKS, FINALIZERS, Lowering, _index, _tp_name, check_fan_in_scaling
from .values import Data, Param, ParamT, Sca, Tuple_, Vec

aten = torch.ops.aten

# ops that only move elements: applied to the codes
MOVE_OPS = (
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.clone.default, aten.alias.default,
    aten.expand.default, aten.slice.Tensor, aten.select.int, aten.transpose.int,
    aten.permute.default, aten.t.default,
)
# ops reducing or normalizing over the dims given as their second argument
DIM_OPS = (aten._softmax.default, aten._log_softmax.default, aten.any.dim, aten.amax.default,
           aten.amin.default, aten.sum.dim_IntList, aten.mean.dim)
SHAPED_LIKE = (aten.full_like.default, aten.zeros_like.default, aten.ones_like.default)

HEADS_HELP = (
    "Supported for heads of fixed size (num_heads ∝ width): the in-projection split into heads, "
    "per-head logits, masks, softmax and attention products (nn.MultiheadAttention's own "
    "decomposition), and a linear layer on the merged heads."
)


@dataclass(eq=False)
class SplitVec:
    """A vector of ``R^{n/k}`` (the width split into residues mod k) in a torch layout.

    ``shape``: torch shape at the small width; ``axis``: the torch axis holding the head (the
    vector's width coordinate), with index ``(p·heads + h)·Q + q``, ``p < P``, ``q < Q``.
    ``fidx``: for every torch position with the head removed (shape ``shape`` with
    ``shape[axis] = P·Q``), the flat finite index into ``var``. A *pending* SplitVec
    (``var`` None) is ``expr = (fn, bases)``: ``fn(*folded bases)`` gives its folded tensor
    (see :func:`_fold`); it becomes a Nonlin (``var``) when something needs the variable.
    """

    var: Vector | None
    shape: tuple[int, ...]
    axis: int
    P: int
    Q: int
    fidx: torch.Tensor = field(repr=False)
    heads: int = 0
    expr: tuple | None = field(default=None, repr=False)

    @property
    def head_shape(self) -> tuple[int, ...]:
        s = list(self.shape)
        s[self.axis] = self.P * self.Q
        return tuple(s)


# ---------------------------------------------------------------------- layouts

def _structure(codes: torch.Tensor, axis: int, M: int):
    """``(P, Q, fidx)`` if ``codes`` (``f·M + h``) hold every head ``h < M`` along ``axis`` as
    ``(p·M + h)·Q + q`` with ``f`` independent of ``h``; else None."""
    moved = codes.movedim(axis, -1)
    s = moved.shape[-1]
    if s % M:
        return None
    f, h = moved // M, moved % M
    for P in range(1, s // M + 1):
        if (s // M) % P:
            continue
        Q = s // M // P
        hh = h.reshape(*h.shape[:-1], P, M, Q)
        ff = f.reshape(*f.shape[:-1], P, M, Q)
        if (hh == torch.arange(M)[:, None]).all() and (ff == ff[..., :1, :]).all():
            fidx = ff[..., 0, :].reshape(*f.shape[:-1], P * Q).movedim(-1, axis)
            return P, Q, fidx.contiguous()
    return None


def _codes(x: SplitVec) -> torch.Tensor:
    """``f·heads + h`` for every torch element of a committed SplitVec."""
    t = x.fidx.movedim(x.axis, -1)
    t = t.reshape(*t.shape[:-1], x.P, 1, x.Q) * x.heads + torch.arange(x.heads)[:, None]
    return t.reshape(*t.shape[:-3], -1).movedim(-1, x.axis).contiguous()


def _from_codes(low: Lowering, codes: torch.Tensor, axis: int | None, var: Vector, heads: int) -> SplitVec:
    if axis is None:
        raise low.unsupported("a shape operation that removes the heads' dimension. " + HEADS_HELP)
    st = _structure(codes, axis, heads)
    if st is None:
        raise low.unsupported("a shape operation that mixes the heads with each other. " + HEADS_HELP)
    P, Q, fidx = st
    return SplitVec(var, tuple(codes.shape), axis, P, Q, fidx, heads)


def _heads_layout(cc: torch.Tensor, ff: torch.Tensor, k: int, M: int) -> bool:
    """Whether width codes ``cc`` and finite codes ``ff`` (``[..., P, M, Q]``) hold M heads of k
    consecutive coordinates, the head on the M axis and the coordinate within it elsewhere."""
    c0 = cc[..., :1, :]
    if not ((cc == c0 + k * torch.arange(M)[:, None]).all() and (ff == ff[..., :1, :]).all()):
        return False
    alpha0 = c0 % k
    # the coordinate within a head must sit on another axis than the heads (otherwise this is
    # a flatten of the width with finite dims: lower._merge)
    return bool(((c0 // k) % M == 0).all() and (alpha0 == alpha0[..., :1, :, :1]).all())


def split_decode(low: Lowering, codes: torch.Tensor, axis: int | None, N: int, var: Vector):
    """A torch layout of ``var``'s elements (codes ``f·N + c``, ``N`` its width at the small
    capture width) in which the width is split into heads of a fixed size k: the SplitVec of
    the residue-split vector, or None if the layout is not such a split."""
    if axis is None:
        return None
    node = low.node
    dims = low.c.dims.get(node.name) if node is not None else None
    if dims is None:
        return None
    moved = codes.movedim(axis, -1)
    if moved.numel() == 0:
        return None
    s = moved.shape[-1]
    s2 = dims.large[axis]
    w1, w2 = low.c.widths
    # candidate layouts are tried on the first row along the other axes (a batch of rows is
    # costly to test for every candidate), and a candidate that fits it on all rows
    row = moved[(0,) * (moved.dim() - 1)]
    fr, cr = row // N, row % N
    f = c = None
    for PQ in range(1, s // 2 + 1):
        if s % PQ:
            continue
        M = s // PQ  # heads at the small width
        for P in range(1, PQ + 1):
            if PQ % P:
                continue
            Q = PQ // P
            cc, ff = cr.reshape(P, M, Q), fr.reshape(P, M, Q)
            k = int(cc[0, 1, 0] - cc[0, 0, 0])
            if k < 2 or N % (M * k):  # k = 1 is a flatten of the width with finite dims (_merge)
                continue
            blocks = N // (M * k)
            # k must be the same at the large width (heads ∝ width, fixed head size)
            if s2 % PQ or (N * w2 // w1) != blocks * (s2 // PQ) * k:
                continue
            if not _heads_layout(cc, ff, k, M):
                continue
            if f is None:
                f, c = moved // N, moved % N
            if not _heads_layout(c.reshape(*c.shape[:-1], P, M, Q), f.reshape(*f.shape[:-1], P, M, Q),
                                 k, M):
                continue
            block = c // (M * k)
            if not (block == block.reshape(-1)[0]).all():
                raise low.unsupported(
                    "a tensor holding heads of several blocks of a concatenated projection (e.g. "
                    "q, k and v of one in-projection in one tensor); select one block first. " + HEADS_HELP)
            j = int(block.reshape(-1)[0])
            split = split_vector(low, var, j, blocks, k, M)
            alpha = c % k
            h = (c // k) % M
            new = ((f * k + alpha) * M + h).movedim(-1, axis)
            return _from_codes(low, new, axis, split, M)
    return None


# ---------------------------------------------------------------------- rewriting

def split_vector(low: Lowering, var: Vector, block: int, blocks: int, k: int, heads: int) -> Vector:
    """Coordinates ``block·(heads·k) + h·k + α`` of ``var`` as a vector of ``R^{heads}`` (h) with
    finite shape ``var.shape + (k,)`` (α last), by rewriting var's definition."""
    key = (var, block, blocks, k)
    cache = low.splits
    if key in cache:
        return cache[key]
    ratio = heads / low.c.widths[0]
    parts = [_split_part(low, var, block, blocks, k, alpha, ratio) for alpha in range(k)]

    def stack(*us):
        return torch.stack(us, -1)

    stack.__name__ = "heads"
    P = low.program
    if all(p.is_gaussian for p in parts):
        out = P.linear(stack, *parts, label=f"split({var.name}, {k})")
    else:
        out = P.nonlin(stack, *parts, elementwise=False)
    cache[key] = out
    low.split_sources.add(var)
    return out


def _split_part(low: Lowering, var: Vector, block: int, blocks: int, k: int, alpha: int, ratio: float):
    key = (var, block, blocks, k, alpha)
    cache = low.splits
    if key in cache:
        return cache[key]
    P = low.program
    ins = var.instruction
    if isinstance(ins, MatMul) and not ins.transpose:
        W = ins.matrix
        wkey = (W, block, blocks, k, alpha)  # a weight used twice (shared) splits once
        if wkey not in cache:
            cache[wkey] = P.matrix(f"{W.name}_b{block}r{alpha}", variance=W.variance, out_ratio=ratio,
                                   in_ratio=W.in_ratio)
            if W in low.param_of:
                low.param_of[cache[wkey]] = low.param_of[W]
        low.split_sources.add(W)
        out = cache[wkey] @ ins.x
    elif isinstance(ins, InitVector):
        out = P.vector(f"{var.name}_b{block}r{alpha}", shape=var.shape, cov=ins.cov, ratio=ratio)
        if var in low.param_of:
            low.param_of[out] = low.param_of[var]
    elif isinstance(ins, (LinComb, Nonlin)):
        xs = [_split_part(low, x, block, blocks, k, alpha, ratio) for x in ins.xs]
        if isinstance(ins, LinComb):
            out = P.linear(ins.fn, *xs, params=ins.params, label=ins.label)
        else:
            out = P.nonlin(ins.fn, *xs, params=ins.params, elementwise=ins.elementwise)
    else:
        raise low.unsupported(
            f"splitting {var.name} into heads of fixed size {k}: it is not a linear layer's output "
            "or a coordinatewise function of such outputs. " + HEADS_HELP)
    low.split_sources.add(var)
    cache[key] = out
    return out


def check_splits(low: Lowering, out) -> None:
    """The split rewrites a vector (and its weight) as fresh independent pieces: wrong if the
    unsplit vector or weight is also used. Reject when either is live in the program."""
    if not low.split_sources:
        return
    roots = []
    for a in (out.items if isinstance(out, Tuple_) else (out,)):
        if isinstance(a, Vec) and not a.pending:
            roots.append(a.var)
    seen: set = set()
    stack = list(roots)
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v in low.split_sources:
            raise low.unsupported(
                f"{v.name} is split into heads of fixed size and also used unsplit (or its weight is "
                "used elsewhere); the split's independent row blocks would not be the same "
                "coordinates. Use the projection only through its heads.")
        ins = v.instruction
        if ins is not None:
            stack.extend(ins.inputs)


# ---------------------------------------------------------------------- folding

def _fold(u: torch.Tensor, x: SplitVec, rank: int) -> torch.Tensor:
    """Engine values ``[*batch, *F]`` of ``x.var`` → its torch layout with the flattened batch
    where the heads are: axis ``x.axis`` of size ``P·batch·Q``."""
    nb = u.ndim - rank
    U = u.reshape(-1, math.prod(u.shape[nb:]))
    t = U.index_select(1, x.fidx.reshape(-1)).reshape(U.shape[0], *x.fidx.shape)  # [B, *head_shape]
    t = t.movedim(0, x.axis)  # [.., B, P·Q, ..]
    a = x.axis
    t = t.reshape(*t.shape[:a + 1], x.P, x.Q, *t.shape[a + 2:])
    t = t.movedim(a, a + 1)  # [.., P, B, Q, ..]
    return t.reshape(*t.shape[:a], -1, *t.shape[a + 3:])


def _unfold(t: torch.Tensor, axis: int, P: int, Q: int, batch: tuple) -> torch.Tensor:
    t = t.reshape(*t.shape[:axis], P, -1, Q, *t.shape[axis + 1:])
    t = t.movedim(axis + 1, 0)  # [B, .., P, Q, ..]
    t = t.reshape(*t.shape[:axis + 1], P * Q, *t.shape[axis + 3:])
    return t.reshape(*batch, *t.shape[1:])


def _commit(low: Lowering, x: SplitVec) -> SplitVec:
    if x.var is not None:
        return x
    fn, bases = x.expr
    rank = max(len(b.var.shape) for b in bases)
    P, Q, axis = x.P, x.Q, x.axis

    def per_head(*us, _fn=fn, _bases=bases, _rank=rank):
        nb = us[0].ndim - _rank
        batch = tuple(us[0].shape[:nb])
        out = _fn(*[_fold(u, b, _rank) for u, b in zip(us, _bases)])
        return _unfold(out, axis, P, Q, batch)

    per_head.__name__ = "heads_op"
    var = low.program.nonlin(per_head, *[b.var for b in bases], elementwise=False)
    fidx = torch.arange(math.prod(x.head_shape)).reshape(x.head_shape)
    return SplitVec(var, x.shape, x.axis, P, Q, fidx, x.heads)


def _flat(xs):
    for a in xs:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


def _per_head_op(low: Lowering, node, args, kwargs) -> SplitVec:
    """An op acting on every head alike: the folded op on the engine's samples."""
    op = node.target
    out_shape = tuple(low.shape(node))
    axis = low.width_axis(node)
    splits = [a for a in args if isinstance(a, SplitVec)]
    ref = splits[0]
    rank = len(out_shape)
    if axis is None or out_shape[axis] != ref.shape[ref.axis]:
        raise low.unsupported("an operation that reduces over the heads. " + HEADS_HELP)
    for s in splits:
        if (s.axis - len(s.shape) != axis - rank or (s.P, s.Q, s.heads) != (ref.P, ref.Q, ref.heads)
                or s.shape[s.axis] != out_shape[axis]):
            raise low.unsupported("an operation combining tensors whose heads are laid out differently. "
                                  + HEADS_HELP)
    if op in DIM_OPS:
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        in_rank = len(ref.shape)
        if not dims or any(d % in_rank == ref.axis for d in dims):
            raise low.unsupported("a reduction or softmax over the heads' dimension. " + HEADS_HELP)
    if op == aten.bmm.default and not (len(splits) == 2 and ref.axis == 0):
        raise low.unsupported("a batched product of heads with something other than heads. " + HEADS_HELP)
    bases: list[SplitVec] = []
    slots = []
    for a in args:
        if isinstance(a, SplitVec):
            fn, bs = a.expr if a.var is None else (None, (a,))
            slots.append(("vec", (fn, _index(bases, bs))))
        elif isinstance(a, Data):
            t = a.value
            al = t.reshape((1,) * (rank - t.ndim) + tuple(t.shape)) if t.ndim < rank else t
            size = al.shape[axis]
            if size == out_shape[axis]:
                g = al.movedim(axis, -1).reshape(*al.movedim(axis, -1).shape[:-1], ref.P, ref.heads, ref.Q)
                if not (g == g[..., :1, :]).all():
                    raise low.unsupported("data that differs between heads (e.g. a per-head mask). "
                                          + HEADS_HELP)
                slots.append(("data", g[..., 0, :]))
            elif size == 1:
                slots.append(("const", t))
            else:
                raise low.unsupported("data laid out along the heads' dimension. " + HEADS_HELP)
        elif isinstance(a, (Vec, Sca, Param, ParamT)):
            raise low.unsupported("an operation combining heads with other activations or scalars. "
                                  + HEADS_HELP)
        else:
            slots.append(("py", a))

    def fn(*folded, _op=op, _slots=slots, _kw=kwargs, _axis=axis, _P=ref.P, _Q=ref.Q):
        call = []
        nb = None
        for kind, item in _slots:
            if kind == "vec":
                f, idx = item
                v = folded[idx[0]] if f is None else f(*[folded[i] for i in idx])
                nb = v.shape[v.ndim - (len(out_shape) - _axis)] // (_P * _Q) if nb is None else nb
                call.append(v)
        out = []
        it = iter(call)
        for kind, item in _slots:
            if kind == "vec":
                out.append(next(it))
            elif kind == "data":  # [.., P, Q] with the head axis last → broadcast over the samples
                d = item.unsqueeze(-2).expand(*item.shape[:-1], nb, _Q)
                d = d.reshape(*d.shape[:-3], -1).movedim(-1, _axis)
                out.append(d)
            else:
                out.append(item)
        return _op(*out, **_kw)

    fn.__name__ = str(op).split(".")[1] if "." in str(op) else str(op)
    return SplitVec(None, out_shape, axis, ref.P, ref.Q, torch.empty(0), ref.heads, expr=(fn, tuple(bases)))


# ---------------------------------------------------------------------- output projection

def _merged_linear(low: Lowering, node, x: SplitVec, wt, bias):
    """``W`` on merged heads (width axis last, ``index = h·k + α``): ``Σ_α W^{(α)} o_α`` with
    ``W^{(α)}`` the columns ``α::k``, fresh blocks of fan-in ``n/k``."""
    if not isinstance(wt, ParamT):
        raise low.unsupported("a matrix product of heads with something other than a weight. " + HEADS_HELP)
    x = _commit(low, x)
    if x.axis != len(x.shape) - 1 or x.P != 1:
        raise low.unsupported("a linear layer contracting the heads together with other indices. "
                              + HEADS_HELP)
    W = wt.param
    P = low.program
    dims1, dims2 = low.c.dims[W.node].small, low.c.dims[W.node].large
    check_fan_in_scaling(W.name, low.init_variance(W), (dims1[1], dims2[1]))
    sigma2 = low.v(W) * x.heads  # entry variance × the block's fan-in
    rest = x.head_shape[:-1]
    nf = len(x.var.shape)
    gs = []
    for q in range(x.Q):
        g = x.fidx[..., q].reshape(-1)

        def take(u, _g=g, _r=rest, _n=nf):
            b = u.shape[: u.ndim - _n]
            return u.reshape(*b, -1)[..., _g].reshape(*b, *_r)

        take.__name__ = f"head_coord{q}"
        xq = P.linear(take, x.var) if x.var.is_gaussian else P.nonlin(take, x.var, elementwise=False)
        key = f"{W.name}#cols{q}/{x.Q}"
        if key not in low._matrices:
            m = P.matrix(f"{_tp_name(W.name)}_c{q}", variance=sigma2, in_ratio=x.var.ratio)
            low.param_of[m] = W.name
            low._matrices[key] = m
        gs.append(low._matrices[key] @ xq)
    g = P.lincomb([1.0] * len(gs), gs)
    readout = 0 not in W.width_axes
    g = low.add_bias(bias, g, readout)
    out_shape = low.shape(node)
    if readout:
        return Vec(g, out_shape, len(out_shape) - 1, iid_outputs=True)
    return Vec(g, out_shape, low.width_axis(node))


# ---------------------------------------------------------------------- hook

def _hook(low: Lowering, node, args: list, kwargs: dict):
    flat = list(_flat(list(args) + list(kwargs.values())))
    if not any(isinstance(a, SplitVec) for a in flat):
        return NotImplemented
    op = node.target
    x = args[0] if args else None
    if op in MOVE_OPS and isinstance(x, SplitVec):
        x = _commit(low, x)
        codes = op(_codes(x), *args[1:], **kwargs)
        return _from_codes(low, codes, low.width_axis(node), x.var, x.heads)
    if op == aten.mm.default and isinstance(x, SplitVec):
        return _merged_linear(low, node, x, args[1], None)
    if op == aten.addmm.default and isinstance(args[1], SplitVec) and isinstance(args[0], Param):
        return _merged_linear(low, node, args[1], args[2], args[0])
    pointwise = isinstance(op, torch._ops.OpOverload) and torch.Tag.pointwise in op.tags
    if pointwise or op in DIM_OPS or op in SHAPED_LIKE or op == aten.bmm.default:
        return _per_head_op(low, node, args, kwargs)
    raise low.unsupported(f"{op} on heads of fixed size (num_heads ∝ width). " + HEADS_HELP)


APPLY_HOOKS.insert(0, _hook)
FINALIZERS.append(check_splits)
