"""μP for finite PyTorch models (Tensor Programs IV and V).

``parametrize`` builds a model at any width whose hyperparameters mean what they mean
at a base width; ``SGD``/``Adam``/``AdamW``/``param_groups`` train it; ``coord_check``
verifies it.
"""

from tensorprograms.mup.coord_check import CoordCheckResult, coord_check
from tensorprograms.mup.errors import MupError
from tensorprograms.mup.optim import SGD, SUPPORTED, Adam, AdamW, param_groups
from tensorprograms.mup.parametrize import parametrize
from tensorprograms.mup.shapes import ParamInfo
from tensorprograms.mup.shapes import infer as infer_shapes

__all__ = [
    "SGD",
    "SUPPORTED",
    "Adam",
    "AdamW",
    "CoordCheckResult",
    "MupError",
    "ParamInfo",
    "coord_check",
    "infer_shapes",
    "param_groups",
    "parametrize",
]
