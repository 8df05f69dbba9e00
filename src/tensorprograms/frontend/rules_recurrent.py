"""Lowering rules for recurrent models: ``nn.RNN``/``nn.GRU``/``nn.LSTM`` and hand-written loops.

``torch.export`` (after ``run_decompositions``) unrolls the fused recurrent ops into their
cell equations over time: one input projection for all time steps (``addmm`` of the
flattened sequence, or ``bmm`` against the expanded ``W_ih.T`` when ``batch_first``), then
per step an ``addmm`` with ``W_hh``, a ``split_with_sizes`` of the stacked gate
pre-activations, pointwise gates, and a ``cat`` over time. Hand-written loops over
``nn.Linear``/``nn.RNNCell``/``nn.GRUCell``/``nn.LSTMCell`` give the same ops. So one
mechanism lowers all of them; nothing here knows which architecture it is looking at:

* **Row blocks.** A stacked gate matrix ``W`` of shape ``(Σ_j n_j) × fan_in`` has iid
  entries, so its row blocks ``W_j`` are independent matrices with the same per-entry
  variance (σ_j² = Var(W_ab)·fan_in). ``split_with_sizes`` along the width of a value
  that is linear in such products (``W x + b``, sums of them, shape ops of them) is
  lowered by tracing the graph back to its linear layers and rebuilding each block from
  the row blocks ``W_j x + b_j``. Weight sharing across time steps is automatic: the
  block matrix of a parameter is created once and reused at every step.
* **Constant width-sized data.** The initial states ``h_0 = c_0 = 0`` are width-sized
  constants; ``W h_0 = 0`` and ``0 · x = 0`` stay data, ``x ± 0 = x`` stays the vector.
* **Finite-index ops** on activations (``cat``/``flip``/``split`` over time) are gathers:
  LinCombs of G-vars or Nonlins of H-vars.

Gates (``σ(a)·tanh(b)``, GRU's ``(1−z)·n + z·h``) are fused pointwise chains, i.e.
Nonlins; the master theorem evaluates their expectations by closed form where one
exists, else Gauss–Hermite quadrature (≤ 3 Gaussian dimensions), else Monte Carlo with a
standard error (``ProgramLimit.report()``).
"""

from __future__ import annotations

import math

import torch
from torch import fx

from ..program.variables import Vector
from . import lower
from .lower import Lowering, _concrete, _tp_name, check_fan_in_scaling, pointwise, rule
from .values import Concat, Data, NodeView, Param, ParamT, ParamTB, Tuple_, Vec

aten = torch.ops.aten

# ops that may receive a width concatenation (bidirectional outputs) besides linear layers
lower.CONCAT_OPS.update({aten.bmm.default, aten.select.int, aten.slice.Tensor, aten.view.default,
                         aten._unsafe_view.default, aten.squeeze.dims, aten.squeeze.dim,
                         aten.unsqueeze.default, aten.permute.default, aten.mean.dim,
                         aten.clone.default, aten.expand.default, aten.flip.default, aten.cat.default})


# ---------------------------------------------------------------------- helpers

def _is_zero(a) -> bool:
    return isinstance(a, Data) and not bool(a.value.any())


def _width_data(low: Lowering, node_arg) -> bool:
    """Whether a graph argument is data with a width-sized dim (e.g. an initial state)."""
    return isinstance(node_arg, fx.Node) and low.width_axis(node_arg) is not None


def _row_key(p: Param, start: int, stop: int) -> str:
    return f"{p.name}#rows{start}:{stop}"


def _block_columns(low: Lowering, W: Param, start: int, stop: int):
    """Rows ``start:stop`` of an input-layer weight (finite fan-in d): an initial vector (d,)."""
    key = _row_key(W, start, stop)
    if key not in low._columns:
        v = low.input_variance(
            W, "PyTorch's default RNN init (U(±1/√hidden)) does this; initialize input weights "
            "with variance σ²/input_size, e.g. nn.init.normal_(w, std=σ/sqrt(input_size)).")
        low._columns[key] = low.new_vector(W.name, f"{_tp_name(W.name)}_r{start}_{stop}",
                                           shape=(W.shape[1],), variance=v)
    return low._columns[key]


def _block_bias(low: Lowering, p: Param, start: int, stop: int):
    """Rows ``start:stop`` of a width-sized bias: an initial vector, or a zero one (with its
    NTK ghost) where the variance vanishes with width."""
    key = _row_key(p, start, stop)
    if key not in low._biases:
        full = low.bias(p)  # checks mean and scaling; None when the variance vanishes
        low._biases[key] = _vanishing(low, p, key) if full is None else low.new_vector(
            p.name, f"{_tp_name(p.name)}_r{start}_{stop}", variance=low.v(p))
    return low._biases[key]


