"""The μP (maximal-update) infinite-width limit of training (TP IV), for MLPs with SGD.

``limit = tp.infinite_width(factory, x, parametrization="mup", base_width=64)`` then
``trainer = limit.trainer(optimizer="sgd", lr=..., loss="mse" | "cross_entropy")``.
See docs/feature-learning.md.
"""

from .architecture import Activation, LinearLayer, MLPSpec, mlp_spec
from .build import make_trainer
from .trainer import MuPLimitTrainer, TrainingDiverged
from .validate import Convergence, Run, convergence, finite_width_run, limit_run

__all__ = [
    "Activation",
    "Convergence",
    "LinearLayer",
    "MLPSpec",
    "MuPLimitTrainer",
    "Run",
    "TrainingDiverged",
    "convergence",
    "finite_width_run",
    "limit_run",
    "make_trainer",
    "mlp_spec",
]
