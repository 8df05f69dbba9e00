"""scikit-learn estimators backed by infinite-width limits (``tp.sklearn``; needs the
optional extra ``sklearn``: ``pip install tensorprograms[sklearn]``).

``InfiniteWidthRegressor`` and ``InfiniteWidthClassifier`` predict with the NNGP/NTK of
``factory(width)`` via :mod:`tensorprograms.predict`: ``method="flow"`` is the infinitely
wide network trained by MSE gradient flow for time ``t`` (``math.inf``: to convergence),
``method="gp"`` the GP posterior. The classifier regresses one-hot targets and predicts
the argmax. ``factory`` takes the width and returns a module mapping ``[N, n_features]``
float inputs to ``[N, k]`` outputs (reshape inside ``forward`` for CNNs/RNNs); the
default (None) is a ReLU MLP with two hidden layers (weights N(0, 2/fan_in), biases
N(0, 0.1)). See docs/predict.md.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tensorprograms.sklearn needs scikit-learn: pip install 'tensorprograms[sklearn]'"
    ) from e

from .frontend import infinite_width
from .predict import KernelBlocks, gp_posterior, gradient_flow, limit_kernels, one_hot

__all__ = ["DefaultMLP", "InfiniteWidthClassifier", "InfiniteWidthRegressor"]


class DefaultMLP(nn.Module):
    """``d → width → width → 1``, ReLU; weights N(0, 2/fan_in), biases N(0, 0.1)."""

    def __init__(self, d: int, width: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, width), nn.Linear(width, width), nn.Linear(width, 1)])
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=math.sqrt(2.0 / layer.in_features))
            nn.init.normal_(layer.bias, std=math.sqrt(0.1))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


class _DefaultFactory:
    """Picklable, hashable ``width -> DefaultMLP(d, width)``."""

    def __init__(self, d: int):
        self.d = d

    def __call__(self, width: int) -> nn.Module:
        return DefaultMLP(self.d, width)

    def __eq__(self, other):
        return isinstance(other, _DefaultFactory) and other.d == self.d

    def __hash__(self):
        return hash(("DefaultMLP", self.d))


# Limits are costly to build (torch.export at two widths) and not picklable, so fitted
# estimators keep only a key into this small cache (clone/pickle stay cheap and safe).
_LIMITS: OrderedDict = OrderedDict()
_CACHE_SIZE = 8


def _limit(factory, x: torch.Tensor, widths: tuple[int, int]):
    try:
        key = (factory, tuple(x.shape[1:]), tuple(widths))
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _LIMITS:
        _LIMITS.move_to_end(key)
        return _LIMITS[key]
    lim = infinite_width(factory, x[:2], widths=tuple(widths))
    if key is not None:
        _LIMITS[key] = lim
        while len(_LIMITS) > _CACHE_SIZE:
            _LIMITS.popitem(last=False)
    return lim


def _blocks(lim, xtr: torch.Tensor, xte: torch.Tensor, kernel: str):
    """(kernel blocks, NNGP blocks) on train and test inputs.

    The frontend captures the model once per batch size, so the concatenated inputs are
    padded (with copies of their first row) to the next power of two: a few captures serve
    every call. Batch elements never interact in the limit, so the padding rows change
    nothing in the blocks kept."""
    n, m = xtr.shape[0], xte.shape[0]
    total = n + m
    pad = (1 << max(total - 1, 1).bit_length()) - total
    xs = torch.cat([xtr, xte, xtr[:1].expand(pad, *xtr.shape[1:])])
    blocks = limit_kernels(lim, xs[:n], xs[n:], ntk=(kernel == "ntk"))
    out = {}
    for name, b in blocks.items():
        out[name] = KernelBlocks(b.train, b.test_train[:m], b.test[:m, :m])
    return out[kernel], out["nngp"]


class _InfiniteWidthBase(BaseEstimator):
    def __init__(self, factory=None, kernel: str = "ntk", method: str = "flow", t: float = math.inf,
                 lr: float = 1.0, noise: float = 0.0, widths: tuple[int, int] = (64, 128)):
        self.factory = factory
        self.kernel = kernel
        self.method = method
        self.t = t
        self.lr = lr
        self.noise = noise
        self.widths = widths

    def _check_params(self) -> None:
        if self.kernel not in ("nngp", "ntk"):
            raise ValueError(f"kernel must be 'nngp' or 'ntk'; got {self.kernel!r}")
        if self.method not in ("flow", "gp"):
            raise ValueError("method must be 'flow' (gradient flow) or 'gp' (GP posterior); "
                             f"got {self.method!r}")
        t, lr, noise = float(self.t), float(self.lr), float(self.noise)
        if math.isnan(t) or t < 0:
            raise ValueError(f"t must be >= 0 (math.inf: trained to convergence); got {self.t}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0; got {self.lr}")
        if not (math.isfinite(noise) and noise >= 0):
            raise ValueError(f"noise must be a finite number >= 0; got {self.noise}")
        if self.factory is not None and not callable(self.factory):
            raise TypeError("factory must be a callable width -> nn.Module, or None for the default MLP")

    def _factory(self):
        return _DefaultFactory(self.n_features_in_) if self.factory is None else self.factory

    def _fit_targets(self, X, Y) -> None:
        self._check_params()
        self.X_train_ = np.asarray(X, dtype=np.float64)
        self.Y_train_ = np.asarray(Y, dtype=np.float64)
        # capture now so that a model that cannot take these inputs fails in fit
        _limit(self._factory(), torch.as_tensor(self.X_train_), self.widths)

    def _predict_targets(self, X, with_var: bool = False):
        check_is_fitted(self, "X_train_")
        X = validate_data(self, X, reset=False, dtype=np.float64)
        xtr, xte = torch.as_tensor(self.X_train_), torch.as_tensor(X)
        lim = _limit(self._factory(), xtr, self.widths)
        k, g = _blocks(lim, xtr, xte, self.kernel)
        Y = torch.as_tensor(self.Y_train_)
        diag = g.test.diagonal() if with_var else None
        if self.method == "gp":
            pred = gp_posterior(k.train, Y, k.test_train, k.test.diagonal() if with_var else None,
                                noise=self.noise)
        else:
            pred = gradient_flow(k.train, Y, k.test_train, t=self.t, lr=self.lr, noise=self.noise,
                                 nngp_train=g.train if with_var else None, nngp_test_train=g.test_train,
                                 nngp_test=diag)
        return pred


class InfiniteWidthRegressor(RegressorMixin, _InfiniteWidthBase):
    """Regression with the infinitely wide ``factory`` network (scikit-learn estimator).

    Args:
        factory: ``width -> nn.Module`` on ``[N, n_features]`` inputs; None: :class:`DefaultMLP`.
        kernel: ``"ntk"`` or ``"nngp"``.
        method: ``"flow"`` (gradient flow for time ``t`` with ``lr``) or ``"gp"`` (posterior).
        t, lr: training time (in steps of size ``lr``; ``math.inf`` = converged) and rate.
        noise: observation noise (``"gp"``) or ridge (``"flow"``) on the kernel diagonal.
        widths: the two capture widths of ``tp.infinite_width``.
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True  # 2-D y: one column per output unit, one kernel
        return tags

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True, multi_output=True)
        self._fit_targets(X, y)
        return self

    def predict(self, X, return_std: bool = False):
        """Mean prediction ``[M]`` (or ``[M, k]`` for 2-D y); with ``return_std`` also the
        per-output predictive standard deviation ``[M]`` (GP posterior, or the infinite
        ensemble's spread at time t)."""
        pred = self._predict_targets(X, with_var=return_std)
        mean = pred.mean.numpy()
        if return_std:
            return mean, pred.variance.clamp_min(0).sqrt().numpy()
        return mean


class InfiniteWidthClassifier(ClassifierMixin, _InfiniteWidthBase):
    """Classification by one-hot regression with the infinitely wide ``factory`` network;
    predicts the class with the largest regressed score. Parameters as
    :class:`InfiniteWidthRegressor`."""

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, labels = np.unique(y, return_inverse=True)
        self._fit_targets(X, one_hot(torch.as_tensor(labels), len(self.classes_)).numpy())
        return self

    def decision_function(self, X):
        """Regressed one-hot scores ``[M, n_classes]`` (``[M]`` for two classes: the second
        class's score minus the first's, scikit-learn's convention)."""
        scores = self._predict_targets(X).mean.numpy()
        return scores[:, 1] - scores[:, 0] if len(self.classes_) == 2 else scores

    def predict(self, X):
        scores = self._predict_targets(X).mean.numpy()
        return self.classes_[scores.argmax(axis=1)]