def _vanishing(low: Lowering, p: Param, key: str) -> Vector:
    """A bias whose variance vanishes with width (PyTorch's default behind a width fan-in):
    a zero vector in the forward pass, kept as a variable so its gradient has a target —
    the NTK's ghost for it (``Lowering.ghost``), one per block of rows, since blocks are
    different entries of the parameter."""
    z = low.new_vector(p.name, f"{_tp_name(key)}_0", cov=torch.zeros(()))
    if key not in low._ghost_prims:
        low._ghost_prims[key] = low.new_vector(p.name, f"{_tp_name(key)}~", variance=1.0)
    prim = low._ghost_prims[key]
    use = low.program.linear(lower._broadcaster(z.shape), prim, label=f"∂/∂{key}")
    low.ghosts.append((prim, use, z, None))
    return z


def _broadcast(low: Lowering, b: Vector, fshape: tuple[int, ...]) -> Vector:
    """An initial vector of finite shape () broadcast to ``fshape`` (a bias alone)."""
    def bcast(u, _f=fshape):
        return u.reshape(*u.shape, *[1] * len(_f)).expand(*u.shape, *_f)

    bcast.__name__ = "broadcast"
    return low.program.linear(bcast, b, label=f"broadcast({b.name})")


def _gather(low: Lowering, in_shape, in_axis, out, out_axis, start, size):
    """The finite-index gather that maps block ``start:start+size`` of the input to the same
    block of ``out`` (``out`` = the shape op applied to an index tensor). None if the op
    mixes width and finite indices."""
    ob = out.narrow(out_axis, start, size).movedim(out_axis, 0)
    src = torch.stack(torch.unravel_index(ob.reshape(size, -1), tuple(in_shape)), -1)
    if not (src[..., in_axis] == start + torch.arange(size)[:, None]).all():
        return None
    finite = torch.cat([src[..., :in_axis], src[..., in_axis + 1:]], -1)
    if not (finite == finite[:1]).all():
        return None
    fshape = tuple(in_shape[:in_axis]) + tuple(in_shape[in_axis + 1:])
    strides = torch.tensor([math.prod(fshape[i + 1:]) for i in range(len(fshape))], dtype=torch.long)
    return (finite[0] * strides).sum(-1) if fshape else torch.zeros(finite.shape[1], dtype=torch.long)


def _apply_gather(low: Lowering, v: Vector, gather: torch.Tensor, out_f: tuple[int, ...]) -> Vector:
    nf = len(v.shape)
    if tuple(v.shape) == tuple(out_f) and torch.equal(gather, torch.arange(len(gather))):
        return v

    def move(u, _g=gather, _f=out_f, _n=nf):
        batch = u.shape[: u.ndim - _n]
        return u.reshape(*batch, -1)[..., _g].reshape(*batch, *_f)

    move.__name__ = "gather"
    return low.program.linear(move, v, label=f"gather({v.name})")


SHAPE_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default,
             aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.clone.default,
             aten.alias.default, aten.expand.default, aten.slice.Tensor, aten.select.int,
             aten.permute.default, aten.flip.default, aten.transpose.int}


