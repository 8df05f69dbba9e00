"""Lower a captured graph to a Tensor Program, one ATen op at a time.

Each op has a rule in :data:`RULES` (or is pointwise: ``torch.Tag.pointwise``, handled by
one generic rule). An op without a rule raises :class:`tp.UnsupportedOperation` naming the
op and the user's source line.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx

from ..errors import UnsupportedOperation, WidthError
from ..master import closed_form
from ..program import functions as F
from ..program.calling import Gather, MatrixMap
from ..program.program import Program
from ..program.variables import Scalar
from .capture import Captured, source_line
from .tied import tied_parameters
from .values import Concat, Data, Merged, NodeView, Param, ParamT, Sca, Tuple_, Vec

aten = torch.ops.aten
Rule = Callable[["Lowering", fx.Node, list[Any]], Any]
RULES: dict[Any, Rule] = {}
# Extension points for rule modules (rules_attention): checks of the whole graph run before
# lowering, and hooks consulted before RULES for values they own (return NotImplemented
# to pass).
CHECKS: list[Callable[[Lowering], None]] = []
APPLY_HOOKS: list[Callable[[Lowering, fx.Node, list, dict], Any]] = []
# checks of the lowered program, given the model's output value (rules_heads: a vector split
# into heads must not also be used unsplit)
FINALIZERS: list[Callable[[Lowering, Any], None]] = []
# ops whose rules accept a width concatenation (``Concat``); others raise a clear error
CONCAT_OPS: set[Any] = {aten.addmm.default, aten.mm.default}
# ops whose rules read width-sized buffers themselves (batch norm's running statistics);
# elsewhere a width-sized buffer met by an activation is an error (rules_attention's hook)
BUFFER_CONSUMERS: set[Any] = set()


def rule(*ops, consumes_buffers: bool = False):
    """Register ``fn`` as the rule of ``ops``; ``consumes_buffers``: the rule reads the
    module's width-sized buffers among its arguments itself."""
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
            if consumes_buffers:
                BUFFER_CONSUMERS.add(op)
        return fn

    return register


