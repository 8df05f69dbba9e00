"""``tp.infinite_width``: the infinite-width limit of a PyTorch model."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..errors import UnsupportedOperation
from ..master import master_theorem
from ..program.program import Program
from .capture import Captured, capture
from .init_reader import read_initialization
from .lower import Lowering
from .ntk import ntk_of
from .values import Vec

PARAMETRIZATIONS = ("ntk", "standard")


def _as_tuple(inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (list, tuple)) and all(isinstance(x, torch.Tensor) for x in inputs):
        return tuple(inputs)
    raise TypeError("example_inputs must be a tensor or a tuple of tensors (batch on dim 0)")


def _check_finite(xs: Sequence[torch.Tensor], what: str) -> None:
    for i, x in enumerate(xs):
        if not torch.isfinite(x).all():
            raise ValueError(f"{what}[{i}] contains NaN or Inf; clean the inputs first.")


class InfiniteWidthLimit:
    """The n → ∞ limit of ``factory(width)`` (see :func:`infinite_width`)."""

    def __init__(
        self,
        factory: Callable[[int], torch.nn.Module],
        example_inputs: tuple[torch.Tensor, ...],
        parametrization: str,
        widths: tuple[int, int],
        variances: Mapping[str, Any] | None,
    ):
        self.factory = factory
        self.example_inputs = example_inputs
        self.parametrization = parametrization
        self.widths = widths
        self.variances = dict(variances) if variances is not None else None
        self.inits = read_initialization(factory, widths, variances=variances)
        self.hyperparameters = self._default_hyperparameters()
        self._captured: dict[tuple, Captured] = {}
        self._programs: dict[tuple, tuple[Program, Vec]] = {}
        self.program, self.output = self._lower(example_inputs)

    def __reduce__(self):
        """Pickles as its recipe (factory, inputs, settings, current σ² values) and is rebuilt
        on unpickling, e.g. on Dask workers: captured graphs are not portable. The factory
        must itself pickle (a module-level class or function, or a functools.partial)."""
        hyper = {k: v.detach().clone() for k, v in self.hyperparameters.items()}
        # settings added to the constructor later travel by keyword when present
        extra = {k: getattr(self, k) for k in ("nominal_width",) if hasattr(self, k)}
        return (_rebuild, (self.factory, self.example_inputs, self.parametrization, self.widths,
                           self.variances, hyper, extra))

    def _default_hyperparameters(self) -> dict[str, torch.Tensor]:
        """σ² per parameter: per-entry variance × fan-in (weights), the variance (biases).

        Read from the code at the smaller width. Replace or set ``requires_grad`` on these
        0-d float64 tensors to differentiate the kernels (e.g. a GP marginal likelihood)."""
        out = {}
        for name, init in self.inits.items():
            shape = init.shapes[0]
            fan_in = math.prod(shape[1:]) if len(shape) >= 2 else 1
            out[name] = torch.tensor(float(init.variances[0]) * fan_in, dtype=torch.float64)
        return out

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> Captured:
        key = tuple(tuple(x.shape) for x in inputs)
        if key not in self._captured:
            self._captured[key] = capture(self.factory, inputs, self.widths)
        return self._captured[key]

    def _lower(self, inputs: tuple[torch.Tensor, ...]) -> tuple[Program, Vec]:
        inputs = tuple(x.to(torch.float64) for x in inputs)
        captured = self._capture(tuple(x.detach() for x in inputs))
        low = Lowering(captured, inputs, self.inits, self.hyperparameters)
        out = low.run()
        self._lowering = low
        if not isinstance(out, Vec) or not out.iid_outputs:
            raise ValueError(
                "the model's output is not a readout of width-sized features (e.g. a final "
                "nn.Linear(width, k)); the infinite-width limit is defined per output unit."
            )
        return low.program, out

    def _inputs(self, x1, x2) -> tuple[tuple[torch.Tensor, ...], int]:
        xs1 = _as_tuple(x1)
        xs2 = _as_tuple(x2) if x2 is not None else None
        for xs, name in ((xs1, "x1"), (xs2, "x2")):
            if xs is None:
                continue
            _check_finite(xs, name)
            if len(xs) != len(self.example_inputs) or any(
                a.shape[1:] != b.shape[1:] for a, b in zip(xs, self.example_inputs)
            ):
                got = [tuple(a.shape) for a in xs]
                want = [("N", *b.shape[1:]) for b in self.example_inputs]
                raise ValueError(f"{name} has shapes {got}; the model takes {want} (batch first).")
        if xs2 is None:
            return xs1, xs1[0].shape[0]
        return tuple(torch.cat([a, b]) for a, b in zip(xs1, xs2)), xs1[0].shape[0]

    def ntk(self, x1, x2=None) -> torch.Tensor:
        """The NTK ``[N1, N2]`` (float64, NTK parametrization, per output unit).

        Built by TP II's construction: the backward pass appended to the forward program,
        Θ = Σ over parameters and pairs of their uses of E[dh dh'] ⊙ Cov(h, h').
        """
        return self.kernels(x1, x2)[1]

    def kernels(self, x1, x2=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(nngp, ntk)``, each ``[N1, N2]``, from one program (the NTK's forward part is the
        NNGP's program, so the work is shared)."""
        if self.parametrization != "ntk":
            raise ValueError(
                "limit.ntk is implemented for parametrization='ntk'; the standard "
                "parametrization's NTK convention is not defined here yet."
            )
        xs, n1 = self._inputs(x1, x2)
        program, out = self._lower(xs)
        batch = xs[0].shape[0]
        if out.var.shape != (batch,):
            raise ValueError("the NTK needs a [batch, k] output (per-output kernel)")
        low = self._lowering
        model = self._capture(xs).modules[0]
        grads = {name: p.requires_grad for name, p in model.named_parameters()}
        frozen_folded = [n for n in low.folded if grads.get(n, False)]
        if frozen_folded:
            raise UnsupportedOperation(
                f"NTK: the trainable LayerNorm parameters {frozen_folded} are not part of the "
                "NTK construction yet; use nn.LayerNorm(..., elementwise_affine=False) or set "
                "their requires_grad=False."
            )
        if not any(grads.get(low.param_of.get(v), False) for v in program.variables):
            raise ValueError("the model has no trainable parameters: its NTK is zero.")
        theta, limit = ntk_of(program, out.var, batch, master_theorem,
                              trainable=lambda v: grads.get(low.param_of.get(v), False))
        K = _per_example(limit.second_moment(out.var), batch)
        if x2 is None:
            return K, theta
        return K[:n1, n1:], theta[:n1, n1:]

    def nngp(self, x1, x2=None) -> torch.Tensor:
        """The NNGP kernel ``[N1, N2]`` (float64): ``E[f(x1) f(x2)]`` of one output unit."""
        xs, n1 = self._inputs(x1, x2)
        program, out = self._lower(xs)
        K = _per_example(master_theorem(program).second_moment(out.var), xs[0].shape[0])
        return K if x2 is None else K[:n1, n1:]