def _row_blocks(low: Lowering, node: fx.Node, bounds: list[tuple[int, int]]) -> list[Vector | None]:
    """Blocks of rows ``bounds`` (along the width axis) of a value that is linear in
    products ``W x`` of stacked weights: each block rebuilt from the weights' row blocks.
    None stands for a block that is exactly zero (``W h_0`` with ``h_0 = 0``, no bias)."""
    P = low.program
    val = low.env[node.name]
    fshape = tuple(s for i, s in enumerate(low.shape(node)) if i != low.width_axis(node))
    op = node.target
    if op in (aten.addmm.default, aten.mm.default, aten.bmm.default):
        if op == aten.addmm.default:
            bias_n, x_n, w_n = node.args[:3]
        else:
            (x_n, w_n), bias_n = node.args[:2], None
        wt = low.env[w_n.name]
        if not isinstance(wt, ParamT):
            raise low.unsupported("splitting the output of a product with a non-weight operand")
        W, x = wt.param, low.env[x_n.name]
        out = []
        for s, e in bounds:
            term = None
            if isinstance(x, Data):
                if _is_zero(x):
                    term = None
                elif 1 in W.width_axes:
                    raise low.unsupported("a width-sized constant other than zero multiplies a weight")
                else:
                    cols = _block_columns(low, W, s, e)
                    X = x.value

                    def proj(u, _X=X):
                        y = u @ _X.reshape(-1, _X.shape[-1]).T
                        return y.reshape(*u.shape[:-1], *_X.shape[:-1])

                    proj.__name__ = "input_projection"
                    term = P.linear(proj, cols, label=f"{cols.name} · x")
            else:
                dims1, dims2 = low.c.dims[W.node].small, low.c.dims[W.node].large
                parts = x.parts if isinstance(x, Concat) else [x]
                sizes = x.sizes if isinstance(x, Concat) else [dims1[1]]
                gs = []
                for i, (part, size) in enumerate(zip(parts, sizes)):
                    key = _row_key(W, s, e) + f"#block{i}"
                    if key not in low._matrices:
                        check_fan_in_scaling(W.name, low.init_variance(W), (dims1[1], dims2[1]))
                        low._matrices[key] = low.new_matrix(
                            W.name, f"{_tp_name(W.name)}_r{s}_{e}_b{i}", low.v(W) * size)
                    gs.append(low._matrices[key] @ part.var)
                term = gs[0] if len(gs) == 1 else P.lincomb([1.0] * len(gs), gs)
            b = _block_bias(low, low.env[bias_n.name], s, e) if bias_n is not None else None
            out.append(_sum(low, [term, b], [1.0, 1.0], fshape))
        return out
    if op in (aten.add.Tensor, aten.sub.Tensor):
        alpha = float(node.kwargs.get("alpha", 1.0))
        sign = alpha if op == aten.add.Tensor else -alpha
        per_operand = []
        for a in node.args[:2]:
            v = low.env[a.name] if isinstance(a, fx.Node) else a
            if isinstance(v, Param) and len(v.shape) == 1:
                per_operand.append([_block_bias(low, v, s, e) for s, e in bounds])
            elif _is_zero(v):
                per_operand.append([None] * len(bounds))
            elif isinstance(v, Vec) and isinstance(a, fx.Node):
                inner = _row_blocks(low, a, bounds)
                if tuple(v.shape) != low.shape(node):  # broadcast (leading singleton dims)
                    in_shape = low.shape(a)
                    idx = torch.arange(math.prod(in_shape)).reshape(in_shape).expand(low.shape(node))
                    gathers = [_gather(low, in_shape, low.width_axis(a), idx, low.width_axis(node), s, e - s)
                               for s, e in bounds]
                    inner = [None if u is None else _apply_gather(low, u, g, fshape)
                             for u, g in zip(inner, gathers)]
                per_operand.append(inner)
            else:
                raise low.unsupported("splitting along the width a sum that is not of linear layers")
        return [_sum(low, [x, y], [1.0, sign], fshape) for x, y in zip(*per_operand)]
    if op in SHAPE_OPS and isinstance(val, Vec):
        src = node.args[0]
        in_shape, in_axis = low.shape(src), low.width_axis(src)
        index = torch.arange(math.prod(in_shape)).reshape(in_shape)
        idx_out = op(index, *_concrete(list(node.args[1:])), **node.kwargs)
        out_axis = low.width_axis(node)
        gathers = [_gather(low, in_shape, in_axis, idx_out, out_axis, s, e - s) for s, e in bounds]
        if any(g is None for g in gathers):
            raise low.unsupported("a shape operation that mixes the width dimension with finite ones")
        inner = _row_blocks(low, src, bounds)
        return [None if v is None else _apply_gather(low, v, g, fshape) for v, g in zip(inner, gathers)]
    raise low.unsupported(
        f"splitting along the width a value computed by {op}: only values linear in weights "
        "(W x + b, sums and reshapes of them, e.g. stacked gate pre-activations) can be split."
    )


def _sum(low: Lowering, vs, coeffs, fshape) -> Vector | None:
    keep = [(c, v) for c, v in zip(coeffs, vs) if v is not None]
    if not keep:
        return None
    vs = [v if tuple(v.shape) == tuple(fshape) else _broadcast(low, v, fshape) for _, v in keep]
    if len(vs) == 1 and keep[0][0] == 1.0:
        return vs[0]
    return low.program.lincomb([c for c, _ in keep], vs)


# ---------------------------------------------------------------------- rules

