"""Attention: width contractions between two activations, deterministic attention weights,
and heads.

With logits ``q·k / d`` (d = head dim ∝ width) the contraction ``(1/d) Σ_α q_α k_α`` is a
Moment: it converges to ``E[Z^q Z^k]``, a deterministic scalar per (query, key) pair. Any
function of such scalars (scaling, masks, softmax over the finite key positions) is a
deterministic scalar expression (:class:`Sca`), and the attention output ``Σ_j a_ij v_j``
is a LinComb whose coefficients are those scalars (NETSOR+): Gaussian in the limit.

Heads split the width into H blocks of d = n/H coordinates. The logits of every head
converge to the same Moment (its block's coordinates are exchangeable with the whole
vector's), so every head has the same limiting attention weights and the concatenated
head outputs are the attention applied to the full vector. Inside the graph a head-split
activation is a :class:`HeadVec`: the full-width TP vector plus, for each torch position,
its finite index and head.

Scalings are read from the two captured widths: a constant that changes with width
(``1/d``, ``1/√d``) carries a power of the width, and a width contraction adds one. A
value whose power is not zero when it is used (1/√d logits: power 1/2) has no
deterministic limit; :func:`check_width_powers` raises before lowering, naming the op and
the source line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from ..errors import UnsupportedOperation
from ..program import functions as F
from ..program.variables import Vector
from .capture import source_line
from .lower import APPLY_HOOKS, BUFFER_CONSUMERS, CHECKS, Lowering, _gather_vec, _scalar_expr, rule
from .rules_heads import MOVE_OPS, split_decode
from .values import Concat, Data, Merged, Param, ParamT, ParamTB, Sca, Tuple_, Vec

aten = torch.ops.aten

SHAPE_OPS = MOVE_OPS  # ops that only move elements (rules_heads applies them to element codes)
SCALE_OPS = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)


@dataclass
class HeadVec:
    """A width-sized activation whose width is split into heads in the torch layout.

    ``var`` is the full-width TP vector (finite shape F); ``shape`` the torch shape at the
    small width, ``axis`` the within-head width axis (size d = N/heads, N the full width).
    ``f`` and ``head`` (shape = ``shape`` without ``axis``) give, for every other torch
    position, the flat finite index into ``var`` and the head: the torch element at
    ``(rest, α)`` is coordinate ``head·d + α`` of ``var[f]``.
    """

    var: Vector
    shape: tuple[int, ...]
    axis: int
    heads: int
    f: torch.Tensor
    head: torch.Tensor


# ---------------------------------------------------------------------- index codes

def _codes(x: Vec | HeadVec) -> tuple[torch.Tensor, int]:
    """Every torch element of ``x`` as ``f·N + c`` (finite index f, full-width coordinate c)."""
    if isinstance(x, HeadVec):
        d = x.shape[x.axis]
        N = d * x.heads
        alpha = torch.arange(d)
        base = (x.f * N + x.head * d).unsqueeze(-1) + alpha  # [*rest, d]
        return base.movedim(-1, x.axis).contiguous(), N
    N = x.shape[x.axis]
    f = torch.arange(math.prod(x.finite_shape)).reshape(x.finite_shape)
    code = f.unsqueeze(-1) * N + torch.arange(N)
    return code.movedim(-1, x.axis).contiguous(), N


def _decode(low: Lowering, codes: torch.Tensor, axis: int, N: int, var: Vector, iid=False):
    """A torch layout of ``var``'s elements back to a Vec (full width) or a HeadVec."""
    moved = codes.movedim(axis, -1)
    m = moved.shape[-1]
    f, c = moved // N, moved % N
    base = c[..., :1]
    if not ((f == f[..., :1]).all() and (c == base + torch.arange(m)).all() and N % m == 0
            and (base % m == 0).all()):
        split = split_decode(low, codes, axis, N, var)  # heads of fixed size (num_heads ∝ width)
        if split is None:
            raise low.unsupported("a shape operation that mixes the width dimension with finite ones")
        return split
    f0, out_shape = f[..., 0], tuple(codes.shape)
    if m < N:
        return HeadVec(var, out_shape, axis, N // m, f0, (base[..., 0] // m))
    rest = tuple(f0.shape)
    if rest == tuple(var.shape) and torch.equal(f0.reshape(-1), torch.arange(f0.numel())):
        return Vec(var, out_shape, axis, iid)
    whole = Vec(var, (N, *var.shape), 0, iid)
    return _gather_vec(low, whole, f0.reshape(-1), rest, out_shape, axis, "heads")


def _index(x: Vec | HeadVec) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(f, head, d) over the positions other than the width axis."""
    if isinstance(x, HeadVec):
        return x.f, x.head, x.shape[x.axis]
    f = torch.arange(math.prod(x.finite_shape)).reshape(x.finite_shape)
    return f, torch.zeros_like(f), x.shape[x.axis]


# ---------------------------------------------------------------------- hooks

def _abstract(a) -> bool:
    return isinstance(a, (Vec, HeadVec, Param, ParamT, Tuple_, Merged, Concat))


def _flat(xs):
    for a in xs:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


def _number(a) -> float | None:
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a)
    if isinstance(a, Data) and a.value.numel() == 1:
        return float(a.value)
    return None


def _buffers(low: Lowering) -> set[str]:
    return {name for name, _ in low.c.modules[0].named_buffers()}


def _hook(low: Lowering, node: fx.Node, args: list, kwargs: dict):
    """Ops on deterministic scalars (logits, masks, softmax) and on head-split activations."""
    flat = list(_flat(list(args) + list(kwargs.values())))
    op = node.target
    scalars_only = any(isinstance(a, Sca) for a in flat) and not any(_abstract(a) for a in flat)
    if scalars_only and op != aten.bmm.default:
        return _scalar_expr(low, node, args, kwargs)  # any op of deterministic scalars
    x = args[0] if args else None
    params = [a for a in flat if isinstance(a, Param) and a.width_axes]
    # rules declared with consumes_buffers (batch norm's running statistics) read them
    buffers = [a for a in params if a.name in _buffers(low)] if params and op not in BUFFER_CONSUMERS else []
    if buffers and any(isinstance(a, (Vec, HeadVec)) for a in flat):
        raise low.unsupported(
            f"the width-sized buffer {buffers[0].name} is combined with an activation. A "
            "deterministic width-sized tensor has a limit only if the law of its coordinates is "
            "known; the one recognized is the standard sinusoidal positional encoding "
            "(sin/cos of p·10000^(-2i/d), interleaved or in two halves; "
            "tensorprograms.frontend.rules_positional.sinusoidal_table), checked against the "
            "formula at both capture widths. Use that table or a learned positional embedding "
            "(nn.Embedding over positions)."
        )
    if op in SHAPE_OPS and isinstance(x, ParamT) and op != aten.permute.default:
        new = tuple(low.shape(node))
        if new[-2:] != tuple(low.shape(node.args[0]) if isinstance(node.args[0], fx.Node) else ())[-2:]:
            raise low.unsupported("a shape operation on a weight")
        return ParamTB(x.param)
    if op == aten.add.Tensor and len(args) == 2 and isinstance(x, Vec) and isinstance(args[1], Param) \
            and len(args[1].shape) == 1 and not kwargs and not x.pending and x.var.is_gaussian:
        b = low.bias(args[1])  # the bias of a linear layer exported as bmm + add
        if b is None:
            return x
        return Vec(low.program.lincomb([1.0, 1.0], [x.var, b]), low.shape(node), x.axis, x.iid_outputs)
    if op in SHAPE_OPS and isinstance(x, Vec) and not x.iid_outputs and not isinstance(x, HeadVec):
        axis = low.width_axis(node)
        if axis is not None and low.shape(node)[axis] < x.shape[x.axis]:
            return _shape(low, node, args, kwargs)  # the width splits into heads
        if axis is not None and low.shape(node)[axis] > x.shape[x.axis] and op != aten.expand.default:
            # heads of fixed size merged with a batch of ≥ k rows ([T, B, n] → [T, B·n/k, k]);
            # otherwise a flatten of the width with finite dims (the generic rule)
            codes, N = _codes(x)
            split = split_decode(low, node.target(codes, *args[1:], **kwargs), axis, N, x.var)
            return NotImplemented if split is None else split
        return NotImplemented
    if not any(isinstance(a, HeadVec) for a in flat):
        if op in (aten.mul.Scalar, aten.div.Scalar) and isinstance(x, Vec) and not x.pending \
                and x.var.is_gaussian and _number(args[1]) is not None and not kwargs:
            c = _number(args[1])
            c = c if op == aten.mul.Scalar else 1.0 / c
            return Vec(low.program.lincomb([c], [x.var]), low.shape(node), low.width_axis(node),
                       x.iid_outputs)
        return NotImplemented
    if op in SHAPE_OPS:
        return _shape(low, node, args, kwargs)
    if op in SCALE_OPS and isinstance(x, HeadVec) and len(args) == 2 and _number(args[1]) is not None:
        c = _number(args[1])
        c = c if op in (aten.mul.Tensor, aten.mul.Scalar) else 1.0 / c
        P = low.program
        v = P.lincomb([c], [x.var]) if x.var.is_gaussian else P.nonlin(lambda u, _c=c: _c * u, x.var)
        return HeadVec(v, x.shape, x.axis, x.heads, x.f, x.head)
    if op == aten.bmm.default:
        return _bmm(low, node, args)
    raise low.unsupported(
        "an operation on a head-split activation (per-head views of the width); supported are "
        "shape operations, scaling by a constant and the attention products (bmm)."
    )


def _shape(low: Lowering, node, args, kwargs):
    x = args[0]
    codes, N = _codes(x)
    out = node.target(codes, *args[1:], **kwargs)
    axis = low.width_axis(node)
    if axis is None:
        raise low.unsupported("a shape operation that removes the width dimension")
    return _decode(low, out, axis, N, x.var)


# ---------------------------------------------------------------------- bmm

@rule(aten.bmm.default)
def _bmm(low: Lowering, node, args):
    """Attention: q·kᵀ over the width is a Moment (logits); weights·values a Scalar-weighted LinComb."""
    a, b = args
    if isinstance(a, (Vec, HeadVec)) and isinstance(b, (Vec, HeadVec)):
        return _logits(low, node, a, b)
    if isinstance(a, Sca) and isinstance(b, (Vec, HeadVec)):
        return _weighted(low, node, a, b)
    raise low.unsupported(
        "a batched matrix product other than attention (activations · activationsᵀ over the "
        "width, or deterministic attention weights · values)."
    )


def _logits(low: Lowering, node, a, b) -> Sca:
    if getattr(a, "iid_outputs", False) or getattr(b, "iid_outputs", False):
        raise low.unsupported("a product involving the model's outputs")
    if a.axis != 2 or b.axis != 1:
        raise low.unsupported(
            "a product of two activations that does not contract their width dimension (only "
            "q·kᵀ over the width, as in attention logits, has a deterministic limit)."
        )
    fa, ha, da = _index(a)  # [Bt, I]
    fb, hb, db = _index(b)  # [Bt, J]
    if da != db or not (ha[:, :, None] == hb[:, None, :]).all():
        raise low.unsupported("a product contracting different heads (or head sizes) of two activations")
    theta = low.program.moment(F.Outer(a.var.shape, b.var.shape), a.var, b.var, elementwise=False)

    def logits(t, _fa=fa, _fb=fb, _d=float(da)):
        # Σ_α over the head's d coordinates = d · (1/d) Σ_α → d · E[Z^q Z^k] (a finite-width
        # factor; check_width_powers ensures the scaling makes the product width-independent)
        return _d * t[_fa[:, :, None], _fb[:, None, :]]

    return Sca((theta,), logits, low.shape(node), None)


def _weighted(low: Lowering, node, w: Sca, v) -> Vec | HeadVec:
    if getattr(v, "iid_outputs", False) or v.axis != 2:
        raise low.unsupported("attention weights applied along the width dimension")
    fv, hv, d = _index(v)  # [Bt, J]
    if not (hv == hv[:, :1]).all():
        raise low.unsupported("attention mixing values of different heads")
    Bt, J = fv.shape
    I_ = w.shape[1]
    rows, inverse = torch.unique(fv, dim=0, return_inverse=True)
    reps = torch.tensor([int((inverse == u).nonzero()[0]) for u in range(rows.shape[0])])
    # the weights must be the same for every head sharing the same values (all heads' logits
    # have one limit; a per-head mask would break it): probed with random scalar values
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        probe = w.fn(*[torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in w.scalars])
        if not torch.allclose(probe, probe[reps[inverse]], equal_nan=True):
            raise low.unsupported(
                "attention weights that differ between heads (e.g. a per-head attn_mask): in the "
                "limit all heads' logits are equal, only masks shared by the heads are supported."
            )
    fv_rep = fv[reps]  # [U, J]
    nf = len(v.var.shape)

    def attend(u, *ps, _f=fv_rep, _fn=w.fn, _reps=reps, _nf=nf):
        rank = max([_nf] + [p.ndim for p in ps])
        batch = u.shape[: u.ndim - rank]
        vals = u.reshape(*batch, -1)[..., _f]  # [*batch, U, J]
        return torch.einsum("...uj,uij->...ui", vals, _fn(*ps)[_reps].to(u.dtype))

    attend.__name__ = "attention"
    P = low.program
    if v.var.is_gaussian:
        out = P.linear(attend, v.var, params=w.scalars, label=f"Σ_j a_ij {v.var.name}_j")
    else:
        out = P.nonlin(attend, v.var, params=w.scalars, elementwise=False)
    # torch element (b, i, α) is coordinate head(b)·d + α of out[inverse(b), i]
    N = d * (v.heads if isinstance(v, HeadVec) else 1)
    f_out = inverse[:, None] * I_ + torch.arange(I_)
    codes = (f_out * N + hv[:, :1] * d).unsqueeze(-1) + torch.arange(d)
    return _decode(low, codes, 2, N, out)


# ---------------------------------------------------------------------- width powers

def _literal_exponent(a, b, widths) -> float:
    """The power of width of a constant that is ``a`` at the small and ``b`` at the large width."""
    if a == b or not a or not b or (a > 0) != (b > 0):
        return 0.0
    w1, w2 = widths
    return math.log(b / a) / math.log(w2 / w1)


def check_width_powers(low: Lowering) -> None:
    """Track powers of the width through the graph; a value used with a nonzero power has
    no limit (1/√d attention logits, or a width-dependent factor elsewhere)."""
    c = low.c
    if not c.large_nodes:
        return
    power: dict[str, float] = {}
    param: dict[str, bool] = {}
    origin: dict[str, fx.Node] = {}
    for small, large in zip(c.nodes, c.large_nodes):
        name = small.name
        if small.op == "placeholder":
            power[name], param[name] = 0.0, name in c.param_of
            continue
        if small.op != "call_function":
            continue
        ins = [a for a in small.args if isinstance(a, fx.Node)]
        op = small.target
        if op in SHAPE_OPS and ins:
            power[name], param[name] = power.get(ins[0].name, 0.0), param.get(ins[0].name, False)
            if ins[0].name in origin:
                origin[name] = origin[ins[0].name]
            continue
        if op in SCALE_OPS and len(small.args) == 2 and isinstance(small.args[0], fx.Node) \
                and _number(small.args[1]) is not None:
            x = small.args[0].name
            e = _literal_exponent(_number(small.args[1]), _number(large.args[1]), c.widths)
            sign = 1.0 if op in (aten.mul.Tensor, aten.mul.Scalar) else -1.0
            power[name], param[name] = power.get(x, 0.0) + sign * e, param.get(x, False)
            if x in origin:
                origin[name] = origin[x]
            continue
        if op == aten.bmm.default and len(ins) == 2:
            a, b = ins
            dims_a = c.dims.get(a.name)
            width_contraction = (not param.get(a.name) and not param.get(b.name) and dims_a is not None
                                 and (len(dims_a.small) - 1) in dims_a.width_axes)
            if width_contraction:
                power[name] = power.get(a.name, 0.0) + power.get(b.name, 0.0) + 1.0
                origin[name] = small
            else:
                power[name] = power.get(a.name, 0.0) + power.get(b.name, 0.0)
            param[name] = False
            continue
        for a in ins:
            p = power.get(a.name, 0.0)
            if abs(p) > 1e-6:
                _raise_power(low, small, a, p, origin.get(a.name))
        power[name], param[name] = 0.0, False


def _raise_power(low: Lowering, node: fx.Node, arg: fx.Node, p: float, contraction: fx.Node | None):
    where = f"{node.target} at {source_line(node)}"
    if contraction is not None and abs(p - 0.5) < 1e-6:
        raise _attention_error(where, contraction)
    what = "attention logits" if contraction is not None else "an activation"
    raise UnsupportedOperation(
        f"{where}: {what} scaled so that they grow like width^{p:+.3g} (a constant that changes "
        "with width, times a sum over the width); such a value has no infinite-width limit. "
        "Scale a contraction over the width by 1/d (d its length ∝ width), e.g. "
        "F.scaled_dot_product_attention(q, k, v, scale=1/head_dim), and do not multiply "
        "activations by width-dependent constants elsewhere."
    )


def _attention_error(where: str, contraction: fx.Node) -> UnsupportedOperation:
    return UnsupportedOperation(
        f"{where}: attention logits q·kᵀ scaled by 1/√d (d = the head dimension, which grows "
        f"with width; contraction at {source_line(contraction)}). With independent W_Q and W_K "
        "the logits are a sum of d independent terms divided by √d: they stay random and O(1) "
        "as width → ∞ (central limit theorem), so the attention weights and every layer after "
        "them have no deterministic limit, and with a fixed number of heads the output is not "
        "a Gaussian process (Hron et al. 2020 need the number of heads → ∞). With 1/d scaling "
        "the logits converge to deterministic E[Z^q Z^k] and the limit exists: use "
        "F.scaled_dot_product_attention(q, k, v, scale=1/head_dim) or "
        "`q @ k.transpose(-2, -1) / head_dim`. nn.MultiheadAttention and "
        "nn.TransformerEncoderLayer hard-code 1/√d, so they have no limit with a fixed number of "
        "heads; with heads of fixed size (num_heads = width // head_dim) they have the "
        "infinite-heads limit (Hron et al. 2020), which is computed: build them with "
        "nn.MultiheadAttention(width, width // 8) (docs/attention.md)."
    )


def check_no_randomness(low: Lowering) -> None:
    """Random ops in the forward pass (dropout in F.scaled_dot_product_attention, which
    applies ``dropout_p`` even in eval mode) make the function itself random; the limit is
    of the deterministic network at initialization."""
    for node in low.c.nodes:
        op = node.target
        if isinstance(op, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in op.tags:
            raise UnsupportedOperation(
                f"{op} at {source_line(node)}: a random operation in the forward pass (dropout: "
                "F.scaled_dot_product_attention applies dropout_p even in eval mode). Set "
                "dropout_p=0 / dropout=0.0; the limit is of the network without dropout."
            )


CHECKS.append(check_no_randomness)
CHECKS.append(check_width_powers)
APPLY_HOOKS.append(_hook)
