"""Instructions of a Tensor Program: one defines one variable."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .functions import function_name
from .variables import Matrix, Scalar, Var, Vector


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(s) for s in shape) + "]"


def _fmt_width(ratio: float) -> str:
    return "n" if ratio == 1.0 else f"{ratio:g}n"


@dataclass(eq=False)
class Instruction:
    out: Var

    @property
    def inputs(self) -> tuple[Var, ...]:
        return ()

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(eq=False)
class InitMatrix(Instruction):
    out: Matrix

    def describe(self) -> str:
        m = self.out
        return (
            f"{m.name} : Matrix {_fmt_width(m.out_ratio)}×{_fmt_width(m.in_ratio)}, "
            f"entries N(0, {float(torch.as_tensor(m.variance).detach()):g}/fan_in)"
        )


@dataclass(eq=False)
class InitVector(Instruction):
    """An initial vector: iid coordinates, Gaussian across finite indices with covariance ``cov``.

    ``cov`` has shape ``[*F, *F]``.
    """

    out: Vector
    cov: torch.Tensor = field(repr=False)
    description: str = ""

    def describe(self) -> str:
        v = self.out
        law = self.description or "N(0, Σ)"
        return f"{v.name} : Vector{_fmt_shape(v.shape)} in R^{_fmt_width(v.ratio)}, initial, {law}"


@dataclass(eq=False)
class MatMul(Instruction):
    matrix: Matrix
    x: Vector
    transpose: bool = False

    @property
    def inputs(self):
        return (self.matrix, self.x)

    def describe(self) -> str:
        w = f"{self.matrix.name}.T" if self.transpose else self.matrix.name
        return f"{self.out.name} = {w} @ {self.x.name}"


@dataclass(eq=False)
class LinComb(Instruction):
    """A linear map of Gaussian vectors (may mix finite indices).

    ``params`` (NETSOR+): Scalars (or constants) the coefficients depend on, passed after
    the vectors as in a Nonlin. The map must be linear in the vectors for every value of
    the params; since the Scalars converge to deterministic limits, the output's limit
    ``L_θ̊(Z^{xs})`` is a linear map of Gaussians, hence Gaussian (attention outputs
    ``Σ_j a_ij v_j`` with deterministic weights a).
    """

    fn: Callable[..., torch.Tensor]
    xs: tuple[Vector, ...]
    label: str = ""
    params: tuple[Any, ...] = ()

    @property
    def inputs(self):
        return self.xs + tuple(p for p in self.params if isinstance(p, Scalar))

    def describe(self) -> str:
        body = self.label or f"{function_name(self.fn)}({', '.join(x.name for x in self.xs)})"
        return f"{self.out.name} = LinComb {body}"


@dataclass(eq=False)
class Nonlin(Instruction):
    """``out = fn(*xs, *params)``, coordinatewise in the width index.

    ``params`` are Scalars (deterministic in the limit) or constants.
    ``elementwise``: fn is the same scalar function at every finite index too.
    """

    fn: Callable[..., torch.Tensor]
    xs: tuple[Vector, ...]
    params: tuple[Any, ...] = ()
    elementwise: bool = False
    label: str = ""
    linear: bool = False  # no params, fn linear in its vectors (a gather, a pooling, a concatenation)

    @property
    def inputs(self):
        return self.xs + tuple(p for p in self.params if isinstance(p, Scalar))

    def describe(self) -> str:
        args = [x.name for x in self.xs] + [
            p.name if isinstance(p, Var) else f"{p:g}" if isinstance(p, float) else "const"
            for p in self.params
        ]
        body = self.label or f"{function_name(self.fn)}({', '.join(args)})"
        return f"{self.out.name} = {body}"


@dataclass(eq=False)
class Moment(Instruction):
    """``out = (1/n) Σ_α fn(xs_α, params)``: a scalar, deterministic in the limit."""

    fn: Callable[..., torch.Tensor]
    xs: tuple[Vector, ...]
    params: tuple[Any, ...] = ()
    elementwise: bool = False

    @property
    def inputs(self):
        return self.xs + tuple(p for p in self.params if isinstance(p, Scalar))

    def describe(self) -> str:
        args = [x.name for x in self.xs] + [
            p.name if isinstance(p, Var) else "const" for p in self.params
        ]
        return f"{self.out.name} = Moment {function_name(self.fn)}({', '.join(args)})"


def kind_comment(v: Var) -> str:
    if isinstance(v, Vector):
        kind = {"init": "initial", "G": "G-var", "H": "H-var"}[v.kind]
        return f"{kind} {_fmt_shape(v.shape)}"
    if isinstance(v, Scalar):
        return f"scalar {_fmt_shape(v.shape)}"
    return "matrix"