@rule(aten.split_with_sizes.default, aten.split.Tensor)
def _split(low: Lowering, node, args, dim=0):
    """Split along the width: row blocks of stacked gate weights; along finite dims: gathers."""
    x, sizes = args[0], args[1]
    dim = args[2] if len(args) > 2 else dim
    if not isinstance(x, Vec) or x.iid_outputs:
        raise low.unsupported("splitting something other than a hidden activation")
    dim %= len(x.shape)
    total = x.shape[dim]
    if isinstance(sizes, int):
        sizes = [min(sizes, total - s) for s in range(0, total, sizes)]
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    shapes = [tuple(v.shape) for v in node.meta["val"]]
    if dim == x.axis:
        blocks = _row_blocks(low, node.args[0], [(s, s + n) for s, n in zip(starts, sizes)])
        return Tuple_(tuple(
            Data(torch.zeros(shape, dtype=torch.float64)) if b is None else Vec(b, shape, x.axis)
            for b, shape in zip(blocks, shapes)))
    return Tuple_(tuple(
        lower._reshape_vec(low, node, x, lambda t, _s=s, _n=n: t.narrow(dim, _s, _n))
        for s, n in zip(starts, sizes)))


def _zero_or_bias(low: Lowering, node, x: Data, W: Param, bias: Param | None):
    """``W h + b`` with a width-sized constant ``h = 0`` (an initial state): the bias alone."""
    if _is_zero(x):
        out_shape = low.shape(node)
        b = low.bias(bias) if bias is not None else None
        if b is None and bias is not None:
            b = _block_bias(low, bias, 0, bias.shape[0])  # vanishing: zero, with its gradient
        if b is None:
            return Data(torch.zeros(out_shape, dtype=torch.float64))
        axis = low.width_axis(node)
        fshape = out_shape[:axis] + out_shape[axis + 1:]
        return Vec(_broadcast(low, b, fshape), out_shape, axis)
    raise low.unsupported(
        f"{W.name} multiplies a width-sized constant that is not zero (e.g. an initial hidden "
        "state passed in); start recurrences from zeros or from a layer's output."
    )


_addmm0, _mm0 = lower.RULES[aten.addmm.default], lower.RULES[aten.mm.default]


@rule(aten.addmm.default)
def _addmm(low: Lowering, node, args, beta=1, alpha=1):
    """Linear layer with bias: input layer (finite fan-in), MatMul (hidden) or readout."""
    bias, x, wt = args
    if isinstance(x, Data) and isinstance(wt, ParamT) and 1 in wt.param.width_axes:
        return _zero_or_bias(low, node, x, wt.param, bias)
    return _addmm0(low, node, args, beta=beta, alpha=alpha)


@rule(aten.mm.default)
def _mm(low: Lowering, node, args):
    """Linear layer without bias: input layer, MatMul or readout."""
    x, wt = args
    if isinstance(x, Data) and isinstance(wt, ParamT) and 1 in wt.param.width_axes:
        return _zero_or_bias(low, node, x, wt.param, None)
    return _mm0(low, node, args)


_bmm0 = lower.RULES.get(aten.bmm.default)  # attention products (rules_attention)


@rule(aten.bmm.default)
def _bmm(low: Lowering, node, args):
    """``x @ W.T`` batched over time (recurrent input projections); else attention (q·kᵀ, a·v)."""
    x, wt = args
    if not isinstance(wt, ParamTB):
        if _bmm0 is not None:
            return _bmm0(low, node, args)
        raise low.unsupported("a batched product of activations (only x @ W.T with a weight W)")
    W = wt.param
    if isinstance(x, Data):
        if 0 not in W.width_axes or 1 in W.width_axes:
            if 1 in W.width_axes:
                return _zero_or_bias(low, node, x, W, None)
            raise low.unsupported(f"{W.name} maps finite inputs to a finite output")
        cols = low.columns(W)
        X = x.value

        def proj(u, _X=X):
            y = u @ _X.reshape(-1, _X.shape[-1]).T
            return y.reshape(*u.shape[:-1], *_X.shape[:-1])

        proj.__name__ = "input_projection"
        h = low.program.linear(proj, cols, label=f"{cols.name} · x")
        return Vec(h, low.shape(node), low.width_axis(node))
    return lower._linear_layer(low, node, x, ParamT(W), None)


_shape_op0 = lower.RULES[aten.view.default]


