"""The three languages of the Tensor Programs series and their checks.

- ``netsor`` (TP I): no transposed matrices. Every G-var is Gaussian in the limit.
- ``netsorT`` (TP II): transposes only as in backpropagation. Seeds are initial vectors
  that feed some ``W.T @ y`` but no forward ``W @ x`` (readout weights, the "last layer"
  of TP II); the backward part is the seeds, the ``W.T`` outputs and every vector computed
  from them. The program must (1) apply ``W.T`` only to backward vectors, (2) never feed
  a backward vector to a forward ``W @ x``, and (3) be odd in the backward inputs: each
  Nonlin with backward arguments changes sign when they all do (as ``φ'(h) ⊙ dx`` does).
  These are the conditions under which TP II's gradient-independence rule holds.
- ``netsor_transpose`` (Netsor⊤, TP IV): anything, transposes used freely.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ProgramError
from .calling import call_full
from .instructions import Instruction, LinComb, MatMul, Nonlin
from .variables import Scalar, Vector

if TYPE_CHECKING:  # pragma: no cover
    from .program import Program

LANGUAGES = ("netsor", "netsorT", "netsor_transpose")
_ALIASES = {
    "netsor": "netsor",
    "netsort": "netsorT",
    "netsor_t": "netsorT",
    "netsor_transpose": "netsor_transpose",
    "netsor⊤": "netsor_transpose",
    "netsortranspose": "netsor_transpose",
}


def normalize(language: str) -> str:
    key = str(language).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown language {language!r}; choose one of {', '.join(LANGUAGES)}")
    return _ALIASES[key]


def _where(i: int, ins: Instruction) -> str:
    return f"instruction {i + 1} ({ins.describe()})"


def check_instruction(program: Program, ins: Instruction, i: int, language: str) -> None:
    """The part of a language check that needs only the new instruction."""
    if language == "netsor" and isinstance(ins, MatMul) and ins.transpose:
        raise ProgramError(
            f"{_where(i, ins)}: uses a transposed matrix, which Netsor does not allow. Declare "
            "the program as 'netsorT' (backprop-like transposes) or 'netsor_transpose'."
        )


def _ancestors(program: Program, roots: list[Vector]) -> set[int]:
    seen: set[int] = set()
    stack = [v.index for v in roots]
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        stack.extend(v.index for v in program.instructions[i].inputs if isinstance(v, Vector))
    return seen


def _backward_set(program: Program) -> set[int]:
    """Indices of backward vectors: W.T outputs, seeds, and what is computed from them.

    A seed is an initial vector that feeds some ``W.T @ y`` but no forward ``W @ x``
    (a readout weight: the backward pass starts from it).
    """
    ins_list = program.instructions
    forward_inputs = [i.x for i in ins_list if isinstance(i, MatMul) and not i.transpose]
    transposed_inputs = [i.x for i in ins_list if isinstance(i, MatMul) and i.transpose]
    feeds_forward = _ancestors(program, forward_inputs)
    feeds_backward = _ancestors(program, transposed_inputs)
    backward: set[int] = set()
    for i, ins in enumerate(ins_list):
        out = ins.out
        seed = (
            isinstance(out, Vector)
            and out.kind == "init"
            and i in feeds_backward
            and i not in feeds_forward
        )
        if seed or (isinstance(ins, MatMul) and ins.transpose):
            backward.add(i)
        elif isinstance(ins, (LinComb, Nonlin, MatMul)) and any(
            v.index in backward for v in ins.inputs if isinstance(v, Vector)
        ):
            backward.add(i)
    return backward


def _odd_in(ins: Nonlin, backward: set[int]) -> bool:
    gen = torch.Generator().manual_seed(3)
    shapes = [x.shape for x in ins.xs]
    vals = [torch.randn(2, *s, generator=gen, dtype=torch.float64) for s in shapes]
    params = [
        torch.ones(p.shape, dtype=torch.float64) if isinstance(p, Scalar) else p for p in ins.params
    ]
    flipped = [-v if x.index in backward else v for v, x in zip(vals, ins.xs, strict=False)]
    out = call_full(ins.fn, vals, shapes, params, 1)
    out_flipped = call_full(ins.fn, flipped, shapes, params, 1)
    return torch.allclose(out_flipped, -out, rtol=1e-9, atol=1e-12)


def check(program: Program, language: str) -> None:
    """Raise ProgramError naming the first instruction outside ``language``."""
    language = normalize(language)
    for i, ins in enumerate(program.instructions):
        check_instruction(program, ins, i, language)
    if language != "netsorT":
        return
    backward = _backward_set(program)
    for i, ins in enumerate(program.instructions):
        if isinstance(ins, MatMul) and ins.transpose:
            y = ins.x
            if y.index not in backward:
                raise ProgramError(
                    f"{_where(i, ins)}: {y.name} is a forward vector. In NetsorT a transposed "
                    "matrix may only act on backward vectors (computed from a readout vector "
                    "used nowhere in the forward pass); use 'netsor_transpose' for general programs."
                )
        elif isinstance(ins, MatMul) and ins.x.index in backward:
            raise ProgramError(
                f"{_where(i, ins)}: a forward matrix acts on the backward vector {ins.x.name}; "
                "NetsorT allows transposes only as in backpropagation. Use 'netsor_transpose'."
            )
        elif isinstance(ins, Nonlin) and i in backward and not _odd_in(ins, backward):
            raise ProgramError(
                f"{_where(i, ins)}: this Nonlin is not odd in its backward arguments (as "
                "φ'(h)·dx is), which NetsorT's gradient-independence rule needs. Use "
                "'netsor_transpose'."
            )


def infer(program: Program) -> str:
    """The smallest language containing the program."""
    if not any(isinstance(ins, MatMul) and ins.transpose for ins in program.instructions):
        return "netsor"
    try:
        check(program, "netsorT")
    except ProgramError:
        return "netsor_transpose"
    return "netsorT"
