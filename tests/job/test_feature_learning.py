"""The main job's feature-learning section on a tiny synthetic data set: its pieces, its
report and its errors (the real run is `make demo`)."""

from __future__ import annotations

import math

import pytest
import torch

from tensorprograms.feature_learning import finite_width_run
from tensorprograms.job.data import Dataset
from tensorprograms.job.feature_learning import FLConfig, batches, compare, mean_se, mlp, ridge_predict
from tensorprograms.job.fl_report import _cells, paired, section, to_json

TINY = dict(pool=120, n_test=40, n_train=60, n_val=20, seeds=2, particles=256, epochs=2, batch=10,
            lrs=(0.1, 0.3), ridges=(1e-3, 1e-1), finite_widths=(16, 32), split_class=2, pretrain=30,
            readout_budgets=(8, 16), readout_val=10)


def blobs(n_train=160, n_test=60, classes=4, d=5, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, d, generator=g, dtype=torch.float64)

    def draw(n):
        y = torch.arange(n) % classes
        return centres[y] + torch.randn(n, d, generator=g, dtype=torch.float64), y

    (xtr, ytr), (xte, yte) = draw(n_train), draw(n_test)
    return Dataset("blobs", xtr, ytr, xte, yte)


def test_mean_se_and_ridge_predict_against_closed_forms():
    m, se = mean_se([0.5, 0.7, 0.9])
    assert m == pytest.approx(0.7) and se == pytest.approx(0.2 / math.sqrt(3))
    assert paired([0.5, 0.7, 0.9], [0.4, 0.5, 0.6]) == f"+20.0 ± {100 * 0.1 / math.sqrt(3):.1f}"
    # the best of the first three columns is bold, later columns never
    assert _cells([[0.5, 0.5], [0.7, 0.7], [0.6, 0.6], [0.9, 0.9]]) == \
        "50.0 ± 0.0% | **70.0 ± 0.0%** | 60.0 ± 0.0% | 90.0 ± 0.0%"
    g = torch.Generator().manual_seed(1)
    A = torch.randn(9, 4, generator=g, dtype=torch.float64)
    K = A @ A.T
    train, ev = torch.arange(6), torch.arange(6, 9)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    lam = 0.1 * K[:6, :6].diagonal().mean()
    alpha = torch.linalg.solve(K[:6, :6] + lam * torch.eye(6, dtype=K.dtype),
                               torch.nn.functional.one_hot(y, 3).double())
    expected = (K[6:, :6] @ alpha).argmax(1)
    assert torch.equal(ridge_predict(K, train, ev, y, 3, 0.1), expected)


def test_batches_cover_each_epoch_once():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    out = batches(x, y, epochs=2, batch=5, seed=0)
    assert len(out) == 4
    assert sorted(torch.cat([b[1] for b in out[:2]]).tolist()) == list(range(10))


def test_compare_runs_every_method_and_reports(tmp_path):
    cfg = FLConfig(**TINY)
    res = compare(blobs(), cfg, progress=False)
    assert set(res.accuracy) == {"nngp", "ntk", "mup", "finite 16", "finite 32"}
    for accs in res.accuracy.values():
        assert len(accs) == cfg.seeds and all(0.0 <= a <= 1.0 for a in accs)
    assert res.lr in cfg.lrs and set(res.lr_val) == set(cfg.lrs)
    assert res.steps == cfg.epochs * (cfg.n_train // cfg.batch)
    t = res.transfer
    assert set(t.accuracy) == {(k, b) for k in ("nngp", "ntk", "mup", "finite 32") for b in (8, 16)}
    assert all(len(v) == cfg.seeds for v in t.accuracy.values())
    # the blobs are separable: every method must beat chance (1/4, and 1/2 on the new classes) clearly
    assert mean_se(res.accuracy["mup"])[0] > 0.5 and mean_se(t.accuracy[("mup", 16)])[0] > 0.7
    md = section([res], tmp_path)
    assert "| blobs | 60 / 20 / 40 | 2 |" in md and "Transfer" in md and "Paired differences" in md
    assert (tmp_path / "feature_learning.png").exists()
    assert to_json([res])[0]["transfer"]["accuracy"]["mup / 8 examples"] == t.accuracy[("mup", 8)]


def test_bad_sizes_are_named_before_any_training():
    with pytest.raises(ValueError, match="enlarge FLConfig.pool"):
        compare(blobs(), FLConfig(**{**TINY, "pretrain": 100}), progress=False)
    with pytest.raises(ValueError, match="lower n_train"):
        compare(blobs(), FLConfig(**{**TINY, "n_train": 120}), progress=False)


def test_finite_run_returns_the_readout_input():
    data = blobs()
    fac = mlp(data.d, 4)
    b = batches(data.x_train[:20], data.y_train[:20], 1, 10, 0)
    run = finite_width_run(fac, 32, 16, b, data.x_test, lr=0.1, loss="cross_entropy", features_of="2")
    assert run.features.shape == (data.x_test.shape[0], 32) and (run.features >= 0).all()
