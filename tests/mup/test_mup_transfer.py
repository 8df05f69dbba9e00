"""The learning-rate transfer experiment (reduced here; full run behind @slow)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tensorprograms.mup import MupError
from tensorprograms.mup import transfer as T

pytest.importorskip("mnist1d")


def test_data_is_generated_locally_and_reproducibly() -> None:
    a, b = T.mnist1d(num_samples=400), T.mnist1d(num_samples=400)
    assert a["x"].shape == (320, 40) and a["x_test"].shape == (80, 40)
    assert set(a["y"].tolist()) <= set(range(10))
    assert (a["x"] == b["x"]).all()


def test_reduced_sweep(tmp_path) -> None:
    data = T.mnist1d(num_samples=600)
    res = T.sweep([16, 64], [-9, -6, -3], "adam", epochs=1, batch_size=60, data=data,
                  progress=False)
    for p in ("standard", "mup"):
        assert res.loss[p].shape == (2, 3)
        assert np.isfinite(res.loss[p]).any()
    # Same seed, same base width: μP at the base width *is* SP, loss for loss.
    np.testing.assert_array_equal(res.loss["mup"][0], res.loss["standard"][0])
    assert all(lr in res.lrs for lr in res.best_lr("mup"))
    assert "best lr per width" in res.summary()
    res.plot(str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_bad_optimizer() -> None:
    with pytest.raises(MupError, match="optimizer must be 'sgd' or 'adam'"):
        T.sweep([32, 64], [-5], "rmsprop", data=T.mnist1d(num_samples=200))


@pytest.mark.slow
def test_full_transfer_claim() -> None:
    # The claim, measured: widths 64..2048, Adam, lr grid in octaves.
    res = T.sweep(seeds=2)
    print(res.summary())
    assert abs(res.shift("mup")) <= 1
    assert abs(res.shift("standard")) > 1
    assert math.isfinite(res.loss["mup"].min())
