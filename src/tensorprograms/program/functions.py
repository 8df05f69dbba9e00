"""Named nonlinearities the engine recognises (closed forms exist for these).

Any torch callable may be used as a Nonlin; these are only the ones whose Gaussian
expectations the closed-form backend knows. ``torch.relu``, ``torch.erf``,
``torch.sin`` … are recognised too, so users rarely need this module.
"""

from __future__ import annotations

import math

import torch


class Elementwise:
    """A scalar function applied to every coordinate (and every finite index).

    Subclasses are plain callables on tensors of any shape; ``name`` is what
    ``print(program)`` shows.
    """

    name: str = "elementwise"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class _Relu(Elementwise):
    name = "relu"

    def __call__(self, x):
        return torch.relu(x)


class _Step(Elementwise):
    """Heaviside step, 1 for x > 0 and 0 otherwise (ReLU's derivative)."""

    name = "step"

    def __call__(self, x):
        return (x > 0).to(x.dtype)


class _Identity(Elementwise):
    name = "identity"

    def __call__(self, x):
        return x


class _Abs(Elementwise):
    name = "abs"

    def __call__(self, x):
        return torch.abs(x)


class _Erf(Elementwise):
    name = "erf"

    def __call__(self, x):
        return torch.erf(x)


class _Sin(Elementwise):
    name = "sin"

    def __call__(self, x):
        return torch.sin(x)


class _Cos(Elementwise):
    name = "cos"

    def __call__(self, x):
        return torch.cos(x)


class _Exp(Elementwise):
    name = "exp"

    def __call__(self, x):
        return torch.exp(x)


class LeakyReLU(Elementwise):
    """``max(x, 0) + slope * min(x, 0)``."""

    def __init__(self, slope: float = 0.01):
        if not math.isfinite(slope):
            raise ValueError(f"LeakyReLU slope must be finite, got {slope}")
        self.slope = float(slope)
        self.name = f"leaky_relu[{self.slope:g}]"

    def __call__(self, x):
        return torch.nn.functional.leaky_relu(x, self.slope)


class Affine(Elementwise):
    """``scale * x + shift``."""

    def __init__(self, scale: float = 1.0, shift: float = 0.0):
        if not (math.isfinite(scale) and math.isfinite(shift)):
            raise ValueError(f"Affine scale and shift must be finite, got {scale}, {shift}")
        self.scale = float(scale)
        self.shift = float(shift)
        self.name = f"affine[{self.scale:g}x+{self.shift:g}]"

    def __call__(self, x):
        return self.scale * x + self.shift


class _Product(Elementwise):
    """``a * b``: recognised by the engine, which factors E[(u v) ⊗ (u' v')] into
    E[u ⊗ u'] ⊙ E[v ⊗ v'] when the u's and the v's are independent."""

    name = "product"

    def __call__(self, a, b):
        return a * b


class Outer:
    """``(x, y) ↦ x ⊗ y`` over the finite indices, flattened: shape ``[*batch, |F_x|, |F_y|]``.

    As a Moment, ``(1/n) Σ_α x_α ⊗ y_α`` (a width contraction between two activations,
    e.g. attention logits ``q·k``); the engine takes its limit as the second moment
    ``E[Z^x ⊗ Z^y]`` (exact for G-vars, cached) instead of a joint expectation.
    """

    name = "outer"

    def __init__(self, shape_x: tuple[int, ...], shape_y: tuple[int, ...]):
        self.shape_x, self.shape_y = tuple(shape_x), tuple(shape_y)
        self.rank = max(len(self.shape_x), len(self.shape_y))

    def __call__(self, x, y):
        batch = x.shape[: x.ndim - self.rank]
        nx, ny = math.prod(self.shape_x), math.prod(self.shape_y)
        return x.reshape(*batch, nx, 1) * y.reshape(*batch, 1, ny)


product = _Product()
relu = _Relu()
step = _Step()
identity = _Identity()
abs = _Abs()  # noqa: A001 - mirrors torch.abs
erf = _Erf()
sin = _Sin()
cos = _Cos()
exp = _Exp()


def leaky_relu(slope: float = 0.01) -> LeakyReLU:
    """The leaky ReLU with the given negative-side slope."""
    return LeakyReLU(slope)


def affine(scale: float = 1.0, shift: float = 0.0) -> Affine:
    """``x ↦ scale·x + shift``."""
    return Affine(scale, shift)


def function_name(fn: object) -> str:
    """A short printable name for any callable."""
    if isinstance(fn, Elementwise):
        return fn.name
    name = getattr(fn, "__name__", None)
    if name is None:
        name = type(fn).__name__
    if name == "<lambda>":
        return "φ"
    return str(name).removesuffix(".default")  # ATen overloads: aten.relu.default -> relu
