"""What each node of a captured graph stands for while it is lowered to a Tensor Program."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..program.variables import Scalar, Vector


@dataclass
class Data:
    """A finite, deterministic tensor: the user's inputs and what is computed from them alone."""

    value: torch.Tensor


class Vec:
    """A width-sized activation: a TP vector plus its torch layout.

    ``shape`` is the torch shape at the small width and ``axis`` the width axis; the TP
    variable's finite shape is ``shape`` without ``axis``. ``iid_outputs``: the axis is not
    a width but the model's finite output axis, whose entries are iid in the limit (the
    per-output kernel); such a Vec cannot be averaged over or multiplied by a matrix.

    A Vec made by pointwise ops is *pending*: ``expr = (fn, bases, scalars)`` with
    ``fn(*base_values, *scalar_values)``; chains of pointwise ops are fused into one Nonlin
    (so boolean masks and other intermediates never become program variables), created
    when something other than a pointwise op needs the variable (``.var``).
    """

    def __init__(self, var, shape, axis, iid_outputs=False, expr=None, commit=None):
        self._var = var
        self.shape = tuple(shape)
        self.axis = axis
        self.iid_outputs = iid_outputs
        self.expr = expr
        self._commit = commit

    @property
    def var(self) -> Vector:
        if self._var is None:
            self._var = self._commit(self)
        return self._var

    @property
    def pending(self) -> bool:
        return self._var is None

    @property
    def finite_shape(self) -> tuple[int, ...]:
        return self.shape[: self.axis] + self.shape[self.axis + 1 :]


@dataclass
class Sca:
    """A deterministic limit computed from the program's scalars: ``fn(*values(scalars))``.

    ``shape`` is its torch shape; ``axis`` the reduced width axis if kept (size 1) or None.
    ``fn`` returns a tensor of the TP shape (torch shape without ``axis``).
    """

    scalars: tuple[Scalar, ...]
    fn: Callable[..., torch.Tensor] = field(repr=False)
    shape: tuple[int, ...] = ()
    axis: int | None = None


@dataclass
class Param:
    """A parameter (or buffer) of the user's module."""

    name: str
    node: str  # placeholder node name
    shape: tuple[int, ...]
    width_axes: tuple[int, ...]


@dataclass
class ParamT:
    """``W.T`` of a 2-D parameter (how ``nn.Linear`` appears in core ATen)."""

    param: Param


@dataclass
class ParamTB(ParamT):
    """``W.T`` expanded over a leading batch dim: how ``nn.Linear`` on a 3-D input and
    batch-first recurrent input projections export (``bmm(x, expand(W.T))``)."""


@dataclass
class Tuple_:
    items: tuple


@dataclass
class Merged:
    """A width axis flattened together with finite dims (``torch.flatten(h, 1)`` of a conv
    feature map): the vector in R^{C·M} is M vectors of R^C, one per merged position.

    ``parts[p]`` is the Vec of position p (finite shape = the output's other dims).
    """

    parts: list[Vec]
    shape: tuple[int, ...]
    axis: int


@dataclass
class Concat:
    """Activations concatenated along the width axis: a vector of R^{(α_1+…+α_k)n} made of
    k blocks. A following linear layer splits into one matrix per block."""

    parts: list[Vec]
    sizes: list[int]  # block sizes at the small width
    shape: tuple[int, ...]
    axis: int


@dataclass
class NodeView:
    """A graph node seen with another shape: one block of a width concatenation, to which
    a rule applies the node's op (``target``) with the block's ``shape`` and width ``axis``."""

    node: Any
    shape: tuple[int, ...]
    axis: int

    @property
    def target(self):
        return self.node.target

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def meta(self) -> dict:
        return self.node.meta