class Lowering:
    """Interprets the small-width graph on abstract values, building ``self.program``.

    Args:
        captured: the aligned graphs.
        inputs: the concrete inputs (float64) for this program's finite batch.
        inits: per-parameter initialization, ``.variances`` (per entry, at the two widths)
            and ``.means``.
    """

    def __init__(
        self,
        captured: Captured,
        inputs: tuple[torch.Tensor, ...],
        inits: Mapping[str, Any],
        hyperparameters: Mapping[str, torch.Tensor] | None = None,
    ):
        self.c = captured
        self.inputs = inputs
        self.inits = inits
        self.hyper = dict(hyperparameters or {})
        self.program = Program()
        self.env: dict[str, Any] = {}
        self._matrices: dict[str, Any] = {}
        self._columns: dict[str, Any] = {}
        self._biases: dict[str, Any] = {}
        self.node: fx.Node | None = None
        self.param_of: dict[Any, str] = {}  # program matrix/vector -> the parameter it stands for
        self.params: dict[str, Param] = {}
        # (primitive, use, target): parameters initialized to a constant (zero-variance
        # biases, LayerNorm gains and shifts) are absent from the forward program; their
        # unit-variance stand-ins let the NTK count their gradients (see ntk.ntk_of)
        self.ghosts: list[tuple[Any, Any, Any]] = []
        self._ghost_prims: dict[str, Any] = {}
        # width split into heads of fixed size (rules_heads): memoized pieces, and the vectors
        # and matrices rewritten as independent pieces (they must not be used unsplit)
        self.splits: dict[Any, Any] = {}
        self.split_sources: set[Any] = set()
        self.tied = tied_parameters(captured.modules)

    def new_matrix(self, param: str, name: str, variance: float):
        m = self.program.matrix(name, variance=variance)
        self.param_of[m] = param
        return m

    def new_vector(self, param: str, name: str, **kwargs):
        v = self.program.vector(name, **kwargs)
        self.param_of[v] = param
        return v

    # ------------------------------------------------------------------ helpers
    def where(self, node: fx.Node | None = None) -> str:
        node = node or self.node
        return f"{node.target} at {source_line(node)}" if node is not None else "?"

    def unsupported(self, why: str) -> UnsupportedOperation:
        return UnsupportedOperation(f"{self.where()}: {why}")

    def width_axis(self, node: fx.Node | NodeView) -> int | None:
        if isinstance(node, NodeView):
            return node.axis
        dims = self.c.dims.get(node.name)
        if dims is None or not dims.width_axes:
            return None
        if len(dims.width_axes) > 1:
            raise self.unsupported(
                f"the result has {len(dims.width_axes)} width-sized dimensions {dims.width_axes}; "
                "activations with one width dimension are supported."
            )
        return dims.width_axes[0]

    def shape(self, node: fx.Node | NodeView) -> tuple[int, ...]:
        if isinstance(node, NodeView):
            return node.shape
        return self.c.dims[node.name].small

    def init_variance(self, p: Param) -> tuple[float, float]:
        init = self.inits[p.name]
        return float(init.variances[0]), float(init.variances[1])

    def v(self, p: Param):
        """Per-entry variance at the small width, as the program uses it: from the
        hyperparameter tensor σ² (= variance · fan_in) when given, so gradients flow."""
        if p.name in self.hyper:
            small = self.c.dims[p.node].small
            fan_in = math.prod(small[1:]) if len(small) >= 2 else 1
            return self.hyper[p.name] / fan_in
        return self.init_variance(p)[0]

    def init_mean(self, p: Param) -> tuple[float, float]:
        init = self.inits[p.name]
        return float(init.means[0]), float(init.means[1])

    # ------------------------------------------------------------------ run
    def run(self) -> Any:
        user = iter(self.inputs)
        out = None
        for check in CHECKS:
            check(self)
        for node in self.c.nodes:
            self.node = node
            if node.op == "placeholder":
                if node.name in self.c.param_of:
                    dims = self.c.dims[node.name]
                    name = self.c.param_of[node.name]
                    # a deep copy equal to another parameter at initialization is that parameter
                    self.env[node.name] = Param(self.tied.get(name, name), node.name, dims.small,
                                                dims.width_axes)
                    self.params[self.c.param_of[node.name]] = self.env[node.name]
                else:
                    self.env[node.name] = Data(next(user))
            elif node.op == "call_function":
                args = [self._resolve(a) for a in node.args]
                kwargs = {k: self._resolve(v) for k, v in node.kwargs.items()}
                self.env[node.name] = self._apply(node, args, kwargs)
            elif node.op == "output":
                outs = self._resolve(node.args[0])
                # the first user output (buffer mutations, e.g. BatchNorm's running stats, come first)
                kinds = [spec.kind.name for spec in self.c.program.graph_signature.output_specs]
                first = kinds.index("USER_OUTPUT") if "USER_OUTPUT" in kinds else 0
                out = outs[first] if isinstance(outs, (list, tuple)) else outs
                for finalize in FINALIZERS:
                    finalize(self, out)
            elif node.op == "get_attr":
                raise self.unsupported("graph attributes (get_attr) are not supported")
        return out

    def _resolve(self, a):
        if isinstance(a, fx.Node):
            return self.env[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(self._resolve(x) for x in a)
        return a

    def _apply(self, node: fx.Node, args: list, kwargs: dict):
        op = node.target
        for hook in APPLY_HOOKS:
            result = hook(self, node, args, kwargs)
            if result is not NotImplemented:
                return result
        abstract = (Vec, Sca, Param, ParamT, Tuple_, Merged, Concat)
        if all(not isinstance(a, abstract) for a in _flat(args, kwargs)):
            # finite and deterministic: evaluate it (input preprocessing, constants)
            return _fold(op, args, kwargs)
        if any(isinstance(a, Concat) for a in _flat(args, kwargs)) and op not in CONCAT_OPS:
            raise self.unsupported(
                "only a linear layer may follow a concatenation along the width; apply "
                "elementwise functions to the pieces before concatenating."
            )
        fn = RULES.get(op)
        if fn is not None:
            return fn(self, node, args, **kwargs) if kwargs else fn(self, node, args)
        if isinstance(op, torch._ops.OpOverload) and torch.Tag.pointwise in op.tags:
            return pointwise(self, node, args, kwargs)
        raise self.unsupported(
            "no rule for this op. Supported ops are listed in the README (generated from "
            "tensorprograms.frontend.lower.RULES); open an issue with this message."
        )

    def commit(self, v: Vec):
        """Create the Nonlin of a pending pointwise expression."""
        fn, bases, scalars = v.expr
        return self.program.nonlin(fn, *bases, params=scalars)

    # ------------------------------------------------------------------ program pieces
    def matrix(self, p: Param, fan_in: tuple[int, int]):
        """The TP matrix of a weight with width fan-in; its variance must scale as 1/fan_in."""
        if p.name in self._matrices:
            return self._matrices[p.name]
        v1, v2 = self.init_variance(p)
        check_fan_in_scaling(p.name, (v1, v2), fan_in)
        sigma2 = self.v(p) * fan_in[0]
        self._matrices[p.name] = self.new_matrix(p.name, _tp_name(p.name), sigma2)
        return self._matrices[p.name]

    def input_variance(self, p: Param, hint: str = ""):
        """Per-entry variance of a finite-fan-in parameter (input layer, embedding table): it
        must be positive and the same at both capture widths."""
        hint = hint or "Initialize it with e.g. nn.init.normal_(w, std=σ/sqrt(fan_in))."
        v1, v2 = self.init_variance(p)
        if not math.isclose(v1, v2, rel_tol=1e-9) or v1 <= 0:
            w1, w2 = self.c.widths
            raise WidthError(
                f"parameter {p.name} has a finite fan-in, so its per-entry variance must be "
                f"positive and independent of the width; read {v1:.4g} at width {w1} and "
                f"{v2:.4g} at width {w2}. {hint}"
            )
        return self.v(p)

    def columns(self, p: Param):
        """Columns of a weight with finite fan-in: an initial vector of finite shape (d,)."""
        if p.name not in self._columns:
            d = p.shape[1]
            self._columns[p.name] = self.new_vector(p.name, _tp_name(p.name), shape=(d,),
                                                    variance=self.input_variance(p))
        return self._columns[p.name]

    def columns_conv(self, p: Param, fan_in: int):
        """A first-layer convolution's filters: an initial vector of finite shape (C_in·K,)."""
        if p.name not in self._columns:
            self._columns[p.name] = self.new_vector(
                p.name, _tp_name(p.name), shape=(fan_in,), variance=self.input_variance(p)
            )
        return self._columns[p.name]

    def matrix_conv(self, p: Param, offset: int, fan_in: tuple[int, int], K: int):
        """The C_out × C_in matrix of one kernel offset; variance σ²/fan_in with fan_in = C_in·K."""
        key = f"{p.name}#{offset}"
        if key not in self._matrices:
            v1, v2 = self.init_variance(p)
            f1, f2 = fan_in
            check_fan_in_scaling(p.name, (v1, v2), fan_in)
            # entries have variance v = (v·K·C_in/K)/C_in: each offset's matrix has σ² = v·C_in
            self._matrices[key] = self.new_matrix(p.name, f"{_tp_name(p.name)}_k{offset}", self.v(p) * f1 / K)
        return self._matrices[key]

    def bias(self, p: Param):
        """A width-sized bias: an initial vector, or None if its variance vanishes with width."""
        if p.name in self._biases:
            return self._biases[p.name]
        v1, v2 = self.init_variance(p)
        m1, m2 = self.init_mean(p)
        if m1 != 0.0 or m2 != 0.0:
            raise self.unsupported(
                f"bias {p.name} has a nonzero mean ({m1:g}); only zero-mean biases are supported."
            )
        if v2 > v1 * (1 + 1e-9):
            raise WidthError(f"bias {p.name}: its variance grows with width ({v1:.4g} → {v2:.4g}).")
        if v1 == 0.0 or v2 < v1 * (1 - 1e-9):
            # PyTorch's default: variance ∝ 1/fan_in → zero in the limit
            self._biases[p.name] = None
        else:
            self._biases[p.name] = self.new_vector(p.name, _tp_name(p.name), variance=self.v(p))
        return self._biases[p.name]


    def add_bias(self, p: Param | None, h, readout: bool = False):
        """``h + b`` for a bias ``p`` (None: no bias). A bias whose variance vanishes with
        width is absent from the limit's forward pass but still has a gradient: a ghost."""
        if p is None:
            return h
        b = _readout_bias(self, p) if readout else self.bias(p)
        if b is not None:
            return self.program.lincomb([1.0, 1.0], [h, b])
        self.ghost(p, h)
        return h

    def ghost(self, p: Param, target, factor=None) -> None:
        """Record a constant-initialized parameter added to ``target`` (or, with ``factor``,
        multiplying ``factor`` into it): a unit-variance stand-in shaped like ``target``."""
        if p.name not in self._ghost_prims:
            self._ghost_prims[p.name] = self.new_vector(p.name, f"{_tp_name(p.name)}~", variance=1.0)
        prim = self._ghost_prims[p.name]
        use = self.program.linear(_broadcaster(target.shape), prim, label=f"∂/∂{p.name}")
        self.ghosts.append((prim, use, target, factor))


def _broadcaster(shape: tuple[int, ...]):
    def broadcast(u, _shape=tuple(shape)):
        return u.reshape(*u.shape, *[1] * len(_shape)).expand(*u.shape, *_shape).contiguous()

    return broadcast


def check_fan_in_scaling(name: str, variances: tuple[float, float], fan_in: tuple[int, int]) -> None:
    """A weight with a width fan-in needs per-entry variance σ²/fan_in; raise WidthError with
    the measured numbers otherwise (the limit would diverge or vanish)."""
    (v1, v2), (f1, f2) = variances, fan_in
    if v1 <= 0 or v2 <= 0:
        raise WidthError(f"parameter {name} is initialized to a constant; its limit is trivial.")
    k = math.log(v1 / v2) / math.log(f2 / f1)
    if abs(k - 1) > 1e-6:
        verdict = "diverges" if k < 1 else "vanishes"
        raise WidthError(
            f"parameter {name}: per-entry variance {v1:.4g} at fan-in {f1} and {v2:.4g} at "
            f"fan-in {f2} scales like fan_in^(-{k:.3f}); with fan_in^(-1) the limit exists, "
            f"with this scaling the output {verdict} as width grows. Initialize it with "
            "variance σ²/fan_in (e.g. nn.init.normal_(w, std=σ/sqrt(fan_in)))."
        )


def _tp_name(name: str) -> str:
    return name.replace(".", "_")


def _flat(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from _flat(a, {})
        else:
            yield a


def _concrete(a):
    if isinstance(a, Data):
        return a.value
    if isinstance(a, (list, tuple)):
        return type(a)(_concrete(x) for x in a)
    return a


def _fold(op, args, kwargs):
    out = op(*_concrete(args), **{k: _concrete(v) for k, v in kwargs.items()})
    if isinstance(out, torch.Tensor):
        return Data(out)
    if isinstance(out, (list, tuple)):
        return Tuple_(tuple(Data(o) if isinstance(o, torch.Tensor) else o for o in out))
    return out


# ---------------------------------------------------------------------- rules

def _align(shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    return (1,) * (rank - len(shape)) + tuple(shape)


def pointwise(low: Lowering, node: fx.Node, args: list, kwargs: dict):
    """Any pointwise op: a Nonlin (or a LinComb for linear ops on Gaussian vectors)."""
    out_shape = low.shape(node)
    axis = low.width_axis(node)
    rank = len(out_shape)
    vecs = [a for a in args if isinstance(a, Vec)]
    if axis is None and vecs and vecs[0].iid_outputs:
        axis = vecs[0].axis + rank - len(vecs[0].shape)  # the iid output axis plays the width's role
    if axis is None or not vecs:
        # only scalars (Sca) and data: a deterministic scalar expression
        return _scalar_expr(low, node, args, kwargs)
    iid = vecs[0].iid_outputs
    if any(v.iid_outputs != iid for v in vecs):
        raise low.unsupported("combines the model's outputs with hidden activations.")
    op = node.target
    # closed forms and Gaussian-preserving linear ops
    closed_ok = len(args) >= 1 and isinstance(args[0], Vec) and not args[0].pending
    if (closed_ok and len(args) == 1 and not kwargs and args[0].var.is_gaussian
            and closed_form.terms_of(op) is not None):
        # the ATen op itself is the Nonlin: the engine's closed-form table recognises it
        return Vec(low.program.nonlin(op, args[0].var, elementwise=True), out_shape, axis, iid)
    if op == aten.leaky_relu.default and closed_ok and args[0].var.is_gaussian and not kwargs:
        slope = args[1] if len(args) > 1 else 0.01
        return Vec(low.program.nonlin(F.leaky_relu(slope), args[0].var), out_shape, axis, iid)
    lin = _linear(low, node, args, kwargs)
    if lin is not None:
        return Vec(lin, out_shape, axis, iid)

    # Fuse into a pending expression over committed base vectors and scalars.
    bases: list = []
    scalars: list[Scalar] = []
    slots = []
    for a in args:
        if isinstance(a, Vec):
            fn, bvars, svars = _expr_of(a)
            slots.append(("vec", (fn, _index(bases, bvars), len(scalars), len(svars))))
            scalars.extend(svars)
        elif isinstance(a, Sca):
            slots.append(("sca", (len(scalars), len(a.scalars), a.fn)))
            scalars.extend(a.scalars)
        elif isinstance(a, Data):
            t = a.value
            aligned = t.reshape(_align(tuple(t.shape), rank))
            if aligned.shape[axis] != 1:
                raise low.unsupported("combines an activation with width-sized data.")
            slots.append(("const", aligned.squeeze(axis)))
        elif isinstance(a, (Param, ParamT)):
            raise low.unsupported(
                f"uses the parameter {getattr(a, 'name', getattr(a, 'param', a))} elementwise with an "
                "activation (e.g. a gain vector); only biases and LayerNorm affine parameters are supported."
            )
        else:
            slots.append(("py", a))
    nb = len(bases)

    def phi(*vals, _op=op, _slots=slots, _kw=kwargs, _nb=nb):
        xs, ps = vals[:_nb], vals[_nb:]
        call = []
        for kind, item in _slots:
            if kind == "vec":
                fn, idx, start, n = item
                call.append(fn(*[xs[i] for i in idx], *ps[start:start + n]))
            elif kind == "sca":
                start, n, fn = item
                call.append(fn(*ps[start:start + n]))
            else:
                call.append(item)
        return _op(*call, **_kw)

    phi.__name__ = _op_name(op)
    return Vec(None, out_shape, axis, iid, expr=(phi, tuple(bases), tuple(scalars)), commit=low.commit)


def _op_name(op) -> str:
    parts = str(op).split(".")
    return parts[1] if len(parts) > 1 else str(op)


def _identity(u):
    return u


def _expr_of(v: Vec):
    """(fn, base vectors, scalars) with v = fn(*bases, *scalars)."""
    if v.pending:
        return v.expr
    return _identity, (v.var,), ()


def _index(bases: list, new) -> list[int]:
    idx = []
    for b in new:
        for i, existing in enumerate(bases):
            if existing is b:
                idx.append(i)
                break
        else:
            bases.append(b)
            idx.append(len(bases) - 1)
    return idx


def _linear(low: Lowering, node, args, kwargs):
    """add/sub/mul/div/neg on Gaussian vectors that keep them Gaussian: a LinComb."""
    op = node.target
    P = low.program
    if not all(not a.pending and a.var.is_gaussian for a in args if isinstance(a, Vec)):
        return None
    numbers = [a for a in args if isinstance(a, (int, float))]
    vecs = [a for a in args if isinstance(a, Vec)]
    if any(isinstance(a, (Sca, Data)) for a in args):
        return None
    alpha = float(kwargs.get("alpha", 1.0)) if kwargs.keys() <= {"alpha"} else None
    if alpha is None:
        return None
    if op in (aten.add.Tensor, aten.sub.Tensor) and len(vecs) == 2:
        sign = alpha if op == aten.add.Tensor else -alpha
        return P.lincomb([1.0, sign], [vecs[0].var, vecs[1].var])
    if op == aten.mul.Tensor and len(vecs) == 1 and len(numbers) == 1:
        return P.lincomb([float(numbers[0])], [vecs[0].var])
    if op == aten.div.Tensor and len(vecs) == 1 and isinstance(args[1], (int, float)):
        return P.lincomb([1.0 / float(args[1])], [vecs[0].var])
    if op == aten.neg.default:
        return P.lincomb([-1.0], [vecs[0].var])
    return None


def _scalar_expr(low: Lowering, node, args, kwargs):
    if not any(isinstance(a, Sca) for a in args):
        raise low.unsupported("unexpected operands")
    op = node.target
    scalars: list[Scalar] = []
    slots = []
    axis = None
    for a in args:
        if isinstance(a, Sca):
            slots.append(("sca", (len(scalars), len(a.scalars), a.fn, a.axis)))
            scalars.extend(a.scalars)
            axis = a.axis if axis is None else axis
        elif isinstance(a, Data):
            slots.append(("const", a.value))
        else:
            slots.append(("py", a))

    def fn(*vals, _op=op, _slots=slots, _kw=kwargs):
        call = []
        for kind, item in _slots:
            if kind == "sca":
                start, n, f, ax = item
                v = f(*vals[start:start + n])
                call.append(v.unsqueeze(ax) if ax is not None else v)  # back to torch layout
            else:
                call.append(item)
        out = _op(*call, **_kw)
        return out.squeeze(axis) if axis is not None else out

    return Sca(tuple(scalars), fn, low.shape(node), axis)


@rule(aten.permute.default)
def _permute(low: Lowering, node, args):
    """Transpose of a weight (how nn.Linear appears); finite-index permutation of an activation."""
    x, perm = args
    if isinstance(x, Param) and len(x.shape) == 2 and list(perm) == [1, 0]:
        return ParamT(x)
    if isinstance(x, Vec):
        return _reshape_vec(low, node, x, lambda t: t.permute(perm))
    raise low.unsupported("permute of a parameter other than a 2-D transpose")


@rule(aten.t.default)
def _t(low: Lowering, node, args):
    """Transpose of a weight."""
    if isinstance(args[0], Param):
        return ParamT(args[0])
    return _permute(low, node, [args[0], [1, 0]])


def _linear_layer(low: Lowering, node, x, wt, bias):
    if not isinstance(wt, ParamT):
        raise low.unsupported("a matrix product whose right operand is not a transposed weight")
    W = wt.param
    P = low.program
    out_shape = low.shape(node)
    axis = low.width_axis(node)
    w_width = W.width_axes
    if isinstance(x, Data):
        if 0 not in w_width or 1 in w_width:
            raise low.unsupported(
                f"{W.name} maps finite inputs to a finite output: a random finite layer has no "
                "Gaussian-process limit. Fix its weights or make its output width-sized."
            )
        cols = low.columns(W)
        X = x.value.reshape(-1, x.value.shape[-1])
        h = P.linear(MatrixMap(X), cols, label=f"{cols.name} · x")
        return Vec(low.add_bias(bias, h), out_shape, axis)
    if isinstance(x, Merged):
        return _merged_readout(low, node, x, W, bias)
    if isinstance(x, Concat):
        return _concat_linear(low, node, x, W, bias)
    if not isinstance(x, Vec) or x.iid_outputs:
        raise low.unsupported("a matrix product of something other than an activation")
    if x.axis != len(x.shape) - 1 or 1 not in w_width:
        raise low.unsupported("a matrix product that does not contract the width dimension")
    dims1, dims2 = low.c.dims[W.node].small, low.c.dims[W.node].large
    M = low.matrix(W, (dims1[1], dims2[1]))
    g = M @ x.var
    readout = 0 not in w_width
    g = low.add_bias(bias, g, readout)
    if readout:
        return Vec(g, out_shape, len(out_shape) - 1, iid_outputs=True)
    return Vec(g, out_shape, axis)


def _readout_bias(low: Lowering, p: Param):
    v1, v2 = low.init_variance(p)
    if v1 == 0.0 or v2 < v1 * (1 - 1e-9):
        return None
    return low.new_vector(p.name, _tp_name(p.name), variance=low.v(p))


@rule(aten.addmm.default)
def _addmm(low: Lowering, node, args, beta=1, alpha=1):
    """Linear layer with bias: input layer (finite fan-in), MatMul (hidden) or readout."""
    bias, x, wt = args
    if beta != 1 or alpha != 1:
        raise low.unsupported("addmm with beta/alpha other than 1")
    if not isinstance(bias, Param):
        raise low.unsupported("addmm with a bias that is not a parameter")
    return _linear_layer(low, node, x, wt, bias)


@rule(aten.mm.default)
def _mm(low: Lowering, node, args):
    """Linear layer without bias: input layer, MatMul or readout."""
    x, wt = args
    return _linear_layer(low, node, x, wt, None)


@rule(operator.getitem)
def _getitem(low: Lowering, node, args):
    """Element of a tuple output (LayerNorm's normalized output, max-pool values)."""
    x, i = args
    if isinstance(x, Tuple_):
        item = x.items[i]
        if item is None:
            raise low.unsupported(f"output {i} of this op is not supported")
        return item
    raise low.unsupported("indexing of a non-tuple")


@rule(aten.mean.dim)
def _mean(low: Lowering, node, args, keepdim=False, dtype=None):
    """Mean over the width: a Moment (a scalar); over finite dims: global average pooling."""
    x, dims = args[0], args[1]
    keepdim = args[2] if len(args) > 2 else keepdim
    if not isinstance(x, Vec) or x.iid_outputs:
        raise low.unsupported("mean of something other than an activation")
    dims = [d % len(x.shape) for d in dims]
    if x.axis not in dims:
        # a mean over finite dims (global average pooling): linear, per width coordinate
        kw = {"keepdim": keepdim} if keepdim else {}
        return channelwise(low, node, [x, args[1]], kw, True)
    if dims != [x.axis]:
        raise low.unsupported("a mean over the width and finite dimensions at once")
    theta = low.program.moment(F.identity, x.var)
    return Sca((theta,), lambda t: t, low.shape(node), x.axis if keepdim else None)


@rule(aten.native_layer_norm.default)
def _layer_norm(low: Lowering, node, args):
    """LayerNorm over the width: Moments (mean, second moment) as Nonlin parameters."""
    x, normalized_shape, weight, bias, eps = args
    if not isinstance(x, Vec) or x.axis != len(x.shape) - 1 or len(normalized_shape) != 1:
        raise low.unsupported("LayerNorm over dimensions other than the width")
    P = low.program
    mu = P.moment(F.identity, x.var)
    m2 = P.moment(lambda u: u * u, x.var)
    gain, shift = 1.0, 0.0
    for p in (weight, bias):
        if p is None:
            continue
        v1, v2 = low.init_variance(p)
        m1, _ = low.init_mean(p)
        if v1 != 0.0 or v2 != 0.0:
            raise low.unsupported(
                f"LayerNorm parameter {p.name} is randomly initialized; constant init is supported."
            )
        if p is weight:
            gain = m1
        else:
            shift = m1

    def norm(u, mean, second, _eps=float(eps), _g=gain, _s=shift):
        return _g * (u - mean) / torch.sqrt(second - mean * mean + _eps) + _s

    if x.var.is_gaussian and shift == 0.0:
        # a G-var has E[Z] = 0, so the mean Moment's limit is 0 and LayerNorm is a scaling by
        # a deterministic scalar: a LinComb with a Scalar coefficient, Gaussian in the limit
        def scale(u, second, _eps=float(eps), _g=gain):
            return _g * u / torch.sqrt(second + _eps)

        y = P.linear(scale, x.var, params=(m2,), label=f"LayerNorm({x.var.name})")

        def unit_of():
            # ŷ = y / gain, the same G-var when gain is 1 (so the engine sees one vector)
            return y if gain == 1.0 else P.lincomb([1.0 / gain], [y])
    else:
        y = P.nonlin(norm, x.var, params=(mu, m2))

        def unit_of():
            return P.nonlin(functools.partial(norm, _g=1.0, _s=0.0), x.var, params=(mu, m2))

    # the gain's gradient is the cotangent times the normalized input, the shift's the cotangent
    if weight is not None:
        low.ghost(weight, y, factor=unit_of())
    if bias is not None:
        low.ghost(bias, y)
    return Tuple_((Vec(y, x.shape, x.axis), None, None))


@rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
      aten.squeeze.dim, aten.squeeze.dims, aten.clone.default, aten.alias.default,
      aten.expand.default, aten.slice.Tensor, aten.select.int, aten.transpose.int)
def _shape_op(low: Lowering, node, args, **kwargs):
    """Shape op on finite dims: a gather (LinComb); flatten of width × positions before a readout."""
    x = args[0]
    if isinstance(x, Vec):
        return _reshape_vec(low, node, x, lambda t: node.target(t, *args[1:], **kwargs))
    raise low.unsupported("a shape operation on a parameter")


@rule(aten.index.Tensor)
def _index_op(low: Lowering, node, args):
    """Indexing finite dims with constant index tensors (how reflect/replicate padding export)."""
    x, indices = args
    if not isinstance(x, Vec):
        raise low.unsupported("indexing something other than an activation")
    if len(indices) > x.axis and indices[x.axis] is not None:
        raise low.unsupported("indexing along the width dimension")
    concrete = [None if i is None else _concrete(i) for i in indices]
    return _reshape_vec(low, node, x, lambda t: aten.index.Tensor(t, concrete))


def _reshape_vec(low: Lowering, node, x: Vec, op):
    """A shape op moves finite indices around and keeps the width axis: a LinComb (or a
    Nonlin for H-vars) that gathers finite indices, found by running the op on indices."""
    index = torch.arange(math.prod(x.shape)).reshape(x.shape)
    out = op(index)
    out_shape = tuple(out.shape)
    axis = low.width_axis(node)
    if axis is None:
        raise low.unsupported("a shape operation that removes the width dimension")
    moved = out.movedim(axis, 0)  # [w, *F_out]
    if moved.shape[0] != x.shape[x.axis]:
        return _merge(low, node, x, out, axis)
    src = torch.stack(torch.unravel_index(moved.reshape(moved.shape[0], -1), x.shape), -1)
    # width coordinate must be carried unchanged, finite coordinates independent of it
    width_coord = src[..., x.axis]
    if not (width_coord == torch.arange(moved.shape[0])[:, None]).all():
        raise low.unsupported("a shape operation that mixes the width dimension with finite ones")
    finite = torch.cat([src[..., : x.axis], src[..., x.axis + 1:]], -1)
    if not (finite == finite[:1]).all():
        raise low.unsupported("a shape operation that mixes the width dimension with finite ones")
    fshape = x.finite_shape
    if fshape:
        strides = torch.tensor([math.prod(fshape[i + 1:]) for i in range(len(fshape))])
        gather = (finite[0] * strides).sum(-1)
    else:
        gather = torch.zeros(finite.shape[1], dtype=torch.long)
    out_f = out_shape[:axis] + out_shape[axis + 1:]
    if out_f == fshape and torch.equal(gather, torch.arange(len(gather))):
        return Vec(x.var, out_shape, axis, x.iid_outputs)
    return _gather_vec(low, x, gather, out_f, out_shape, axis, str(node.target).split(".")[1])


def _gather_vec(low: Lowering, x: Vec, gather: torch.Tensor, out_f: tuple[int, ...], out_shape, axis, name):
    """Gather finite indices of x (a LinComb for G-vars, a Nonlin for H-vars)."""
    move = Gather(gather, x.finite_shape, out_f, name)
    if x.var.is_gaussian:
        v = low.program.linear(move, x.var, label=f"{name}({x.var.name})")
    else:
        v = low.program.nonlin(move, x.var, elementwise=False)
    return Vec(v, out_shape, axis, x.iid_outputs)


def _merge(low: Lowering, node, x: Vec, out: torch.Tensor, axis: int):
    """Flattening the width axis with M finite positions, channel-major (c·M + p)."""
    C = x.shape[x.axis]
    total = out.shape[axis]
    if total % C:
        raise low.unsupported("a shape operation that mixes the width dimension with finite ones")
    M = total // C
    moved = out.movedim(axis, -1)  # [*rest, C·M]
    rest = tuple(moved.shape[:-1])
    grid = moved.reshape(*rest, C, M)
    coords = _unravel(grid, x.shape)  # ndim × [*rest, C, M]
    if not (coords[x.axis] == torch.arange(C)[:, None]).all():
        raise low.unsupported("a flatten that is not channel-major over the width dimension")
    finite = coords[: x.axis] + coords[x.axis + 1:]
    if not all((c == c[..., :1, :]).all() for c in finite):
        raise low.unsupported("a shape operation that mixes the width dimension with finite ones")
    fshape = x.finite_shape
    flat = torch.zeros(*rest, M, dtype=torch.long)  # [*rest, M]
    for i, c in enumerate(finite):
        flat += c[..., 0, :] * math.prod(fshape[i + 1:])
    part_shape = rest[:axis] + (C,) + rest[axis:]
    parts = [
        _gather_vec(low, x, flat[..., p].reshape(-1), rest, part_shape, axis, f"position{p}")
        for p in range(M)
    ]
    return Merged(parts, tuple(out.shape), axis)


def _unravel(flat: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """``torch.unravel_index`` without stacking the coordinates (a flatten of N examples ×
    width × P positions has N·C·P entries: one long tensor per axis, not a stacked copy)."""
    coords = []
    rest = flat
    for n in reversed(shape):
        coords.append(torch.remainder(rest, n))
        rest = torch.div(rest, n, rounding_mode="floor")
    return coords[::-1]


def _merged_readout(low: Lowering, node, x: Merged, W: Param, bias):
    """``Linear(C·M, k)`` on a flattened feature map: M independent C-wide readouts."""
    if 0 in W.width_axes:
        raise low.unsupported("a width-sized layer on a flattened feature map (only readouts)")
    P = low.program
    v1, v2 = low.init_variance(W)
    dims1, dims2 = low.c.dims[W.node].small, low.c.dims[W.node].large
    M = len(x.parts)
    f1, f2 = dims1[1], dims2[1]
    check_fan_in_scaling(W.name, (v1, v2), (f1, f2))
    sigma2 = low.v(W) * f1 / M  # each position's C×k block has fan-in C = fan_in / M
    gs = []
    for p, part in enumerate(x.parts):
        Mp = low.new_matrix(W.name, f"{_tp_name(W.name)}_pos{p}", sigma2)
        gs.append(Mp @ part.var)
    g = low.add_bias(bias, P.lincomb([1.0] * len(gs), gs), readout=True)
    out_shape = low.shape(node)
    return Vec(g, out_shape, len(out_shape) - 1, iid_outputs=True)


def _fold_width(u: torch.Tensor, nf: int, axis: int) -> tuple[torch.Tensor, tuple]:
    """(*batch, *F) -> torch layout with the flattened batch as the width axis."""
    batch = tuple(u.shape[: u.ndim - nf])
    t = u.reshape(-1, *u.shape[u.ndim - nf:]).movedim(0, axis)
    return t, batch


def _unfold_width(t: torch.Tensor, batch: tuple, axis: int) -> torch.Tensor:
    t = t.movedim(axis, 0)
    return t.reshape(*batch, *t.shape[1:])


def channelwise(low: Lowering, node, args, kwargs, linear: bool):
    """An op acting independently along the width axis (pooling, padding, reductions over
    finite dims): applied with the engine's batch folded into the width axis."""
    x = args[0]
    if not isinstance(x, Vec):
        raise low.unsupported("expected an activation as first argument")
    axis = low.width_axis(node)
    if axis is None:
        raise low.unsupported("reduces over the width dimension (only mean is supported)")
    op, rest = node.target, args[1:]
    nf = len(x.finite_shape)
    in_axis = x.axis
    single = low.shape(node) if not isinstance(node.meta.get("val"), (tuple, list)) else None

    def fn(u, _op=op, _rest=rest, _kw=kwargs):
        t, batch = _fold_width(u, nf, in_axis)
        out = _op(t, *_rest, **_kw)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return _unfold_width(out, batch, axis)

    fn.__name__ = str(op).split(".")[1]
    if linear and x.var.is_gaussian:
        v = low.program.linear(fn, x.var, label=f"{fn.__name__}({x.var.name})")
    else:
        v = low.program.nonlin(fn, x.var, elementwise=False)
    out_shape = single or tuple(node.meta["val"][0].shape)
    result = Vec(v, tuple(out_shape), axis, x.iid_outputs)
    if single is None:
        return Tuple_((result, None))
    return result


LINEAR_CHANNELWISE = (
    aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
    aten._adaptive_avg_pool2d.default, aten.adaptive_avg_pool1d.default,
    aten.constant_pad_nd.default, aten.sum.dim_IntList,
    aten.reflection_pad1d.default, aten.reflection_pad2d.default,
    aten.replication_pad1d.default, aten.replication_pad2d.default,
)
NONLINEAR_CHANNELWISE = (
    aten.max_pool2d_with_indices.default, aten.max_pool1d.default,
    aten.max_pool3d_with_indices.default, aten.amax.default, aten.amin.default,
    aten._softmax.default, aten._log_softmax.default, aten.adaptive_max_pool2d.default,
    aten.adaptive_max_pool1d.default,
)


def linear_channelwise(low: Lowering, node, args, **kwargs):
    """Linear op per width coordinate (average pooling, padding, sums over finite dims)."""
    return channelwise(low, node, args, kwargs, True)


def nonlinear_channelwise(low: Lowering, node, args, **kwargs):
    """Nonlinear op per width coordinate mixing finite indices (max-pool, softmax): a joint Nonlin."""
    return channelwise(low, node, args, kwargs, False)


for _op in LINEAR_CHANNELWISE:
    RULES[_op] = linear_channelwise
for _op in NONLINEAR_CHANNELWISE:
    RULES[_op] = nonlinear_channelwise


@rule(aten.convolution.default)
def _convolution(low: Lowering, node, args):
    """Conv1d/2d/3d (stride, padding, dilation): one MatMul per kernel offset + shifts; input layer."""
    x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = args
    if transposed or groups != 1:
        raise low.unsupported("transposed or grouped convolutions")
    if not isinstance(weight, Param):
        raise low.unsupported("a convolution whose weight is not a parameter")
    P = low.program
    out_shape = low.shape(node)
    axis = low.width_axis(node)
    spatial = len(weight.shape) - 2
    kernel = weight.shape[2:]
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
            3: torch.nn.functional.conv3d}[spatial]
    if isinstance(x, Data):
        if 0 not in weight.width_axes or 1 in weight.width_axes:
            raise low.unsupported(f"{weight.name}: a convolution between finite channel counts")
        cin = x.value.shape[1]
        K = math.prod(kernel)
        eye = torch.eye(cin * K, dtype=torch.float64).reshape(cin * K, cin, *kernel)
        patches = conv(x.value, eye, None, stride, padding, dilation)  # [N, cin·K, *out]
        cols = low.columns_conv(weight, cin * K)

        def apply(u, _p=patches):
            y = torch.einsum("bj,nj...->bn...", u.reshape(-1, u.shape[-1]), _p)
            return y.reshape(*u.shape[:-1], _p.shape[0], *_p.shape[2:])

        h = P.linear(apply, cols, label=f"conv({cols.name}, x)")
    elif isinstance(x, Vec) and not x.iid_outputs:
        if x.axis != 1 or 1 not in weight.width_axes or 0 not in weight.width_axes:
            raise low.unsupported("a convolution that does not map width channels to width channels")
        d1, d2 = low.c.dims[weight.node].small, low.c.dims[weight.node].large
        K = math.prod(kernel)
        offsets = list(torch.cartesian_prod(*[torch.arange(k) for k in kernel]).reshape(K, spatial))
        gs = []
        for j in range(K):
            Mj = low.matrix_conv(weight, j, (d1[1] * K, d2[1] * K), K)
            gs.append(Mj @ x.var)
        # For each kernel offset, which input position feeds each output position (or none):
        # found once by convolving an image of position indices with a one-hot kernel.
        spatial_in = x.shape[2:]
        index = torch.arange(1, math.prod(spatial_in) + 1, dtype=torch.float64).reshape(1, 1, *spatial_in)
        gathers = []
        for off in offsets:
            onehot = torch.zeros(1, 1, *kernel, dtype=torch.float64)
            onehot[(0, 0, *[int(o) for o in off])] = 1.0
            src = conv(index, onehot, None, stride, padding, dilation).reshape(-1).round().long() - 1
            gathers.append(src)
        spatial_out = tuple(out_shape[2:])
        nsp = len(spatial_in)

        def shifts(*us, _g=gathers, _nsp=nsp, _out=spatial_out):
            total = None
            for u, src in zip(us, _g):
                flat = u.reshape(*u.shape[: u.ndim - _nsp], -1)
                y = flat[..., src.clamp_min(0)] * (src >= 0).to(u.dtype)
                total = y if total is None else total + y
            return total.reshape(*total.shape[:-1], *_out)

        shifts.__name__ = "conv_shifts"
        h = P.linear(shifts, *gs, label=f"Σ_offsets shift(conv {weight.name})")
    else:
        raise low.unsupported("a convolution of something other than the input or an activation")
    return Vec(low.add_bias(bias, h), out_shape, axis)


@rule(aten.cat.default)
def _cat(low: Lowering, node, args, dim=0):
    """Concatenation along the width (blocks feeding one linear layer)."""
    tensors = args[0]
    dim = args[1] if len(args) > 1 else dim
    if not all(isinstance(t, Vec) and not t.iid_outputs for t in tensors):
        raise low.unsupported("concatenation of activations with other tensors")
    rank = len(tensors[0].shape)
    dim = dim % rank
    if any(t.axis != dim for t in tensors):
        raise low.unsupported("concatenation along finite dimensions of activations")
    return Concat(list(tensors), [t.shape[t.axis] for t in tensors], low.shape(node), dim)


def _concat_linear(low: Lowering, node, x: Concat, W: Param, bias):
    """``W [x_1; …; x_k] = Σ_i W_i x_i`` with W_i the column block of part i (fan-in = the
    whole concatenation, so block i's matrix has σ_i² = Var(W_ij)·size_i)."""
    if x.axis != len(x.shape) - 1:
        raise low.unsupported("a linear layer on a concatenation not along the last dim")
    P = low.program
    v1, v2 = low.init_variance(W)
    f1, f2 = low.c.dims[W.node].small[1], low.c.dims[W.node].large[1]
    check_fan_in_scaling(W.name, (v1, v2), (f1, f2))
    gs = []
    for i, (part, size) in enumerate(zip(x.parts, x.sizes)):
        key = f"{W.name}#block{i}"
        if key not in low._matrices:
            low._matrices[key] = low.new_matrix(W.name, f"{_tp_name(W.name)}_block{i}", low.v(W) * size)
        gs.append(low._matrices[key] @ part.var)
    g = P.lincomb([1.0] * len(gs), gs)
    readout = 0 not in W.width_axes
    g = low.add_bias(bias, g, readout)
    out_shape = low.shape(node)
    if readout:
        return Vec(g, out_shape, len(out_shape) - 1, iid_outputs=True)
    return Vec(g, out_shape, low.width_axis(node))


from . import rules_attention  # noqa: E402,F401  (registers its rules and hooks)
