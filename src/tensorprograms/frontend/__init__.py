"""PyTorch models to Tensor Programs: ``tp.infinite_width``."""

from . import (  # noqa: F401  (they register rules in RULES and hooks)
    rules_batchnorm,
    rules_embedding,
    rules_positional,
    rules_recurrent,
)
from .init_reader import ParamInit, fan_in_scaling, read_initialization
from .limit import InfiniteWidthLimit, infinite_width
from .lower import RULES

__all__ = [
    "RULES",
    "InfiniteWidthLimit",
    "ParamInit",
    "fan_in_scaling",
    "infinite_width",
    "read_initialization",
]