def _rebuild(factory, example_inputs, parametrization, widths, variances, hyper, extra) -> InfiniteWidthLimit:
    limit = InfiniteWidthLimit(factory, example_inputs, parametrization, widths, variances, **extra)
    limit.hyperparameters = hyper
    return limit


def _per_example(K: torch.Tensor, batch: int) -> torch.Tensor:
    """Reduce ``[N, *rest, N, *rest]`` to ``[N, N]`` when the output has extra finite dims
    (e.g. positions): they must be singletons here."""
    rest = K.numel() // (batch * batch)
    if rest != 1:
        raise ValueError(
            "the model's output has finite dimensions besides the batch and the output units; "
            "return a [batch, k] tensor."
        )
    return K.reshape(batch, batch)


def infinite_width(
    factory: Callable[[int], torch.nn.Module],
    example_inputs,
    parametrization: str = "ntk",
    widths: tuple[int, int] = (64, 128),
    variances: Mapping[str, Any] | None = None,
) -> InfiniteWidthLimit:
    """The infinite-width limit of the PyTorch model ``factory(width)``.

    Args:
        factory: ``width -> nn.Module``; hidden sizes must be proportional to ``width``.
        example_inputs: a tensor or tuple of tensors, batch on dim 0 (sets input shapes).
        parametrization: ``"ntk"`` or ``"standard"`` (the NNGP is the same for both).
        widths: the two widths at which the model is captured to infer what grows.
        variances: per-parameter overrides of the initial variances read from the code.
    """
    if not callable(factory):
        raise TypeError("factory must be a callable width -> nn.Module")
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(
            f"parametrization {parametrization!r} is not supported yet; choose one of "
            f"{PARAMETRIZATIONS} (μP and mean field come with the feature-learning limit)."
        )
    inputs = _as_tuple(example_inputs)
    _check_finite(inputs, "example_inputs")
    w1, w2 = widths
    if not (isinstance(w1, int) and isinstance(w2, int) and 0 < w1 < w2):
        raise ValueError(f"widths must be two increasing positive integers, got {widths}")
    return InfiniteWidthLimit(factory, inputs, parametrization, (w1, w2), variances)
