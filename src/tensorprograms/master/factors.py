"""Vectors and Moments as functions of the Gaussian G-vars they depend on.

In the limit every vector is ``Z^x = f(Z^{g_1}, …, Z^{g_k})`` for G-vars ``g_i`` (compose
the Nonlins back to Gaussian vectors). A :class:`Factor` holds ``f`` in one of two forms:

- **flat** (only when every Nonlin on the way is elementwise): output index ``a``
  depends on the scalars ``Z^{g_i}[map_i[a]]``, so an expectation over index pairs
  needs only a (k_x + k_y)-dimensional Gaussian per pair, vectorized over pairs;
- **joint**: ``f`` acts on the full finite-shaped values of its G-vars (any Nonlin).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..program.calling import call_full
from ..program.instructions import Moment, Nonlin
from ..program.variables import Scalar, Vector
from . import closed_form

Place = Callable[[torch.Tensor], torch.Tensor]


class NotElementwise(Exception):
    """Raised while building a flat factor through a Nonlin that mixes finite indices."""


@dataclass
class Factor:
    shape: tuple[int, ...]
    leaves: list[Vector]
    maps: list[torch.Tensor] | None  # flat mode: per leaf, output flat index -> leaf flat index
    run: Callable[..., torch.Tensor] = field(repr=False)
    terms: closed_form.Terms | None = None  # closed form: f = terms(single leaf)
    target: Any = field(default=None, repr=False)  # the Vector or Moment it computes

    @property
    def flat(self) -> bool:
        return self.maps is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def broadcast_map(src: tuple[int, ...], dst: tuple[int, ...]) -> torch.Tensor:
    """For each flat index of ``dst``, the flat index of ``src`` that broadcasts to it."""
    idx = torch.arange(math.prod(src)).reshape((1,) * (len(dst) - len(src)) + tuple(src))
    return idx.expand(tuple(dst)).reshape(-1)


class FactorBuilder:
    """Builds factors; ``scalar_value(θ)`` gives the limit of a Scalar (a tensor ``[*F_θ]``)."""

    def __init__(self, scalar_value: Callable[[Scalar], torch.Tensor]):
        self.scalar_value = scalar_value

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _spec(target: Vector | Moment):
        """(fn, xs, params, elementwise, shape) of a Nonlin-like target, or None if Gaussian."""
        if isinstance(target, Moment):
            return target.fn, target.xs, target.params, target.elementwise, target.out.shape
        if target.is_gaussian:
            return None
        ins = target.instruction
        assert isinstance(ins, Nonlin)
        return ins.fn, ins.xs, ins.params, ins.elementwise, target.shape

    def _terms(self, target: Vector | Moment) -> closed_form.Terms | None:
        spec = self._spec(target)
        if spec is None:
            return closed_form.terms_of(None)
        fn, xs, params, _, _ = spec
        if len(xs) == 1 and xs[0].is_gaussian and not params:
            return closed_form.terms_of(fn)
        return None

    def _param_values(self, params) -> list[Any]:
        return [self.scalar_value(p) if isinstance(p, Scalar) else p for p in params]

    # ------------------------------------------------------------------ flat
    def flat(self, target: Vector | Moment) -> Factor | None:
        """The flat factor, or None if some Nonlin on the way mixes finite indices."""
        leaves: list[Vector] = []
        maps: list[torch.Tensor] = []
        keys: dict[tuple, int] = {}

        def leaf(v: Vector, omap: torch.Tensor):
            key = (v, omap.numpy().tobytes())
            if key not in keys:
                keys[key] = len(leaves)
                leaves.append(v)
                maps.append(omap)
            i = keys[key]
            return lambda vals, place: vals[i]

        def node(spec, omap: torch.Tensor):
            fn, xs, params, elementwise, shape = spec
            if not elementwise:
                raise NotElementwise
            children = [build(x, broadcast_map(x.shape, shape)[omap]) for x in xs]
            pvals = []
            for _p, val in zip(params, self._param_values(params), strict=False):
                if isinstance(val, torch.Tensor):
                    pvals.append(val.reshape(-1)[broadcast_map(tuple(val.shape), shape)[omap]])
                else:
                    pvals.append(val)

            def run(vals, place: Place):
                args = [c(vals, place) for c in children]
                ps = [place(p) if isinstance(p, torch.Tensor) else p for p in pvals]
                return fn(*args, *ps)

            return run

        def build(v: Vector, omap: torch.Tensor):
            spec = self._spec(v)
            return leaf(v, omap) if spec is None else node(spec, omap)

        shape = target.out.shape if isinstance(target, Moment) else target.shape
        omap = torch.arange(math.prod(shape))
        try:
            spec = self._spec(target)
            run = leaf(target, omap) if spec is None else node(spec, omap)
        except NotElementwise:
            return None
        terms = self._terms(target) if len(leaves) == 1 else None
        return Factor(tuple(shape), leaves, maps, run, terms, target)

    # ------------------------------------------------------------------ joint
    def joint(self, target: Vector | Moment) -> Factor:
        """The joint factor: ``run(vals)`` maps leaf values ``[Q, *F_g]`` to ``[Q, *F_out]``."""
        leaves: list[Vector] = []
        index: dict[Vector, int] = {}

        def build(v: Vector):
            spec = self._spec(v)
            if spec is None:
                if v not in index:
                    index[v] = len(leaves)
                    leaves.append(v)
                i = index[v]
                return lambda vals, memo: vals[i]
            return node(spec, v)

        def node(spec, key):
            fn, xs, params, _, _ = spec
            children = [build(x) for x in xs]
            shapes = [x.shape for x in xs]
            pvals = self._param_values(params)

            def run(vals, memo):
                if key is not None and key in memo:
                    return memo[key]
                out = call_full(fn, [c(vals, memo) for c in children], shapes, pvals, 1)
                if key is not None:
                    memo[key] = out
                return out

            return run

        spec = self._spec(target)
        inner = build(target) if spec is None else node(spec, None)
        shape = target.out.shape if isinstance(target, Moment) else target.shape
        return Factor(tuple(shape), leaves, None, lambda vals: inner(vals, {}), self._terms(target), target)
