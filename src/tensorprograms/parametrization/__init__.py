"""abc-parametrizations of Tensor Programs IV: named points and their classification."""

from tensorprograms.parametrization.abc import (
    KINDS,
    NAMES,
    OPTIMIZERS,
    ABCParametrization,
    LayerScaling,
    meanfield,
    mup,
    named,
    ntk,
    standard,
)
from tensorprograms.parametrization.classify import Classification, classify, feature_exponents

__all__ = [
    "KINDS",
    "NAMES",
    "OPTIMIZERS",
    "ABCParametrization",
    "Classification",
    "LayerScaling",
    "classify",
    "feature_exponents",
    "meanfield",
    "mup",
    "named",
    "ntk",
    "standard",
]