@rule(aten.expand.default, aten.view.default, aten._unsafe_view.default)
def _param_shape_op(low: Lowering, node, args, **kwargs):
    """Shape op on finite dims (a gather; flatten before a readout); ``W.T`` expanded for ``bmm``."""
    x = args[0]
    if isinstance(x, ParamT):
        W = x.param
        shape = low.shape(node)
        if tuple(shape[-2:]) != (W.shape[1], W.shape[0]):
            raise low.unsupported(f"a reshape of the weight {W.name}")
        return ParamTB(W)
    if isinstance(x, Concat):
        return _concat_parts(low, node, x, args, kwargs)
    return _shape_op0(low, node, args, **kwargs)


@rule(aten.flip.default)
def _flip(low: Lowering, node, args):
    """Reversal of finite dims (time in a bidirectional RNN): a gather."""
    x, dims = args
    if isinstance(x, Concat):
        return _concat_parts(low, node, x, args, {})
    if not isinstance(x, Vec):
        raise low.unsupported("flip of something other than an activation")
    return lower._reshape_vec(low, node, x, lambda t: t.flip(dims))


def _concat_parts(low: Lowering, node, x: Concat, args, kwargs):
    """A shape op on a width concatenation (bidirectional outputs): applied to each block,
    which must keep the concatenation axis."""
    parts = []
    out_shape = low.shape(node)
    axis = low.width_axis(node)
    for part in x.parts:
        pnode_shape = list(out_shape)
        pnode_shape[axis] = part.shape[part.axis]
        index = torch.arange(math.prod(part.shape)).reshape(part.shape)
        rest = _concrete(list(args[1:]))
        if node.target in (aten.view.default, aten._unsafe_view.default, aten.expand.default):
            rest = [pnode_shape] + rest[1:]
        out = node.target(index, *rest, **kwargs)
        if tuple(out.shape) != tuple(pnode_shape):
            raise low.unsupported("a shape operation that mixes the width dimension with finite ones")
        view = NodeView(node, tuple(pnode_shape), axis)
        parts.append(lower._reshape_vec(low, view, part, lambda t, _r=rest: node.target(t, *_r, **kwargs)))
    return Concat(parts, [p.shape[p.axis] for p in parts], out_shape, axis)


for _op in (aten.select.int, aten.slice.Tensor, aten.squeeze.dims, aten.squeeze.dim,
            aten.unsqueeze.default, aten.clone.default, aten.permute.default):
    _prev = lower.RULES[_op]

    def _concat_or(low: Lowering, node, args, _prev=_prev, **kwargs):
        if isinstance(args[0], Concat):
            return _concat_parts(low, node, args[0], args, kwargs)
        return _prev(low, node, args, **kwargs)

    _concat_or.__doc__ = _prev.__doc__
    lower.RULES[_op] = _concat_or


_mean0 = lower.RULES[aten.mean.dim]


@rule(aten.mean.dim)
def _mean(low: Lowering, node, args, keepdim=False, dtype=None):
    """Mean over the width: a Moment (a scalar); over finite dims: global average pooling."""
    x = args[0]
    if isinstance(x, Concat):
        dims = [d % len(x.shape) for d in args[1]]
        if x.axis in dims:
            raise low.unsupported("a mean over a width concatenation")
        parts = []
        for p in x.parts:
            shape = list(low.shape(node))
            shape[low.width_axis(node)] = p.shape[p.axis]
            parts.append(_mean0(low, NodeView(node, tuple(shape), low.width_axis(node)), [p, *args[1:]],
                                keepdim=keepdim))
        return Concat(parts, x.sizes, low.shape(node), low.width_axis(node))
    return _mean0(low, node, args, keepdim=keepdim, dtype=dtype)


_cat0 = lower.RULES[aten.cat.default]


