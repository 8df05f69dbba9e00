"""abc-parametrizations (Tensor Programs IV, section 3).

Conventions (n is the width):

* Every weight is written ``W = n^(-a) * w`` with ``w`` initialised iid with standard
  deviation ``n^(-b)`` (times a width-independent constant), and trained with learning
  rate ``eta * n^(-c)`` (``eta`` width-independent).
* Layers come in three kinds: ``"input"`` (finite fan-in, fan-out n: the first weight,
  every bias and every gain vector, which TP IV treats as input weights fed by a constant
  1), ``"hidden"`` (fan-in and fan-out both proportional to n) and ``"output"`` (fan-in n,
  finite fan-out: the readout).
* ``c`` depends on the optimizer: for SGD the update of ``w`` is ``-eta n^-c grad_w``; for
  Adam (and other entrywise-normalised optimizers) it is ``-eta n^-c adam(grad_w)``.

A parametrization is only defined up to the symmetry ``(a, b, c) -> (a + t, b - t,
c - 2t)`` for SGD and ``(a + t, b - t, c - t)`` for Adam, applied to one layer: the
function and the training trajectory are unchanged (for Adam up to its epsilon).
The named points below use the representative of Tensor Programs V (Table 3), where
input and hidden weights carry no multiplier, so that our multipliers agree with
Microsoft's ``mup`` package where that package applies.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Kind = Literal["input", "hidden", "output"]
Optimizer = Literal["sgd", "adam"]
KINDS: tuple[Kind, ...] = ("input", "hidden", "output")
OPTIMIZERS: tuple[Optimizer, ...] = ("sgd", "adam")
NAMES: tuple[str, ...] = ("standard", "ntk", "mup", "meanfield")
_ALIASES = {
    "sp": "standard",
    "standard": "standard",
    "ntk": "ntk",
    "ntp": "ntk",
    "mup": "mup",
    "μp": "mup",
    "maximal_update": "mup",
    "meanfield": "meanfield",
    "mean_field": "meanfield",
    "mf": "meanfield",
}


@dataclass(frozen=True)
class LayerScaling:
    """Exponents of one layer kind: multiplier ``n^-a``, init std ``n^-b``, learning
    rate ``n^-c``."""

    a: float
    b: float
    c: float

    def shifted(self, theta: float, optimizer: Optimizer) -> LayerScaling:
        """The equivalent exponents under the abc symmetry with shift ``theta``."""
        step = 2.0 if optimizer == "sgd" else 1.0
        return LayerScaling(self.a + theta, self.b - theta, self.c - step * theta)


@dataclass(frozen=True)
class ABCParametrization:
    """A per-layer-kind abc-parametrization for one optimizer family.

    ``name`` is informational. ``layer(kind)`` returns the exponents of a kind.
    """

    input: LayerScaling
    hidden: LayerScaling
    output: LayerScaling
    optimizer: Optimizer = "sgd"
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer={self.optimizer!r} has no abc rule; use one of {OPTIMIZERS} "
                "(AdamW and other entrywise-normalised optimizers follow 'adam')."
            )

    def layer(self, kind: Kind) -> LayerScaling:
        """Exponents of the layer kind ``"input"``, ``"hidden"`` or ``"output"``."""
        if kind not in KINDS:
            raise ValueError(f"unknown layer kind {kind!r}; expected one of {KINDS}")
        return getattr(self, kind)

    def shifted(self, kind: Kind, theta: float) -> ABCParametrization:
        """An equivalent parametrization: the symmetry applied to one layer kind."""
        new = self.layer(kind).shifted(theta, self.optimizer)
        return replace(self, **{kind: new})


def _point(name: str, optimizer: Optimizer) -> ABCParametrization:
    L = LayerScaling
    sgd = optimizer == "sgd"
    if name == "standard":
        # The code as most people write it: PyTorch's 1/fan_in variances, one global lr.
        return ABCParametrization(L(0, 0, 0), L(0, 0.5, 0), L(0, 0.5, 0), optimizer, name)
    if name == "ntk":
        # Multipliers 1/sqrt(fan_in) with unit-variance weights. For Adam, the learning
        # rates are the smallest ones that keep the readout stable (kernel regime).
        if sgd:
            return ABCParametrization(L(0, 0, 0), L(0.5, 0, 0), L(0.5, 0, 0), optimizer, name)
        return ABCParametrization(L(0, 0, 0.5), L(0.5, 0, 1), L(0.5, 0, 0.5), optimizer, name)
    if name == "mup":
        if sgd:
            return ABCParametrization(L(0, 0, -1), L(0, 0.5, 0), L(1, 0, -1), optimizer, name)
        return ABCParametrization(L(0, 0, 0), L(0, 0.5, 1), L(1, 0, 0), optimizer, name)
    if name == "meanfield":
        # muP shifted by theta = 1/2 on the hidden layers (for depth 1 it is exactly the
        # classical two-layer mean-field parametrization, a_2 = 1, c = -1).
        mup = _point("mup", optimizer)
        return replace(mup.shifted("hidden", 0.5), name=name)
    raise AssertionError(name)


def named(name: str, optimizer: Optimizer = "sgd") -> ABCParametrization:
    """A named point: ``"standard"`` (SP), ``"ntk"`` (NTP), ``"mup"`` (μP) or
    ``"meanfield"`` (MF), for ``optimizer`` ``"sgd"`` or ``"adam"``.

    Aliases: ``"sp"``, ``"ntp"``, ``"μp"``, ``"mf"``, ``"mean_field"``.
    """
    if not isinstance(name, str) or name.lower() not in _ALIASES:
        raise ValueError(
            f"unknown parametrization {name!r}; use one of {NAMES} "
            "or build an ABCParametrization by hand"
        )
    if optimizer not in OPTIMIZERS:
        raise ValueError(
            f"optimizer={optimizer!r} has no abc rule; use one of {OPTIMIZERS} "
            "(AdamW and other entrywise-normalised optimizers follow 'adam')."
        )
    return _point(_ALIASES[name.lower()], optimizer)


def standard(optimizer: Optimizer = "sgd") -> ABCParametrization:
    """Standard parametrization (SP) with a width-independent learning rate."""
    return named("standard", optimizer)


def ntk(optimizer: Optimizer = "sgd") -> ABCParametrization:
    """Neural tangent parametrization (NTP)."""
    return named("ntk", optimizer)


def mup(optimizer: Optimizer = "sgd") -> ABCParametrization:
    """Maximal update parametrization (μP)."""
    return named("mup", optimizer)


def meanfield(optimizer: Optimizer = "sgd") -> ABCParametrization:
    """Mean-field parametrization (equivalent to μP under the abc symmetry)."""
    return named("meanfield", optimizer)
