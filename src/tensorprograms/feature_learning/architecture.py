"""Recognise the MLPs whose μP training limit this package computes.

Supported: ``x [B, d] -> Linear(d, n) -> φ₁ -> Linear(n, n) -> φ₂ -> … -> Linear(n, k)``,
each Linear with or without a bias, each φ any elementwise function (a chain of
elementwise ATen ops; none at all makes the network linear in that layer). The model is
captured with ``torch.export`` at two widths (``frontend.capture``) and its graph is read
op by op; anything else (convolutions, norms, residual adds, attention, hidden sizes that
are not exactly ``width``) is rejected with the op and the user's source line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from ..errors import UnsupportedOperation
from ..frontend.capture import Captured, source_line

aten = torch.ops.aten
_TRANSPOSES = (aten.permute.default, aten.t.default)
_SUPPORTED = (
    "an MLP: Linear(d, width) -> activation -> Linear(width, width) -> ... -> Linear(width, k), "
    "biases optional, elementwise activations"
)


@dataclass(frozen=True)
class Activation:
    """An elementwise function, rebuilt from its captured ATen ops.

    ``affine`` is ``(a, c)`` when ``φ(t) = a t + c`` exactly (probed), else None."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    ops: tuple[str, ...]
    affine: tuple[float, float] | None


@dataclass(frozen=True)
class LinearLayer:
    """One Linear layer: parameter names and which side is width-sized."""

    weight: str
    bias: str | None
    fan_in: int  # at the capture's smaller width
    fan_out: int
    kind: str  # "input" (d -> width), "hidden" (width -> width), "output" (width -> k)


@dataclass(frozen=True)
class MLPSpec:
    """``layers[0]`` is the input layer, ``layers[-1]`` the readout; ``activations[l]``
    follows ``layers[l]`` (one per layer but the readout)."""

    layers: tuple[LinearLayer, ...]
    activations: tuple[Activation, ...]
    d_in: int
    k_out: int

    @property
    def linear(self) -> bool:
        """True when every activation is affine: the network is linear in the width dims."""
        return all(a.affine is not None for a in self.activations)


def _unsupported(node: fx.Node, why: str) -> UnsupportedOperation:
    return UnsupportedOperation(
        f"the μP training limit supports {_SUPPORTED}; {why}: op {node.target} at "
        f"{source_line(node)}. Other architectures are not supported yet."
    )


def _make_fn(nodes: list[fx.Node], start: fx.Node, out: fx.Node) -> Callable[[torch.Tensor], torch.Tensor]:
    """Evaluate the captured ops ``nodes`` (a DAG fed only by ``start``) on a tensor."""
    chain = list(nodes)

    def sub(a, env):
        return env[a] if isinstance(a, fx.Node) else a

    def fn(t: torch.Tensor) -> torch.Tensor:
        env = {start: t}
        for nd in chain:
            args = [sub(a, env) for a in nd.args]
            kwargs = {k: sub(v, env) for k, v in nd.kwargs.items()}
            env[nd] = nd.target(*args, **kwargs)
        return env[out]

    return fn


def _activation(nodes: list[fx.Node], start: fx.Node, out: fx.Node) -> Activation:
    fn = _make_fn(nodes, start, out)
    ops = tuple(str(n.target) for n in nodes)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 7, generator=g, dtype=torch.float64) * 2
    y = fn(t)
    flat = fn(t.reshape(-1))
    perm = torch.randperm(t.numel(), generator=g)
    ok = (
        isinstance(y, torch.Tensor)
        and y.shape == t.shape
        and torch.allclose(flat.reshape(t.shape), y, rtol=1e-13, atol=1e-13)
        and torch.allclose(fn(t.reshape(-1)[perm]), flat[perm], rtol=1e-13, atol=1e-13)
    )
    if not ok:
        raise UnsupportedOperation(
            f"the activation made of {ops} is not elementwise (the same scalar function at every "
            f"coordinate); the μP training limit supports {_SUPPORTED}"
        )
    zero = fn(torch.zeros(1, dtype=torch.float64))
    one = fn(torch.ones(1, dtype=torch.float64))
    a, c = float(one - zero), float(zero)
    scale = 1.0 + t.abs().max().item() * abs(a) + abs(c)
    affine = (a, c) if torch.allclose(y, a * t + c, rtol=0, atol=1e-12 * scale) else None
    return Activation(fn, ops, affine)


