"""``tp.Program``: build a Tensor Program one instruction at a time."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..errors import ProgramError
from . import languages
from .calling import check_linear, is_elementwise, is_linear, known_linear_shape, probe_output_shape
from .functions import function_name
from .instructions import (
    InitMatrix,
    InitVector,
    Instruction,
    LinComb,
    MatMul,
    Moment,
    Nonlin,
    kind_comment,
)
from .variables import Matrix, Scalar, Var, Vector


def _number(value) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _check_positive_finite(value, what: str):
    """A positive finite number; a 0-d tensor stays a tensor (so gradients flow through it)."""
    keep = isinstance(value, torch.Tensor) and value.ndim == 0
    try:
        number = _number(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a real number, got {value!r}") from exc
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {number}. Pass a positive real number.")
    if number <= 0:
        raise ValueError(f"{what} must be positive, got {number}.")
    return value.to(torch.float64) if keep else number


class Program:
    """A Tensor Program: a straight-line list of instructions over vectors in R^n.

    Build with :meth:`matrix`, :meth:`vector`, ``W @ x``, ``W.T @ y``, :meth:`nonlin`,
    :meth:`moment`, :meth:`lincomb`; ``print(P)`` shows one instruction a line.

    Args:
        language: if given (``"netsor"``, ``"netsorT"``, ``"netsor_transpose"``), every
            instruction is checked against it as it is added and :meth:`validate` uses it.
    """

    def __init__(self, language: str | None = None):
        self.declared_language = languages.normalize(language) if language is not None else None
        self.instructions: list[Instruction] = []
        self._names: dict[str, Var] = {}
        self._counter = 0

    # ---------------------------------------------------------------- bookkeeping
    def __len__(self) -> int:
        return len(self.instructions)

    def __iter__(self) -> Iterator[Instruction]:
        return iter(self.instructions)

    def __getitem__(self, name: str) -> Var:
        try:
            return self._names[name]
        except KeyError:
            raise KeyError(f"no variable named {name!r} in this program") from None

    @property
    def variables(self) -> list[Var]:
        return [ins.out for ins in self.instructions]

    @property
    def vectors(self) -> list[Vector]:
        return [v for v in self.variables if isinstance(v, Vector)]

    @property
    def scalars(self) -> list[Scalar]:
        return [v for v in self.variables if isinstance(v, Scalar)]

    @property
    def matrices(self) -> list[Matrix]:
        return [v for v in self.variables if isinstance(v, Matrix)]

    def _fresh(self, name: str | None, prefix: str) -> str:
        if name is not None:
            if not isinstance(name, str) or not name:
                raise ProgramError(f"variable names must be non-empty strings, got {name!r}")
            if name in self._names:
                raise ProgramError(f"the name {name!r} is already used in this program")
            return name
        while True:
            self._counter += 1
            candidate = f"{prefix}{self._counter}"
            if candidate not in self._names:
                return candidate

    def _line(self) -> int:
        return len(self.instructions) + 1

    def _where(self, text: str) -> str:
        return f"instruction {self._line()} ({text})"

    def _require_defined(self, var: Any, where: str, what: str = "argument") -> None:
        if not isinstance(var, Var):
            raise ProgramError(f"{where}: {what} {var!r} is not a variable of a Program.")
        if var.program is not self:
            raise ProgramError(
                f"{where}: {var.name} is not defined in this program (it belongs to another "
                "Program). Build every variable with the same Program."
            )
        if var.index < 0 or var.index >= len(self.instructions) or (
            self.instructions[var.index].out is not var
        ):
            raise ProgramError(f"{where}: {var.name} is used before it is defined.")

    def _append(self, ins: Instruction) -> Var:
        if self.declared_language is not None:
            languages.check_instruction(self, ins, len(self.instructions), self.declared_language)
        ins.out.index = len(self.instructions)
        ins.out.instruction = ins
        self.instructions.append(ins)
        self._names[ins.out.name] = ins.out
        return ins.out

    # ---------------------------------------------------------------- initial variables
    def matrix(
        self,
        name: str | None = None,
        variance: float = 1.0,
        out_ratio: float = 1.0,
        in_ratio: float = 1.0,
    ) -> Matrix:
        """An initial matrix of shape ``(out_ratio·n) × (in_ratio·n)``, entries iid
        N(0, variance / fan_in) with ``fan_in = in_ratio·n``."""
        variance = _check_positive_finite(variance, "matrix variance")
        out_ratio = _check_positive_finite(out_ratio, "matrix out_ratio")
        in_ratio = _check_positive_finite(in_ratio, "matrix in_ratio")
        m = Matrix(self, self._fresh(name, "W"), variance, out_ratio, in_ratio)
        return self._append(InitMatrix(m))  # type: ignore[return-value]

    def vector(
        self,
        name: str | None = None,
        shape: Sequence[int] = (),
        variance: float = 1.0,
        cov: torch.Tensor | None = None,
        ratio: float = 1.0,
    ) -> Vector:
        """An initial vector in R^{ratio·n} with finite shape ``F = shape``.

        Its n coordinates are iid; each coordinate is Gaussian over the finite indices
        with covariance ``cov`` (shape ``[*F, *F]``, positive semidefinite), or
        ``variance·I`` if ``cov`` is None. Initial vectors are independent of each other.
        """
        shape = tuple(int(s) for s in shape)
        if any(s <= 0 for s in shape):
            raise ProgramError(f"vector shape must have positive sizes, got {shape}")
        ratio = _check_positive_finite(ratio, "vector ratio")
        numel = math.prod(shape)
        if cov is None:
            variance = _check_positive_finite(variance, "vector variance")
            cov_t = variance * torch.eye(numel, dtype=torch.float64).reshape(shape + shape)
            desc = f"N(0, {_number(variance):g}) iid"
        else:
            cov_t = torch.as_tensor(cov, dtype=torch.float64)
            if tuple(cov_t.shape) != shape + shape:
                raise ValueError(
                    f"cov must have shape {shape + shape} (the finite shape twice), "
                    f"got {tuple(cov_t.shape)}"
                )
            if not torch.isfinite(cov_t).all():
                raise ValueError("cov contains NaN or Inf; pass a finite covariance matrix.")
            flat = cov_t.reshape(numel, numel)
            if not torch.allclose(flat, flat.T, rtol=1e-10, atol=1e-12):
                raise ValueError("cov is not symmetric; pass (cov + cov.T) / 2 if that is meant.")
            lam = torch.linalg.eigvalsh(flat)
            if lam.min() < -1e-10 * max(1.0, lam.max().item()):
                raise ValueError(
                    f"cov is not positive semidefinite (smallest eigenvalue {lam.min().item():.3g})."
                )
            desc = "N(0, Σ)"
        v = Vector(self, self._fresh(name, "v"), shape, ratio, "init")
        return self._append(InitVector(v, cov_t, desc))  # type: ignore[return-value]

    def input_layer(
        self,
        x: torch.Tensor,
        weight_variance: float = 1.0,
        bias_variance: float = 0.0,
        name: str | None = None,
        ratio: float = 1.0,
    ) -> Vector:
        """The first layer ``h = W x / sqrt(d) + b`` of an MLP on finite inputs, as an initial vector.

        ``x`` has shape ``[N, d]``; the result has finite shape ``(N,)`` and covariance
        ``weight_variance·⟨x_i, x_j⟩/d + bias_variance`` (the fan-in d is finite, so
        this layer is exactly Gaussian at every width).
        """
        x = torch.as_tensor(x, dtype=torch.float64)
        if x.ndim != 2:
            raise ValueError(f"x must have shape [N, d], got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or Inf; clean the inputs before computing limits.")
        wv = _check_positive_finite(weight_variance, "weight_variance")
        if _number(bias_variance) < 0 or not math.isfinite(_number(bias_variance)):
            raise ValueError(f"bias_variance must be finite and >= 0, got {bias_variance}")
        cov = wv * (x @ x.T) / x.shape[1] + bias_variance
        return self.vector(name, shape=(x.shape[0],), cov=cov, ratio=ratio)

    # ---------------------------------------------------------------- instructions
    def matmul(
        self, W: Matrix, x: Vector, transpose: bool = False, name: str | None = None
    ) -> Vector:
        """``W @ x`` (or ``W.T @ x``): a G-var of the same finite shape as x."""
        text = f"{getattr(W, 'name', W)}{'.T' if transpose else ''} @ {getattr(x, 'name', x)}"
        where = self._where(text)
        self._require_defined(W, where, "matrix")
        self._require_defined(x, where, "vector")
        if not isinstance(W, Matrix):
            raise ProgramError(f"{where}: {W.name} is not a matrix.")
        if not isinstance(x, Vector):
            raise ProgramError(f"{where}: {x.name} is not a vector (scalars cannot be multiplied).")
        need = W.out_ratio if transpose else W.in_ratio
        if x.ratio != need:
            raise ProgramError(
                f"{where}: {x.name} lives in R^({x.ratio:g}n) but {text.split(' @')[0]} acts on "
                f"R^({need:g}n): the width classes do not match."
            )
        ratio = W.in_ratio if transpose else W.out_ratio
        out = Vector(self, self._fresh(name, "g"), x.shape, ratio, "G")
        return self._append(MatMul(out, W, x, transpose))  # type: ignore[return-value]

    def linear(
        self,
        fn: Callable[..., torch.Tensor],
        *xs: Vector,
        name: str | None = None,
        label: str = "",
        params: Sequence[Any] = (),
    ) -> Vector:
        """A linear map of Gaussian vectors (may mix finite indices: shifts, pooling, sums).

        ``fn`` is called by the convention of :mod:`tensorprograms.program.calling` and
        must be linear in the vectors; the result is a G-var. ``params`` (Scalars, numbers
        or constant tensors, passed after the vectors) may set the coefficients: NETSOR+
        with deterministic limits, so the output stays Gaussian in the limit.
        """
        where = self._where(label or f"LinComb {function_name(fn)}")
        if not xs:
            raise ProgramError(f"{where}: a LinComb needs at least one vector.")
        for x in xs:
            self._require_defined(x, where, "vector")
            if not isinstance(x, Vector) or not x.is_gaussian:
                raise ProgramError(
                    f"{where}: {x.name} is not a G-var or initial vector; a LinComb combines "
                    "Gaussian vectors only. Use P.nonlin for functions of H-vars."
                )
        self._check_same_width(xs, where)
        _, ps = self._split_args((), params, where)
        shapes = [x.shape for x in xs]
        probe = self._probe_params(ps)
        out_shape = known_linear_shape(fn, shapes, ps)  # linear by construction: no probes
        if out_shape is None:
            out_shape = probe_output_shape(fn, shapes, probe, where)
            check_linear(fn, shapes, where, probe)
        out = Vector(self, self._fresh(name, "g"), out_shape, xs[0].ratio, "G")
        return self._append(LinComb(out, fn, tuple(xs), label, tuple(ps)))  # type: ignore[return-value]

    def lincomb(
        self, coefficients: Sequence[float], xs: Sequence[Vector], name: str | None = None
    ) -> Vector:
        """``Σ_i c_i x_i`` for Gaussian vectors ``x_i`` (finite shapes broadcast)."""
        coefficients = [float(c) for c in coefficients]
        xs = list(xs)
        if len(coefficients) != len(xs):
            raise ProgramError("lincomb needs one coefficient per vector")
        if not all(math.isfinite(c) for c in coefficients):
            raise ValueError(f"lincomb coefficients must be finite, got {coefficients}")

        def combination(*vals):
            total = coefficients[0] * vals[0]
            for c, v in zip(coefficients[1:], vals[1:], strict=False):
                total = total + c * v
            return total

        combination.coefficients = tuple(coefficients)  # lets the engine map one term alone
        label = " + ".join(f"{c:g}·{getattr(x, 'name', x)}" for c, x in zip(coefficients, xs, strict=False))
        return self.linear(combination, *xs, name=name, label=label)

    def _check_same_width(self, xs: Sequence[Vector], where: str) -> None:
        ratios = {x.ratio for x in xs}
        if len(ratios) > 1:
            names = ", ".join(f"{x.name} in R^({x.ratio:g}n)" for x in xs)
            raise ProgramError(
                f"{where}: the vectors live in different width classes ({names}); a coordinatewise "
                "operation needs vectors of the same width."
            )

    def _split_args(self, args: Sequence[Any], params: Sequence[Any], where: str):
        xs = []
        for a in args:
            self._require_defined(a, where, "vector")
            if not isinstance(a, Vector):
                raise ProgramError(
                    f"{where}: {a.name} is a {a.kind} variable; pass scalars with params=(...)."
                )
            xs.append(a)
        ps: list[Any] = []
        for p in params:
            if isinstance(p, Var):
                self._require_defined(p, where, "parameter")
                if not isinstance(p, Scalar):
                    raise ProgramError(f"{where}: parameter {p.name} is not a scalar.")
                ps.append(p)
            elif isinstance(p, (int, float)):
                if not math.isfinite(p):
                    raise ValueError(f"{where}: constant parameter {p} is not finite.")
                ps.append(float(p))
            elif isinstance(p, torch.Tensor):
                if not torch.isfinite(p).all():
                    raise ValueError(f"{where}: a constant tensor parameter has NaN or Inf.")
                ps.append(p.to(torch.float64))
            else:
                raise ProgramError(f"{where}: parameter {p!r} must be a Scalar, number or tensor.")
        return xs, ps

    @staticmethod
    def _probe_params(ps: Sequence[Any]) -> list[Any]:
        # Scalars' limits are unknown while building; positive stand-ins of the right shape
        # are enough to learn shapes and structure.
        return [torch.ones(p.shape, dtype=torch.float64) if isinstance(p, Scalar) else p for p in ps]

    def _prepare(self, fn, xs, params, elementwise, text: str, kind: str):
        """Check a Nonlin/Moment's arguments and probe its function: shapes, elementwise."""
        where = self._where(text)
        if not callable(fn):
            raise ProgramError(f"{where}: {fn!r} is not callable.")
        vecs, ps = self._split_args(xs, params, where)
        if not vecs:
            raise ProgramError(f"{where}: a {kind} needs at least one vector argument.")
        self._check_same_width(vecs, where)
        shapes = [x.shape for x in vecs]
        probe_ps = self._probe_params(ps)
        known = known_linear_shape(fn, shapes, ps)
        if known is not None:  # a selection or matrix map: linear, not elementwise, no probes
            return vecs, ps, shapes, known, bool(elementwise)
        out_shape = probe_output_shape(fn, shapes, probe_ps, where)
        if elementwise is None:
            elementwise = is_elementwise(fn, shapes, probe_ps, out_shape)
        return vecs, ps, shapes, out_shape, bool(elementwise)

    def nonlin(
        self,
        fn: Callable[..., torch.Tensor],
        *xs: Vector,
        params: Sequence[Any] = (),
        name: str | None = None,
        elementwise: bool | None = None,
    ) -> Vector:
        """``fn(*xs, *params)``, coordinatewise in the width index: an H-var.

        ``fn`` may mix finite indices freely (a softmax over positions, a convolution's
        shifts). ``params`` are Scalars (Moment outputs), numbers or constant tensors.
        ``elementwise`` (None: detected by probing) says fn is one scalar function at
        every finite index, which lets the engine use low-dimensional expectations.
        """
        vecs, ps, shapes, out_shape, elementwise = self._prepare(
            fn, xs, params, elementwise, f"{function_name(fn)}(…)", "Nonlin"
        )
        out = Vector(self, self._fresh(name, "x"), out_shape, vecs[0].ratio, "H")
        linear = not ps and (known_linear_shape(fn, shapes, ps) is not None or is_linear(fn, shapes))
        ins = Nonlin(out, fn, tuple(vecs), tuple(ps), bool(elementwise), linear=linear)
        return self._append(ins)  # type: ignore[return-value]

    def moment(
        self,
        fn: Callable[..., torch.Tensor],
        *xs: Vector,
        params: Sequence[Any] = (),
        name: str | None = None,
        elementwise: bool | None = None,
    ) -> Scalar:
        """``(1/n) Σ_α fn(xs_α, params)``: a scalar (finite shape = fn's output shape)."""
        vecs, ps, shapes, out_shape, elementwise = self._prepare(
            fn, xs, params, elementwise, f"Moment {function_name(fn)}(…)", "Moment"
        )
        out = Scalar(self, self._fresh(name, "θ"), out_shape)
        ins = Moment(out, fn, tuple(vecs), tuple(ps), bool(elementwise))
        return self._append(ins)  # type: ignore[return-value]

    def _arith(self, fn, symbol: str, a: Vector, b: Any, reverse: bool = False) -> Vector:
        """Operators on vectors: Gaussian-preserving ones become LinCombs, others Nonlins."""
        if b is None:  # negation
            if a.is_gaussian:
                return self.lincomb([-1.0], [a])
            return self.nonlin(lambda u: -u, a)
        label_a, label_b = a.name, getattr(b, "name", repr(b))
        if reverse:
            label_a, label_b = label_b, label_a
        if isinstance(b, (int, float)) and symbol in ("*", "/") and a.is_gaussian:
            c = float(b) if symbol == "*" else 1.0 / float(b)
            if reverse and symbol == "/":
                return self.nonlin(lambda u: float(b) / u, a)
            return self.lincomb([c], [a])
        if isinstance(b, Vector):
            if symbol in ("+", "-") and a.is_gaussian and b.is_gaussian:
                sign = -1.0 if symbol == "-" else 1.0
                first, second = (b, a) if reverse else (a, b)
                return self.lincomb([1.0, sign], [first, second])
            return self.nonlin(fn, a, b)
        if isinstance(b, Scalar):
            return self.nonlin(fn, a, params=(b,))
        if isinstance(b, (int, float)):
            return self.nonlin(lambda u: fn(u, float(b)), a)
        return NotImplemented

    # ---------------------------------------------------------------- languages
    @property
    def language(self) -> str:
        """The smallest language (netsor ⊂ netsorT ⊂ netsor_transpose) containing the program."""
        return languages.infer(self)

    def validate(self, language: str | None = None) -> Program:
        """Check that the program is well formed and inside ``language``.

        Raises:
            ProgramError: naming the offending instruction.
        """
        lang = languages.normalize(language) if language is not None else self.declared_language
        for i, ins in enumerate(self.instructions):
            where = f"instruction {i + 1} ({ins.describe()})"
            for v in ins.inputs:
                if v.program is not self:
                    raise ProgramError(f"{where}: {v.name} is not defined in this program.")
                if v.index >= i or v.index < 0:
                    raise ProgramError(f"{where}: {v.name} is used before it is defined.")
        if lang is not None:
            languages.check(self, lang)
        return self

    # ---------------------------------------------------------------- printing
    def __str__(self) -> str:
        lines = [f"Program ({self.language}, {len(self.instructions)} instructions)"]
        body = [ins.describe() for ins in self.instructions]
        width = max((len(b) for b in body), default=0)
        for i, (ins, b) in enumerate(zip(self.instructions, body, strict=False)):
            lines.append(f"{i + 1:>4}  {b.ljust(width)}   # {kind_comment(ins.out)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<tp.Program: {len(self.instructions)} instructions, {self.language}>"
