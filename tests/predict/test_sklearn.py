"""tp.sklearn: the scikit-learn contract (scikit-learn's own estimator checks, clone,
Pipeline, GridSearchCV) and predictions equal to tp.predict's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import tensorprograms as tp  # noqa: E402
from tensorprograms.sklearn import (  # noqa: E402
    DefaultMLP,
    InfiniteWidthClassifier,
    InfiniteWidthRegressor,
)

# NNGP GP posterior: the cheap configuration (closed-form ReLU kernel). Every check
# applies; the only skips are scikit-learn's own (pandas not installed, SCIPY_ARRAY_API
# unset), which do not concern these estimators.
CHEAP = dict(kernel="nngp", method="gp", noise=1e-3)


@pytest.mark.slow
@parametrize_with_checks([InfiniteWidthRegressor(**CHEAP), InfiniteWidthClassifier(**CHEAP)])
def test_sklearn_estimator_checks(estimator, check):  # ~50 s for both
    check(estimator)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    y = np.sin(X[:, 0]) + 0.3 * X[:, 1]
    labels = (X[:, 0] + 0.5 * X[:, 2] > 0).astype(int) + (X[:, 1] > 1).astype(int)
    return X, y, labels


def test_predictions_equal_tp_predict(data):
    X, y, _ = data
    # 10 + 5 inputs are padded to 16 inside the estimator; tp.predict sees the 15
    est = InfiniteWidthRegressor(t=20.0, lr=0.5).fit(X[:10], y[:10])
    mean, std = est.predict(X[10:15], return_std=True)
    lim = tp.infinite_width(lambda w: DefaultMLP(3, w), torch.as_tensor(X[:2]))
    ref = tp.predict.predict(lim, torch.as_tensor(X[:10]), torch.as_tensor(y[:10]), torch.as_tensor(X[10:15]),
                             t=20.0, lr=0.5)
    np.testing.assert_allclose(mean, ref.mean.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(std, ref.variance.sqrt().numpy(), rtol=0, atol=1e-10)


def test_contract_clone_pipeline_gridsearch(data):
    X, y, labels = data
    assert tp.sklearn.InfiniteWidthClassifier is InfiniteWidthClassifier  # lazy tp.sklearn
    est = InfiniteWidthClassifier(**CHEAP)
    assert clone(est).get_params() == est.get_params()
    est.set_params(noise=0.1)
    assert est.noise == 0.1
    pipe = make_pipeline(StandardScaler(), InfiniteWidthClassifier(**CHEAP)).fit(X[:30], labels[:30])
    assert set(pipe.predict(X[30:])) <= set(labels)
    assert pipe.score(X[:30], labels[:30]) == 1.0  # the noiseless-ish posterior interpolates
    grid = GridSearchCV(InfiniteWidthRegressor(kernel="nngp", method="gp"),
                        {"noise": [1e-3, 1e-1, 10.0]}, cv=3).fit(X, y)
    assert grid.best_params_["noise"] in (1e-3, 1e-1, 10.0)
    assert grid.best_score_ > 0.5  # R² of a smooth target


def test_bad_parameters(data):
    X, y, _ = data
    with pytest.raises(ValueError, match="kernel must be"):
        InfiniteWidthRegressor(kernel="rbf").fit(X, y)
    with pytest.raises(ValueError, match="method must be"):
        InfiniteWidthRegressor(method="sgd").fit(X, y)
    with pytest.raises(TypeError, match="factory must be"):
        InfiniteWidthRegressor(factory=3).fit(X, y)
    with pytest.raises(ValueError, match="t must be"):
        InfiniteWidthRegressor(t=-math.inf).fit(X, y)
    with pytest.raises(ValueError, match="lr must be"):
        InfiniteWidthClassifier(lr=0).fit(X, y > 0)