def _linear(node: fx.Node, cur: fx.Node, transposed: dict[str, str], cap: Captured) -> LinearLayer:
    if node.target == aten.addmm.default:
        bias, inp, wt = node.args[:3]
        if len(node.args) > 3 or node.kwargs:
            raise _unsupported(node, "a scaled addmm (beta/alpha) is not a plain Linear layer")
    else:
        (inp, wt), bias = node.args[:2], None
    if inp is not cur or not isinstance(wt, fx.Node) or wt.name not in transposed:
        raise _unsupported(node, "a matrix product that is not a Linear layer of the running activation")
    bname = None
    if bias is not None:
        if not isinstance(bias, fx.Node) or bias.name not in cap.param_of:
            raise _unsupported(node, "a Linear bias that is not a parameter")
        bname = cap.param_of[bias.name]
    w = cap.dims[wt.args[0].name]
    fan_out, fan_in = w.small
    axes = set(w.width_axes)
    ratios = dict(zip(w.width_axes, w.ratios))
    if any(abs(r - 1.0) > 1e-12 for r in ratios.values()):
        raise _unsupported(node, f"a layer of size {w.small} at width {cap.widths[0]}: every "
                           "width-sized dimension must equal the width exactly")
    kind = {frozenset({0}): "input", frozenset({0, 1}): "hidden", frozenset({1}): "output"}.get(
        frozenset(axes))
    if kind is None:
        raise _unsupported(node, f"a Linear layer with no width-sized side (shape {w.small})")
    return LinearLayer(transposed[wt.name], bname, fan_in, fan_out, kind)


def mlp_spec(cap: Captured) -> MLPSpec:
    """Read an :class:`MLPSpec` off a captured model, or raise UnsupportedOperation."""
    if len(cap.user_inputs) != 1:
        raise UnsupportedOperation(
            f"the μP training limit supports models of one input tensor [batch, d]; this one takes "
            f"{len(cap.user_inputs)}"
        )
    byname = {n.name: n for n in cap.nodes}
    cur = byname[cap.user_inputs[0]]
    if len(cap.dims[cur.name].small) != 2:
        raise UnsupportedOperation(
            f"the μP training limit supports inputs of shape [batch, d]; got {cap.dims[cur.name].small}"
        )
    transposed: dict[str, str] = {}
    layers: list[LinearLayer] = []
    acts: list[Activation] = []
    chain: list[fx.Node] = []
    chain_start = cur
    region: set[fx.Node] = set()
    out = None
    for node in cap.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            out = node.args[0]
            continue
        args = [a for a in node.args if isinstance(a, fx.Node)]
        if node.target in _TRANSPOSES and args and args[0].name in cap.param_of:
            transposed[node.name] = cap.param_of[args[0].name]
            continue
        if node.target in (aten.addmm.default, aten.mm.default):
            inp = node.args[1] if node.target == aten.addmm.default else node.args[0]
            if layers:
                if inp not in region:
                    raise _unsupported(node, "a Linear layer not fed by the previous layer's activation")
                acts.append(_activation(chain, chain_start, inp))
                cur = inp
            layers.append(_linear(node, cur, transposed, cap))
            cur, chain, chain_start, region = node, [], node, {node}
            continue
        nodes_in = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
        dims = cap.dims.get(node.name)
        same_shape = dims is not None and dims.small == cap.dims[chain_start.name].small
        if layers and nodes_in and all(a in region for a in nodes_in) and same_shape:
            chain.append(node)
            region.add(node)
            cur = node
            continue
        raise _unsupported(node, "an operation that is neither a Linear layer nor an elementwise activation")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if len(outs) != 1 or outs[0] is not chain_start or chain:
        raise UnsupportedOperation(
            f"the μP training limit supports {_SUPPORTED}; the model must return the readout Linear's "
            "output itself (no activation or other op after the last layer)"
        )
    kinds = [lay.kind for lay in layers]
    if len(layers) < 2 or kinds[0] != "input" or kinds[-1] != "output" or any(
            k != "hidden" for k in kinds[1:-1]):
        raise UnsupportedOperation(
            f"the μP training limit supports {_SUPPORTED}; this model's Linear layers are {kinds} "
            "(input = finite fan-in to width, hidden = width to width, output = width to finite)"
        )
    return MLPSpec(tuple(layers), tuple(acts), layers[0].fan_in, layers[-1].fan_out)