@rule(aten.cat.default)
def _cat(low: Lowering, node, args, dim=0):
    """Concatenation along the width (blocks of a linear layer's input) or finite dims (time).

    Along finite dims: a LinComb of G-vars, else a linear Nonlin mixing finite indices."""
    tensors = args[0]
    dim = args[1] if len(args) > 1 else dim
    rank = len(low.shape(node))
    axis = low.width_axis(node)
    if axis is None or dim % rank == axis:
        return _cat0(low, node, args, dim=dim)
    if any(isinstance(t, Concat) for t in tensors):
        if not all(isinstance(t, Concat) and len(t.parts) == len(tensors[0].parts) for t in tensors):
            raise low.unsupported("concatenation of width concatenations with other tensors")
        parts = []
        for i in range(len(tensors[0].parts)):
            shape = list(low.shape(node))
            shape[axis] = tensors[0].parts[i].shape[axis]
            parts.append(_cat(low, NodeView(node, tuple(shape), axis), [[t.parts[i] for t in tensors], dim]))
        return Concat(parts, tensors[0].sizes, low.shape(node), axis)
    if not all(isinstance(t, (Vec, Data)) for t in tensors):
        raise low.unsupported("concatenation of activations with other tensors")
    d = dim % rank
    fdim = d if d < axis else d - 1
    vecs = [t for t in tensors if isinstance(t, Vec)]
    if any(v.iid_outputs for v in vecs):
        raise low.unsupported("concatenation of model outputs")
    slots, vars_ = [], []
    for t in tensors:
        if isinstance(t, Vec):
            slots.append(("v", len(vars_)))
            vars_.append(t.var)
        else:
            if not _is_zero(t):
                raise low.unsupported("concatenation of activations with nonzero data")
            shp = list(t.value.shape)
            del shp[axis]
            slots.append(("z", tuple(shp)))

    def cat(*us, _slots=slots, _fdim=fdim):
        nb = us[0].ndim - len(vars_[0].shape)
        pieces = []
        for kind, item in _slots:
            if kind == "v":
                pieces.append(us[item])
            else:
                pieces.append(torch.zeros(*us[0].shape[:nb], *item, dtype=us[0].dtype))
        return torch.cat(pieces, nb + _fdim)

    cat.__name__ = "cat"
    P = low.program
    if all(v.is_gaussian for v in vars_):
        out = P.linear(cat, *vars_, label="cat")
    else:
        out = P.nonlin(cat, *vars_, elementwise=False)
    return Vec(out, low.shape(node), axis)


def _constant_width(low: Lowering, node, args):
    """Replace width-sized constant data (initial states) by its value along the width
    (size 1 there), so pointwise rules see a broadcastable constant."""
    out = []
    for a, na in zip(args, node.args):
        if isinstance(a, Data) and _width_data(low, na):
            ax = low.width_axis(na)
            first = a.value.narrow(ax, 0, 1)
            if not bool((a.value == first).all()):
                raise low.unsupported("combines an activation with width-sized data varying along the width")
            a = Data(first)
        out.append(a)
    return out


@rule(aten.add.Tensor, aten.sub.Tensor)
def _add(low: Lowering, node, args, **kwargs):
    """Addition: a bias (1-D width parameter) add, ``x ± 0 = x``, or a pointwise op."""
    a, b = args[0], args[1]
    alpha = kwargs.get("alpha", 1)
    shape = low.shape(node) if node.name in low.c.dims else None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and not val.is_floating_point() and isinstance(a, Param):
        # a counter buffer (BatchNorm's num_batches_tracked += 1): only feeds a buffer update
        return Data(torch.zeros(tuple(val.shape), dtype=val.dtype))
    if isinstance(a, Vec) and isinstance(b, Param) and len(b.shape) == 1 and b.width_axes == (0,) \
            and a.axis == len(a.shape) - 1 and tuple(a.shape) == shape:
        if float(alpha) != 1.0 or node.target != aten.add.Tensor:
            raise low.unsupported(f"subtracts or scales the bias {b.name}")
        if not a.var.is_gaussian:
            raise low.unsupported(f"adds the bias {b.name} to a nonlinear function of activations")
        return Vec(low.add_bias(b, a.var), shape, a.axis)
    if isinstance(a, Vec) and _is_zero(b):
        return _broadcast_to(low, node, a, shape)
    if node.target == aten.add.Tensor and isinstance(b, Vec) and _is_zero(a) and float(alpha) == 1.0:
        return _broadcast_to(low, node, b, shape)
    return pointwise(low, node, _constant_width(low, node, args), kwargs)


def _broadcast_to(low: Lowering, node, v: Vec, shape) -> Vec:
    """``v + 0`` where the zero has more (leading) dims: ``v`` expanded to the result's shape."""
    if tuple(v.shape) == tuple(shape):
        return v
    return lower._reshape_vec(low, node, v, lambda t: t.expand(shape))


@rule(aten.mul.Tensor)
def _mul(low: Lowering, node, args, **kwargs):
    """Multiplication: ``x · 0 = 0`` (an initial cell state), else a pointwise op."""
    if any(_is_zero(a) for a in args[:2]) and node.name in low.c.dims:
        return Data(torch.zeros(low.shape(node), dtype=torch.float64))
    return pointwise(low, node, _constant_width(low, node, args), kwargs)

