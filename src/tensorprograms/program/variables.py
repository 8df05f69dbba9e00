"""Variables of a Tensor Program.

A vector variable of finite shape ``F`` stands for ``|F|`` vectors in ``R^{αn}``
(one per finite index: batch element, position, head …). Its value at width n is a
tensor of shape ``[αn, *F]``: the width index always comes first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .instructions import Instruction
    from .program import Program


class Var:
    """Base class of program variables; created only by a :class:`Program`."""

    kind: str = "var"

    def __init__(self, program: Program, name: str, shape: tuple[int, ...]):
        self.program = program
        self.name = name
        self.shape = tuple(int(s) for s in shape)
        self.index = -1  # position of the defining instruction, set by the program
        self.instruction: Instruction | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, shape={self.shape})"

    __hash__ = object.__hash__


class Matrix(Var):
    """An initial ``(out_ratio·n) × (in_ratio·n)`` matrix with iid N(0, variance/fan_in) entries."""

    kind = "A"

    def __init__(self, program, name, variance: float, out_ratio: float, in_ratio: float):
        super().__init__(program, name, ())
        self.variance = variance
        self.out_ratio = out_ratio
        self.in_ratio = in_ratio

    @property
    def T(self) -> Transposed:  # noqa: N802 - mirrors torch
        """The transpose, for ``W.T @ y`` (Netsor⊤)."""
        return Transposed(self)

    def __matmul__(self, x: Vector) -> Vector:
        return self.program.matmul(self, x)


class Transposed:
    """``W.T``: only meaningful as the left operand of ``@``."""

    def __init__(self, matrix: Matrix):
        self.matrix = matrix

    def __matmul__(self, y: Vector) -> Vector:
        return self.matrix.program.matmul(self.matrix, y, transpose=True)

    def __repr__(self) -> str:
        return f"{self.matrix.name}.T"


class Vector(Var):
    """A vector variable: initial (``"init"``), G-var (``"G"``) or H-var (``"H"``)."""

    def __init__(self, program, name, shape, ratio: float, kind: str):
        super().__init__(program, name, shape)
        self.ratio = ratio
        self.kind = kind

    @property
    def is_gaussian(self) -> bool:
        """True for initial vectors and G-vars: their limits Z are jointly Gaussian."""
        return self.kind in ("init", "G")

    # Linear combinations of Gaussian vectors stay G-vars; anything else is a Nonlin.
    def __add__(self, other):
        return self.program._arith(lambda a, b: a + b, "+", self, other)

    def __radd__(self, other):
        return self.program._arith(lambda a, b: b + a, "+", self, other, reverse=True)

    def __sub__(self, other):
        return self.program._arith(lambda a, b: a - b, "-", self, other)

    def __rsub__(self, other):
        return self.program._arith(lambda a, b: b - a, "-", self, other, reverse=True)

    def __mul__(self, other):
        return self.program._arith(lambda a, b: a * b, "*", self, other)

    def __rmul__(self, other):
        return self.program._arith(lambda a, b: b * a, "*", self, other, reverse=True)

    def __truediv__(self, other):
        return self.program._arith(lambda a, b: a / b, "/", self, other)

    def __neg__(self):
        return self.program._arith(lambda a, b: -a, "-", self, None)


class Scalar(Var):
    """A scalar variable (output of a Moment): deterministic in the limit, finite shape F."""

    kind = "scalar"
